"""engine/report/run_report.py on a small run folder written with the store's own writers (no Ray, ~5 s)."""

import json
import re

import numpy as np
import pyarrow as pa
from PIL import Image

from engine.io import store
from engine.report.run_report import flatten_counts, write_report


def make_run(run_dir, ipcs=(1, 3), classes=3, with_results=True, names=None):
    rng = np.random.default_rng(0)
    names = names or tuple(f"class{c}" for c in range(classes))
    centroid_rows, stat_rows = [], []
    for ipc in ipcs:
        for label in range(classes):
            counts = rng.integers(1, 20, size=ipc)
            mass = counts * ipc / counts.sum()
            sqrt = np.sqrt(counts) * ipc / np.sqrt(counts).sum()
            for i in range(ipc):
                centroid_rows.append({"label": label, "ipc": ipc, "quantizer": "ddoq", "index": i, "count": int(counts[i]),
                                      "weight_uniform": 1.0, "weight_mass": mass[i], "weight_sqrt": sqrt[i]})
            w2u = 5.0 + rng.random()
            stat_rows.append({"label": label, "ipc": ipc, "distortion": (0.9 * w2u) ** 2, "w2_uniform": w2u,
                              "w2_mass": 0.9 * w2u, "w2_sqrt": 0.95 * w2u, "w2_d4m": 1.05 * w2u})
            for method, weights in (("random", np.ones(ipc)), ("d4m", np.ones(ipc)), ("ddoq", mass)):
                folder = store.distilled_dir(run_dir, method, ipc)
                files = [store.image_file_name(label, i) for i in range(ipc)]
                for name in files:
                    store.write_png(folder / name, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    for ipc in ipcs:  # one index per set, all classes
        for method in ("random", "d4m", "ddoq"):
            part = [r for r in centroid_rows if r["ipc"] == ipc]
            weights = [1.0 if method != "ddoq" else r["weight_mass"] for r in part]
            store.write_set_index(store.distilled_dir(run_dir, method, ipc),
                                  [store.image_file_name(r["label"], r["index"]) for r in part],
                                  [r["label"] for r in part], names, weights, [r["count"] for r in part])
    store.atomic_write_table(run_dir / "centroids.parquet", pa.Table.from_pylist(centroid_rows))
    store.atomic_write_table(run_dir / "quantization.parquet", pa.Table.from_pylist(stat_rows))
    results = [{"method": m, "weights": w, "ipc": k, "seed": s, "top1": float(rng.random())}
               for m, w in (("random", "none"), ("d4m", "uniform"), ("ddoq", "mass")) for k in ipcs for s in (0, 1)]
    results += [{"method": "full", "weights": "none", "ipc": 0, "seed": 0, "top1": 0.99}]
    metrics = {"results": results if with_results else [],
               "quantization": {f"ipc{k}": {"distortion": 1.0, "w2_uniform": 2.0, "w2_mass": 1.8, "w2_sqrt": 1.9,
                                            "w2_reduction_mass": 0.1, "w2_reduction_sqrt": 0.05} for k in ipcs},
               "timings_s": {"prior": 1.5, "encode": 2.0, "quantize": 0.5, "decode": 3.0, "evaluate": 10.0},
               "counts": {"images_encoded": 120, "classes": classes, "skipped": {"corrupt": 2, "too_small": 1}}}
    store.atomic_write_json(run_dir / "metrics.json", metrics)
    return metrics


def test_report_links_every_figure_and_shows_counts(tmp_path):
    make_run(tmp_path)
    page = write_report(tmp_path)
    assert page == tmp_path / "report.html"
    text = page.read_text()
    sources = re.findall(r'<img src="([^"]+)"', text)
    expected = {"accuracy_vs_ipc", "images_ipc1", "images_ipc3", "weights", "w2_per_class", "timings"}
    assert {s.split("/")[-1][:-4] for s in sources} == expected
    for src in sources:  # relative links to real, non-trivial PNGs
        with Image.open(tmp_path / src) as image:
            assert image.format == "PNG" and image.size[0] > 200 and np.asarray(image).std() > 0
    # Counts are shown generically, nested keys as dotted names.
    for key in ("images_encoded", "skipped.corrupt", "skipped.too_small"):
        assert f"<td>{key}</td>" in text


def test_class_names_are_drawn_and_shown_as_written(tmp_path):
    """A folder name matplotlib would read as mathtext (an unpaired `$`) or HTML would read as markup."""
    names = ("a$\\nosuch$b", "<b>bold</b>", "tab\there")
    make_run(tmp_path, names=names)
    text = write_report(tmp_path).read_text()
    assert "<b>bold</b>" not in text
    with Image.open(tmp_path / "report" / "images_ipc1.png") as image:
        assert image.size[0] > 200


def test_report_without_students_says_so(tmp_path):
    make_run(tmp_path, with_results=False)
    text = write_report(tmp_path).read_text()
    assert "No students were trained" in text
    assert "accuracy_vs_ipc.png" not in text


def test_flatten_counts_keeps_every_key():
    assert flatten_counts({"b": 1, "a": {"y": 2, "x": {}}}) == [("a.x", "none"), ("a.y", 2), ("b", 1)]


def test_report_numbers_match_metrics(tmp_path):
    metrics = make_run(tmp_path)
    text = write_report(tmp_path).read_text()
    ddoq3 = [r["top1"] for r in metrics["results"] if r["method"] == "ddoq" and r["ipc"] == 3]
    assert f"{np.mean(ddoq3) * 100:.3f}" in text
    random3 = [r["top1"] for r in metrics["results"] if r["method"] == "random" and r["ipc"] == 3]
    assert f"<td>{100 * (np.mean(ddoq3) - np.mean(random3)):+.1f}</td>" in text  # Δ random, from engine/report/stats.py
    assert "<th>p (Welch)</th>" in text and "<th>LRS</th>" in text and "label-robust score" in text
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics  # the report never rewrites metrics


def test_report_shows_how_realistic_each_set_is(tmp_path):
    metrics = make_run(tmp_path)
    figures = {"images": 3, "class_agreement": 0.5, "frechet_distance": 12.25, "precision": 0.75, "recall": 0.125}
    metrics["set_quality"] = {"reference": {"images": 40, "class_agreement": 0.975},
                              "d4m-uniform-ipc3": figures, "random-ipc3": {**figures, "class_agreement": 1.0}}
    store.atomic_write_json(tmp_path / "metrics.json", metrics)
    text = write_report(tmp_path).read_text()
    section = text.split("<h2>How realistic each set is</h2>")[1].split("<h2>")[0]
    assert "40 real validation images" in section and "97.5 %" in section
    assert section.index("random-ipc3") < section.index("d4m-uniform-ipc3")  # real images first
    assert "12.250" in section and "0.125" in section


def test_sets_of_two_runs_are_drawn_side_by_side(tmp_path):
    """jobs/compare_images.py: the named sets of each run in one grid, written inside the first run folder; a set
    a run lacks is one sentence naming it and what the run has."""
    import sys
    from pathlib import Path

    import pytest

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    import compare_images

    for name in ("latent", "noise"):
        make_run(tmp_path / name)
    sets = compare_images.gather([tmp_path / "latent", tmp_path / "noise"], 3, ["random", "ddoq"])
    assert list(sets) == ["latent/random", "latent/ddoq", "noise/random", "noise/ddoq"]
    compare_images.main([str(tmp_path / "latent"), str(tmp_path / "noise"), "--ipc", "3", "--sets", "random", "ddoq"])
    image = Image.open(tmp_path / "latent" / "report" / "compare-ipc3.png")
    assert image.size[0] > 200 and image.size[1] > 200
    with pytest.raises(SystemExit, match="no set 'ddoq-sqrt' at IPC 3; it has"):
        compare_images.gather([tmp_path / "latent"], 3, ["ddoq-sqrt"])
