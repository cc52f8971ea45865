"""Every student result of one or more run folders as Markdown tables: one table per (protocol, teacher,
student), a row per method and weighting, a column per IPC, top-1 % as mean ± std over seeds (n seeds); then a
teacher x student table for every set trained under more than one (teacher, student) pairing.

    python jobs/results.py runs/fashion_mnist [runs/other ...]

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory
from engine.location import location  # noqa: E402

METHOD_ORDER = ["random", "herding", "kcenter", "d4m", "ddoq", "full"]
GROUP = ["protocol", "teacher", "student"]


def load_rows(run_dirs: list[Path]) -> pd.DataFrame:
    rows = []
    for run_dir in run_dirs:
        for path in sorted(location(run_dir).glob("results/*/*.json")):
            row = json.loads(path.read_text())
            if "protocol" in row:  # rows of the current evaluation (older rows lack the fields to group them)
                rows.append({**row, "run": location(run_dir).name})
    if not rows:
        raise SystemExit(f"no result rows under {', '.join(map(str, run_dirs))}")
    return pd.DataFrame(rows)


def cell(top1: pd.Series) -> str:
    values = top1.to_numpy() * 100
    return f"{values.mean():.1f} ± {values.std():.1f} ({len(values)})"


def tables(frame: pd.DataFrame) -> str:
    out = []
    for (run, protocol, teacher, student), part in frame.groupby(["run"] + GROUP, sort=True):
        out.append(f"### {run}: protocol `{protocol}`, teacher `{teacher}`, student `{student}`\n")
        ipcs = sorted(i for i in part.ipc.unique() if i > 0)
        out.append("| method | weights | " + " | ".join(f"IPC {i}" for i in ipcs) + " |")
        out.append("|---|---|" + "---|" * len(ipcs))
        part = part.assign(order=part.method.map({m: i for i, m in enumerate(METHOD_ORDER)}))
        for (_, method, weights), rows in part.groupby(["order", "method", "weights"], sort=True):
            if method == "full":
                out.append(f"| full train split | – | {cell(rows.top1)} (all images) |" + " |" * (len(ipcs) - 1))
                continue
            cells = [cell(rows[rows.ipc == i].top1) if (rows.ipc == i).any() else "–" for i in ipcs]
            out.append(f"| {method} | {weights if weights != 'none' else '–'} | " + " | ".join(cells) + " |")
        teacher_top1 = part.teacher_top1.dropna()
        if len(teacher_top1):
            out.append(f"\nteacher top-1: {100 * teacher_top1.iloc[0]:.1f} %; epochs per student: "
                       f"{sorted(set(part[part.method != 'full'].epochs))}\n")
        else:
            out.append(f"\nno teacher (hard labels); epochs per student: {sorted(set(part[part.method != 'full'].epochs))}\n")
    return "\n".join(out)


def cross_architecture(frame: pd.DataFrame) -> str:
    """Teacher x student tables, one per (run, protocol, set, IPC) trained under more than one pairing: how a set
    distilled once transfers across architectures."""
    out = []
    frame = frame[frame.method != "full"]
    for (run, protocol, method, weights, ipc), part in frame.groupby(["run", "protocol", "method", "weights", "ipc"]):
        teachers, students = sorted(part.teacher.unique()), sorted(part.student.unique())
        if len(teachers) * len(students) < 2:
            continue
        label = f"{method}" + (f" ({weights})" if weights != "none" else "")
        out.append(f"### {run}: protocol `{protocol}`, {label}, IPC {ipc}: teacher (rows) x student (columns)\n")
        out.append("| teacher | " + " | ".join(students) + " |")
        out.append("|---|" + "---|" * len(students))
        for teacher in teachers:
            cells = [cell(rows.top1) if len(rows := part[(part.teacher == teacher) & (part.student == student)])
                     else "–" for student in students]
            out.append(f"| {teacher} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="run folders: local paths or URIs (s3://bucket/runs/digits)")
    args = parser.parse_args(argv)
    frame = load_rows(args.run_dirs)
    print(tables(frame))
    print(cross_architecture(frame))


if __name__ == "__main__":
    sys.exit(main())
