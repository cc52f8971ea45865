"""Every student result of one or more run folders as Markdown tables: one table per (protocol, teacher,
student), a row per set (method and weighting) and IPC: top-1 % as mean ± std over seeds (n seeds), the difference
to `random` at that IPC in top-1 points, Welch's t-test p of the two sets of seeds, and DD-Ranking's label-robust
score (engine/report/stats.py); then a teacher x student table for every set trained under more than one (teacher,
student) pairing.

    python jobs/results.py runs/fashion_mnist [runs/other ...] [--select last|best_val] [--pool] [--csv rows.csv]

--pool reads the run folders as one run: the way to add seeds to a finished run without retraining its students
(copy the folder, re-run the copy with --overwrite and evaluate.seeds=[3,4], quantize.random_draws=5, so the new
seeds' `random` students get new subsets), and the way to set runs of the latent and the noise space side by side:
sets quantized in the noise space are named by it (`ddoq (noise)`), and a real-image student both runs trained
alike (`random`, same subset and seed) counts once. It refuses runs that hold the same student (set, IPC, seed)
twice with different scores, or train a set for different epochs.

--select picks which top-1 of each student the tables show: after its last step, or with its weights at its
best validation report (rows since the evaluation kept both; validation alone chose the weights). Runs with a
grid of learning rates (evaluate.learning_rates) get two tables: every set at its protocol's rate (fixed), and at
the rate its students scored best on validation (selected).

Reads runs/<name>/results/<key>/*.json, the rows the evaluation writes (each names its method, weights, IPC,
protocol, student, teacher and seed), so runs of the same folder under different protocols or students land in
one report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory
from engine.evaluate.sets import REAL_METHODS
from engine.io.location import location
from engine.io.store import atomic_write_bytes
from engine.report.stats import (compare_to_random, format_delta, format_lrs, format_mean_std, format_p,
                                 rows_at_learning_rate)

METHOD_ORDER = ["random", "herding", "kcenter", "d4m", "ddoq", "full"]
GROUP = ["protocol", "teacher", "student"]


def quantize_space(run_dir) -> str:
    """The space a run quantized in (quantize.space of its config.yaml; latent for folders without one)."""
    config = location(run_dir) / "config.yaml"
    if not config.exists():
        return "latent"
    return (yaml.safe_load(config.read_text()) or {}).get("quantize", {}).get("space", "latent")


def load_rows(run_dirs: list[Path]) -> pd.DataFrame:
    """Every result row of the runs, with the run's name and, for decoded sets, the space they were quantized in:
    sets of the noise space are named by it (`ddoq (noise)`), so runs of both spaces can share a table."""
    rows = []
    for run_dir in run_dirs:
        space = quantize_space(run_dir)
        for path in sorted(location(run_dir).glob("results/*/*.json")):
            row = json.loads(path.read_text())
            if "protocol" in row:  # rows of the current evaluation (older rows lack the fields to group them)
                decoded = row["method"] not in (*REAL_METHODS, "full")  # quantized in the run's space
                method = f"{row['method']} ({space})" if decoded and space != "latent" else row["method"]
                rows.append({**row, "method": method, "run": location(run_dir).name, "space": space if decoded else ""})
    if not rows:
        raise SystemExit(f"no result rows under {', '.join(map(str, run_dirs))}")
    return pd.DataFrame(rows)


def pool_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of several runs as one run named by all of them: seeds trained in separate runs of one config, and runs
    in the latent and the noise space, whose decoded sets are rows of their own (`ddoq (noise)`). A real-image
    student both runs trained (the same subset and seed: `random` of a noise-space run) is kept once when both
    scored the same; differing copies are refused."""
    identity = GROUP + ["method", "weights", "ipc", "seed", "space"] + \
        (["learning_rate"] if "learning_rate" in frame else [])
    frame = frame.drop_duplicates(identity + [c for c in ("top1_last", "top1") if c in frame])
    twice = frame[frame.duplicated(identity, keep=False)]
    if len(twice):
        row = twice.iloc[0]
        raise SystemExit(f"--pool: {row.method} at IPC {row.ipc}, seed {row.seed} is in "
                         f"{' and '.join(sorted(set(twice[twice.method == row.method].run)))}: pool only runs of "
                         f"different seeds (evaluate.seeds), or leave --pool out to see each run on its own")
    epochs = frame[frame.method != "full"].groupby(GROUP + ["method", "ipc"]).epochs.nunique()
    if (epochs > 1).any():
        raise SystemExit(f"--pool: the runs train {epochs[epochs > 1].index[0][3]} for different epochs "
                         f"(evaluate.student_epochs): their seeds do not measure the same thing")
    return frame.assign(run="+".join(dict.fromkeys(frame.run)))


def method_order(methods: pd.Series) -> pd.Series:
    """Each method's place in METHOD_ORDER (methods it does not name go last): the row order of every table."""
    return methods.str.split(" ").str[0].map({m: i for i, m in enumerate(METHOD_ORDER)}).fillna(len(METHOD_ORDER))


def tables(frame: pd.DataFrame) -> str:
    out = []
    summaries = dict(iter(compare_to_random(frame, ["run"] + GROUP).groupby(["run"] + GROUP, sort=False)))
    for key, part in frame.groupby(["run"] + GROUP, sort=True):
        run, protocol, teacher, student = key
        out.append(f"### {run}: protocol `{protocol}`, teacher `{teacher}`, student `{student}`\n")
        out.append("| method | weights | IPC | top-1 % | Δ random | p | LRS |")
        out.append("|---|---|---|---|---|---|---|")
        rows = summaries[key]  # by IPC, `random` first in each, `full` last
        rows = rows.assign(order=method_order(rows.method), last=rows.method == "full")
        for row in rows.sort_values(["last", "ipc", "order", "method", "weights"]).itertuples():
            top1 = format_mean_std(row.mean, row.std, row.seeds)
            if row.method == "full":
                out.append(f"| full train split | – | all | {top1} | – | – | – |")
                continue
            weights = row.weights if row.weights != "none" else "–"
            out.append(f"| {row.method} | {weights} | {row.ipc} | {top1} | {format_delta(row.delta)} | "
                       f"{format_p(row.p)} | {format_lrs(row.lrs)} |")
        teacher_top1 = part.teacher_top1.dropna()
        if len(teacher_top1):
            out.append(f"\nteacher top-1: {100 * teacher_top1.iloc[0]:.1f} %; epochs per student: "
                       f"{sorted(set(part[part.method != 'full'].epochs))}\n")
        else:
            out.append(f"\nno teacher (hard labels); epochs per student: {sorted(set(part[part.method != 'full'].epochs))}\n")
    if out:
        out.append(HOW_TO_READ)
    return "\n".join(out)


HOW_TO_READ = ("top-1 %: mean ± population std over seeds (seeds in brackets; one seed: no std). Δ random: the mean "
               "minus `random`'s at the same IPC, protocol, teacher and student, in top-1 points. p: Welch's t-test "
               "of the two sets of seeds (two-sided; needs 2+ seeds per side; < 0.05: unlikely to be seed noise). "
               "LRS: DD-Ranking's label-robust score in [0, 1] (needs `random` and `full`; 0.269 when a set equals "
               "both). –: not available.\n")


def cross_architecture(frame: pd.DataFrame) -> str:
    """Teacher x student tables, one per (run, protocol, set, IPC) trained under more than one pairing: how a set
    distilled once transfers across architectures. Each cell: top-1 mean ± std (seeds), then, where `random` was
    trained under the same pairing and IPC, the difference to it with its Welch p."""
    out = []
    summary = compare_to_random(frame, ["run"] + GROUP)
    summary = summary[summary.method != "full"]
    for (run, protocol, method, weights, ipc), part in summary.groupby(["run", "protocol", "method", "weights", "ipc"]):
        teachers, students = sorted(part.teacher.unique()), sorted(part.student.unique())
        if len(teachers) * len(students) < 2:
            continue
        label = f"{method}" + (f" ({weights})" if weights != "none" else "")
        out.append(f"### {run}: protocol `{protocol}`, {label}, IPC {ipc}: teacher (rows) x student (columns)\n")
        out.append("| teacher | " + " | ".join(students) + " |")
        out.append("|---|" + "---|" * len(students))
        for teacher in teachers:
            cells = []
            for student in students:
                rows = part[(part.teacher == teacher) & (part.student == student)]
                if not len(rows):
                    cells.append("–")
                    continue
                row = rows.iloc[0]
                text = format_mean_std(row["mean"], row["std"], row["seeds"])
                if method != "random" and row["delta"] == row["delta"]:  # `random` trained under this pairing
                    text += f"; Δ random {format_delta(row['delta'])} (p {format_p(row['p'])})"
                cells.append(text)
            out.append(f"| {teacher} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def validation_curves(frame: pd.DataFrame) -> str:
    """One table per (run, protocol, teacher, student): a row per set and IPC with the validation top-1 at each of
    its reports (mean over seeds, each report's step in brackets) and the report where that mean peaks. Says
    whether a set's students were still learning at the end (a curve still rising: more epochs would help) or
    peaked early (more epochs only overfit its few images)."""
    if "val_curve" not in frame:
        return ""
    frame = frame[frame.val_curve.apply(lambda curve: isinstance(curve, list) and len(curve) > 0)]
    out = []
    for (run, protocol, teacher, student), part in frame.groupby(["run"] + GROUP, sort=True):
        out.append(f"### {run}: validation top-1 % at each report, protocol `{protocol}`, teacher `{teacher}`, "
                   f"student `{student}` (mean over seeds)\n")
        out.append("| method | weights | IPC | seeds | curve: val top-1 (step) | peak |")
        out.append("|---|---|---|---|---|---|")
        part = part.assign(order=method_order(part.method))
        for (ipc, _, method, weights), rows in part.groupby(["ipc", "order", "method", "weights"], sort=True):
            length = min(len(curve) for curve in rows.val_curve)  # seeds of one set report at the same steps
            steps = [step for step, _ in rows.val_curve.iloc[0][:length]]
            mean = [100 * sum(curve[i][1] for curve in rows.val_curve) / len(rows) for i in range(length)]
            best = max(range(length), key=mean.__getitem__)
            cells = " → ".join(f"{value:.1f} ({step})" for step, value in zip(steps, mean))
            out.append(f"| {'full train split' if method == 'full' else method} | "
                       f"{weights if weights != 'none' else '–'} | {ipc if method != 'full' else 'all'} | {len(rows)} | "
                       f"{cells} | report {best + 1} of {length} |")
        out.append("")
    return "\n".join(out)


CSV_COLUMNS = ["run", "protocol", "teacher", "student", "method", "space", "weights", "ipc", "seed", "draw", "epochs",
               "learning_rate", "top1_last", "top1_best_val", "val_top1", "teacher_top1", "seconds"]


def write_csv(frame: pd.DataFrame, path) -> None:
    """One line per student, in a stable order: the data behind a results table, for docs and spreadsheets."""
    columns = [c for c in CSV_COLUMNS if c in frame]
    ordered = frame[columns].sort_values([c for c in ("run", "protocol", "ipc", "method", "seed") if c in columns])
    text = ordered.to_csv(index=False)  # audit: no path given, it returns the text
    atomic_write_bytes(path, text.encode())
    print(f"{len(ordered)} student rows written to {path}\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="run folders: local paths or URIs (s3://bucket/runs/digits)")
    parser.add_argument("--curves", action="store_true",
                        help="also print each set's validation curve (rows written since the rows kept one)")
    parser.add_argument("--select", choices=["last", "best_val"],
                        help="which top-1 of each student to show (default: what each run chose, evaluate.select)")
    parser.add_argument("--pool", action="store_true",
                        help="read the run folders as one run (seeds of one config trained in separate runs)")
    parser.add_argument("--csv", metavar="PATH",
                        help="also write every student's row (each run's own, before --pool) to this CSV file")
    args = parser.parse_args(argv)
    frame = load_rows(args.run_dirs)
    if args.csv:
        write_csv(frame, args.csv)
    if args.pool:
        frame = pool_runs(frame)
    if args.select:
        column = f"top1_{args.select}"
        if column not in frame or frame[column].isna().any():
            raise SystemExit(f"--select {args.select}: some rows have no {column} (written before the evaluation "
                             f"kept it); leave --select out for them")
        frame = frame.assign(top1=frame[column])
    print(f"top-1 measured with each student's {args.select or 'configured (evaluate.select)'} weights\n")
    if "learning_rate" in frame and frame.learning_rate.nunique() > 1:  # a grid (evaluate.learning_rates)
        print("## Fixed: every set at its protocol's learning rate\n")
        print(tables(rows_at_learning_rate(frame, "protocol", ["run"] + GROUP)))
        chosen = rows_at_learning_rate(frame, "selected", ["run"] + GROUP)
        print("## Selected: every set at the learning rate of its best mean validation top-1\n")
        print(tables(chosen))
        rates = chosen.groupby(["run"] + GROUP + ["method", "weights", "ipc"]).learning_rate.first()
        print("chosen rates: " + ", ".join(f"{m}/{w}/IPC {k}: {r:g}" for (*_, m, w, k), r in rates.items()) + "\n")
    else:
        print(tables(frame))
    print(cross_architecture(frame))
    if args.curves:
        print(validation_curves(frame))


if __name__ == "__main__":
    sys.exit(main())
