"""The run's HTML report: static PNG figures (matplotlib, Agg) and tables, no server (pure: no Ray).

run folder (metrics.json, quantization.parquet, centroids.parquet, distilled/<method>-ipc<k>/) ->
  report.html next to metrics.json, figures in report/*.png (relative links: the folder can be copied anywhere).
Every section is drawn from what the run actually wrote; a missing input (e.g. `--until quantize` has no
distilled sets or results) is said in the page instead of drawn.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from engine.io.location import location
from engine.io.store import atomic_write_bytes, read_image, read_table
from engine.report.stats import CONTEXT, DASH, compare_to_random, format_delta, format_lrs, format_p

MAX_CLASSES_IN_GRID = 10  # rows of an image grid; ImageNet has 1000 classes, a page shows the first ten
MAX_IMAGES_PER_CELL = 10  # images per (class, method) cell of a grid, highest weight first
MAX_CLASSES_DETAILED = 3  # classes shown set by set, all their images, when a grid has more than 3 per class
REAL_SETS = ("random", "herding", "kcenter")  # sets of real images: no weights under them


def is_real_set(name: str) -> bool:
    """A set of real images, named plainly (`random`) or after its run (`runs-a/random`, jobs/compare_images.py)."""
    return name.rsplit("/", 1)[-1] in REAL_SETS
WEIGHT_MODES = ("uniform", "mass", "sqrt")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def plot_text(text: str, limit: int = 40) -> str:
    """A user's text (a class name) as matplotlib draws it literally: `$` would start mathtext (and an unpaired
    one fails the whole figure), control characters are shown escaped, long names are cut."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("$", r"\$")


def _save(fig, path) -> str:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return f"{path.parent.name}/{path.name}"


def distilled_sets(run_dir) -> dict[int, dict[str, Path]]:
    """ipc -> {method: folder} for every distilled/<method>-ipc<k>/ with an index.parquet; of `random`'s draws only
    the first (random-ipc<k>), which is enough to show what real images look like beside the others."""
    sets: dict[int, dict[str, Path]] = {}
    for index in sorted(location(run_dir).glob("distilled/*-ipc*/index.parquet")):
        method, ipc = index.parent.name.rsplit("-ipc", 1)
        if not re.fullmatch(r"random-draw\d+", method):
            sets.setdefault(int(ipc), {})[method] = index.parent
    return sets


def plot_image_grid(sets: dict[str, Path], ipc: int, path, quality: dict | None = None) -> str:
    """The sets of one IPC, image by image. Up to 3 images per class: one row per class (the first ten), one
    cell per set. More: one block per class for the first few classes, one row per set holding all of the class's
    images (up to ten) at a readable size. Real images (`random`, then the other real sets) come first; under each
    decoded image its weight in the loss (d4m: uniform, ddoq: Voronoi mass), highest weight first; beside each set
    its quality figures (`quality`, metrics.json's set_quality) when measured."""
    plt = _pyplot()
    order = sorted(sets, key=lambda m: (not is_real_set(m), m.rsplit("/", 1)[-1] != "random", m))
    indexes = {m: read_table(sets[m] / "index.parquet").to_pandas() for m in order}
    labels = sorted(set().union(*(set(ix.label) for ix in indexes.values())))
    names = {int(r.label): plot_text(str(r.class_name)) for ix in indexes.values() for r in ix.itertuples()}
    per_cell = min(ipc, MAX_IMAGES_PER_CELL)
    by_class = ipc > 3
    labels = labels[:MAX_CLASSES_DETAILED if by_class else MAX_CLASSES_IN_GRID]
    if by_class:  # rows (class, set), columns the class's images
        rows = [(label, method) for label in labels for method in order]
        columns = per_cell
    else:  # rows classes, columns (set, image)
        rows = [(label, None) for label in labels]
        columns = per_cell * len(order)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.05 * columns + 2.4, 1.2 * len(rows) + 0.8),
                             squeeze=False)
    for row, (label, only) in enumerate(rows):
        for group, method in enumerate([only] if only else order):
            cell = indexes[method][indexes[method].label == label].sort_values("weight", ascending=False)
            for j in range(per_cell):
                ax = axes[row, (0 if only else group * per_cell) + j]
                ax.set_xticks([]), ax.set_yticks([])
                for side in ax.spines.values():
                    side.set_visible(False)
                if j < len(cell):
                    item = cell.iloc[j]
                    ax.imshow(read_image(sets[method] / item.path), interpolation="nearest")
                    if not is_real_set(method):
                        ax.set_xlabel(f"w={item.weight:.2f}", fontsize=8, labelpad=1)
                if not only and row == 0 and j == 0:
                    ax.set_title(_set_label(method, ipc, quality), fontsize=7, loc="left")
        first = axes[row, 0]
        if only:
            heading = f"{names.get(label, label)}\n" if only == order[0] else ""
            first.set_ylabel(heading + _set_label(only, ipc, quality), fontsize=8, rotation=0, ha="right",
                             va="center")
        else:
            first.set_ylabel(names.get(label, str(label)), fontsize=9, rotation=0, ha="right", va="center")
    what = f"the first {len(labels)} classes, every set" if by_class else f"first {len(labels)} classes"
    fig.suptitle(f"IPC {ipc}: real images beside the decoded centroids ({what})", fontsize=10)
    return _save(fig, path)


def _set_label(method: str, ipc: int, quality: dict | None) -> str:
    """A set's name, and its teacher agreement and Fréchet distance when measured."""
    label = "real (random)" if method == "random" else method
    figures = (quality or {}).get(f"{method}-ipc{ipc}")
    if not figures:
        return label
    distance = figures.get("frechet_distance")
    return (f"{label}\nagrees {100 * figures['class_agreement']:.0f} %"
            + (f"\nFD {distance:.1f}" if distance is not None else ""))


def plot_weight_histograms(centroids: pd.DataFrame, path: Path) -> str:
    """Per IPC: histogram of the mass and sqrt weights (uniform is the line at 1)."""
    plt = _pyplot()
    ipcs = sorted(i for i in centroids.ipc.unique() if i > 1) or sorted(centroids.ipc.unique())
    fig, axes = plt.subplots(1, len(ipcs), figsize=(4.2 * len(ipcs), 3.2), squeeze=False)
    for ax, ipc in zip(axes[0], ipcs):
        part = centroids[centroids.ipc == ipc]
        high = max(part.weight_mass.max(), part.weight_sqrt.max(), 1.0) * 1.05
        bins = np.linspace(0, high, 30)
        ax.hist(part.weight_mass, bins=bins, alpha=0.6, label="mass (DDOQ)")
        ax.hist(part.weight_sqrt, bins=bins, alpha=0.6, label="sqrt")
        ax.axvline(1.0, color="k", linestyle="--", linewidth=1, label="uniform")
        ax.set_title(f"IPC {ipc}: {len(part)} centroids, weight std {part.weight_mass.std():.2f} (mass)", fontsize=9)
        ax.set_xlabel("weight (mean 1 per class)")
        ax.set_ylabel("centroids")
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_w2_per_class(stats: pd.DataFrame, path: Path) -> str:
    """Per IPC: each class's W2 with the engine's centroids and uniform weights (x) against weighted, and against
    D4M's own quantizer (y); points below the diagonal are classes brought closer to the data. A scatter stays readable at 1000 classes, bars would not."""
    plt = _pyplot()
    ipcs = sorted(stats.ipc.unique())
    fig, axes = plt.subplots(1, len(ipcs), figsize=(4 * len(ipcs), 3.8), squeeze=False)
    for ax, ipc in zip(axes[0], ipcs):
        part = stats[stats.ipc == ipc]
        ax.scatter(part.w2_uniform, part.w2_mass, s=16, label="mass (DDOQ)")
        ax.scatter(part.w2_uniform, part.w2_sqrt, s=16, marker="x", label="sqrt")
        columns = ["w2_uniform", "w2_mass", "w2_sqrt"]
        title = f"IPC {ipc}: mass lowers W2 by {100 * (1 - part.w2_mass / part.w2_uniform).mean():.1f} % (mean)"
        if "w2_d4m" in part:  # run folders from before D4M's own quantizer was measured have no such column
            ax.scatter(part.w2_uniform, part.w2_d4m, s=16, marker="+", label="D4M's MiniBatchKMeans, uniform")
            columns.append("w2_d4m")
            title += f", {100 * (1 - part.w2_mass / part.w2_d4m).mean():.1f} % vs D4M"
        low, high = part[columns].min().min(), part[columns].max().max()
        ax.plot([low, high], [low, high], "k--", linewidth=1, label="= engine centroids, uniform")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("W2, engine centroids, uniform weights")
        ax.set_ylabel("W2")
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_accuracy_vs_ipc(results: pd.DataFrame, path: Path) -> str:
    """Top-1 mean ± std over seeds per method against IPC (log axis); `full` is a horizontal band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method, part in results.groupby("method", sort=False):
        if method == "full":
            mean, std = part.top1.mean() * 100, part.top1.std(ddof=0) * 100
            ax.axhline(mean, color="k", linestyle="--", linewidth=1, label=f"full train set ({mean:.1f})")
            ax.axhspan(mean - std, mean + std, color="k", alpha=0.08)
            continue
        by_ipc = part.groupby("ipc").top1.agg(["mean", lambda s: s.std(ddof=0)]) * 100
        ax.errorbar(by_ipc.index, by_ipc.iloc[:, 0], yerr=by_ipc.iloc[:, 1], marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ipcs = sorted(results[results.method != "full"].ipc.unique())
    ax.set_xticks(ipcs, [str(i) for i in ipcs])
    ax.set_xlabel("images per class (IPC)")
    ax.set_ylabel("top-1 % on held-out images")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_timings(timings: dict[str, float], path: Path) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 0.45 * len(timings) + 0.8))
    names = list(timings)
    ax.barh(names, [timings[n] for n in names])
    for y, name in enumerate(names):
        ax.text(timings[name], y, f" {timings[name]:.1f} s", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(f"stage wall time, {sum(timings.values()):.0f} s in all", fontsize=9)
    return _save(fig, path)


def flatten_counts(counts: dict, prefix: str = "") -> list[tuple[str, object]]:
    """{"skipped": {"corrupt": 3}, "images_encoded": 10} -> [("images_encoded", 10), ("skipped.corrupt", 3)]:
    whatever keys a stage writes into metrics["counts"] are shown, nested ones as dotted names."""
    rows = []
    for key, value in sorted(counts.items()):
        if isinstance(value, dict):
            rows += flatten_counts(value, f"{prefix}{key}.") or [(f"{prefix}{key}", "none")]
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, border=0, classes="t", float_format=lambda v: f"{v:.3f}", escape=True,
                         na_rep=DASH)


def results_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per set and IPC (and protocol, teacher, student where the rows differ in them): top-1 mean and population
    std over seeds, the difference to `random` at the same IPC under the same protocol, teacher and student, Welch's
    p of the two sets of seeds and DD-Ranking's LRS (engine/report/stats.py); '–' where not available."""
    summary = compare_to_random(results)
    varying = [c for c in CONTEXT if c in summary and summary[c].nunique(dropna=False) > 1]
    return pd.DataFrame({
        **{c: summary[c] for c in varying},
        "method": summary.method, "weights": summary.weights,
        "ipc": summary.ipc.map(lambda k: "all" if k == 0 else str(k)),
        "top-1 % mean": summary["mean"], "top-1 % std": summary["std"], "seeds": summary.seeds,
        "Δ random (points)": summary.delta.map(format_delta), "p (Welch)": summary.p.map(format_p),
        "LRS": summary.lrs.map(format_lrs)})


RESULTS_LEGEND = (
    "<p>Top-1 mean ± population std over seeds (no std with one seed). <b>Δ random</b>: the set's mean minus "
    "<code>random</code>'s at the same IPC, protocol, teacher and student, in top-1 points. <b>p</b>: Welch's "
    "t-test of the two sets of seeds (two-sided, unequal variances; needs 2+ seeds per side); below 0.05 the "
    "difference is unlikely to be seed noise. <b>LRS</b>: DD-Ranking's label-robust score (arXiv 2505.13300), in "
    "[0, 1], (e<sup>α</sup> − e<sup>−1</sup>)/(e − e<sup>−1</sup>) with α = ½(set − random) − ½(full − set) on "
    "top-1 fractions: it rewards beating random and penalizes the gap to the full train set (0.269 when a set "
    "equals both). – : not available (no <code>random</code> or <code>full</code> row, or one seed).</p>")


def quality_table(quality: dict) -> pd.DataFrame:
    """metrics.json's set_quality ({set: figures, "reference": ...}) as one row per set, real sets first."""
    rows = [{"set": name, **figures} for name, figures in quality.items() if name != "reference"]
    frame = pd.DataFrame(rows)
    frame["real"] = frame.set.str.match(r"(random|herding|kcenter)-")
    frame = frame.sort_values(["real", "set"], ascending=[False, True]).drop(columns="real")
    return frame.rename(columns={"class_agreement": "teacher agrees", "frechet_distance": "Fréchet distance"})


QUALITY_LEGEND = (
    "<p>Each set judged by the evaluation's teacher against real <b>validation</b> images (engine/evaluate/quality.py). "
    "<b>teacher agrees</b>: the share of the set's images the teacher classifies as their class. <b>Fréchet "
    "distance</b>: between the teacher's penultimate features of the set and of the real images (FID's formula with "
    "the task's own classifier; lower is closer; biased upwards for small sets, so compare sets of one IPC). "
    "<b>precision</b> / <b>recall</b>: k-NN manifolds (Kynkäänniemi et al. 2019, k = 3): the share of the set "
    "inside the real images' manifold (realism), and of the real images inside the set's (coverage). A set of few "
    "images has large k-NN balls, which inflates its recall (10 images cover nearly everything): compare sets of "
    "one IPC. The ddoq weightings share their decoded images: their figures are equal.</p>")


def write_report(run_dir) -> Path:
    """Draw every figure the run's outputs allow and write run_dir/report.html (local or on an object store);
    returns its path."""
    run_dir = location(run_dir)
    figures = run_dir / "report"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    sections: list[str] = []

    def section(title: str, body: str) -> None:
        sections.append(f"<h2>{html.escape(title)}</h2>\n{body}")

    def image(src: str, alt: str) -> str:
        return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">'

    results = pd.DataFrame(metrics.get("results") or [])
    if len(results):
        body = image(plot_accuracy_vs_ipc(results, figures / "accuracy_vs_ipc.png"), "accuracy vs IPC")
        section("Accuracy vs IPC", body + _table(results_table(results)) + RESULTS_LEGEND)
    else:
        section("Accuracy vs IPC", "<p>No students were trained in this run (e.g. <code>--until quantize</code>).</p>")

    quality = metrics.get("set_quality") or {}
    if quality:
        reference = quality.get("reference") or {}
        intro = (f"<p>Reference: {reference['images']} real validation images, of which the teacher classifies "
                 f"{100 * reference['class_agreement']:.1f} % correctly.</p>") if reference else ""
        section("How realistic each set is", intro + _table(quality_table(quality)) + QUALITY_LEGEND)

    sets = distilled_sets(run_dir)
    grids = [image(plot_image_grid(sets[ipc], ipc, figures / f"images_ipc{ipc}.png", quality), f"images IPC {ipc}")
             for ipc in sorted(sets)]
    note = "" if any("random" in s for s in sets.values()) else \
        "<p>No real-image set in this run (method <code>random</code> not evaluated), so no real samples.</p>"
    section("Distilled images per class", "\n".join(grids) + note if grids else "<p>No distilled sets.</p>")

    if (run_dir / "centroids.parquet").exists():
        centroids = read_table(run_dir / "centroids.parquet").to_pandas()
        if "quantizer" in centroids:
            centroids = centroids[centroids.quantizer == "ddoq"]  # the weighted sets' centroids, not D4M's
        section("Weights per IPC", image(plot_weight_histograms(centroids, figures / "weights.png"), "weights"))
    if (run_dir / "quantization.parquet").exists():
        stats = read_table(run_dir / "quantization.parquet").to_pandas()
        summary = pd.DataFrame([{"ipc": k[3:], **v} for k, v in (metrics.get("quantization") or {}).items()])
        section("Latent W2 per class: uniform vs weighted, and against D4M's quantizer",
                image(plot_w2_per_class(stats, figures / "w2_per_class.png"), "W2 per class")
                + (_table(summary) if len(summary) else ""))

    timings = metrics.get("timings_s") or {}
    body = image(plot_timings(timings, figures / "timings.png"), "stage timings") if timings else ""
    counts = pd.DataFrame(flatten_counts(metrics.get("counts") or {}), columns=["count", "value"])
    section("Stages: timings and counts", body + (_table(counts) if len(counts) else "<p>No counts.</p>"))

    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>DDOQ run {html.escape(run_dir.name)}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
img {{ max-width: 100%; display: block; margin: 0.5em 0; }}
table.t {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
table.t td, table.t th {{ padding: 0.2em 0.8em; border-bottom: 1px solid #ddd; text-align: right; }}
</style></head><body>
<h1>DDOQ run <code>{html.escape(run_dir.name)}</code></h1>
<p>Folder <code>{html.escape(str(run_dir))}</code>; config in <code>config.yaml</code>, numbers in
<code>metrics.json</code>. d4m holds D4M's own centroids (its MiniBatchKMeans) with uniform weights; every ddoq
weighting holds the engine's centroids, the same decoded images with different weights in the loss.</p>
{chr(10).join(sections)}
</body></html>
"""
    out = run_dir / "report.html"
    atomic_write_bytes(out, page.encode())
    return out


def plot_sweep_accuracy(table: pd.DataFrame, path: Path, x: str = "quantize.ipc",
                        hue: str = "decode.guidance_scale") -> str:
    """A sweep's validation top-1 (what ranks its trials) against IPC, one line per guidance scale; other swept keys are averaged (the trials
    table has every trial). Keys the sweep did not vary are drawn as a single point / a single line."""
    plt = _pyplot()
    frame = table.dropna(subset=["val_top1_mean"]).copy()
    frame["_x"] = frame[x].map(lambda v: min(json.loads(v)) if isinstance(v, str) else v) if x in frame else 0
    frame["_hue"] = frame.get(hue, "all trials")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for value, part in frame.groupby("_hue"):
        by_x = part.groupby("_x").val_top1_mean.agg(["mean", "max"]) * 100
        ax.plot(by_x.index, by_x["mean"], marker="o", label=f"{hue.split('.')[-1]} {value}")
    ax.set_xticks(sorted(frame["_x"].unique()))  # the swept IPCs, not fractional ticks between them
    ax.set_xlabel(f"{x} (IPC)" if x in table else "all trials")
    ax.set_ylabel("validation top-1 % (mean of the trial's students)")
    ax.set_title(f"{len(frame)} trials", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)
