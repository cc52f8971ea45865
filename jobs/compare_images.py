"""Draw the distilled sets of several run folders side by side, one IPC at a time: e.g. the same data distilled in
the latent and in the noise space (quantize.space), or under two decode strengths.

    python jobs/compare_images.py runs/digits-latent runs/digits-noise --ipc 10 [--sets random ddoq-mass d4m]

Each set is named <run>/<set>; the figure is the report's image grid (engine/report/run_report.py), written to
<first run>/report/compare-ipc<k>.png (or --out), inside a run folder like every other output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory
from engine.io.location import location  # noqa: E402
from engine.report.run_report import distilled_sets, plot_image_grid  # noqa: E402


def gather(run_dirs: list, ipc: int, names: list[str]) -> dict[str, Path]:
    """{<run>/<set>: folder} of the sets named (all, when none are) at this IPC, in the order given."""
    sets = {}
    for run_dir in run_dirs:
        found = distilled_sets(run_dir).get(ipc, {})
        if not found:
            raise SystemExit(f"{run_dir} holds no distilled set at IPC {ipc} (distilled/<set>-ipc{ipc}/)")
        for name in names or sorted(found):
            if name not in found:
                raise SystemExit(f"{run_dir} has no set {name!r} at IPC {ipc}; it has {sorted(found)}")
            sets[f"{location(run_dir).name}/{name}"] = found[name]
    return sets


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (runs/<name>)")
    parser.add_argument("--ipc", type=int, required=True)
    parser.add_argument("--sets", nargs="*", default=[], help="set names, e.g. random ddoq-mass d4m (default: all)")
    parser.add_argument("--out", default="", help="the PNG to write (default: <first run>/report/compare-ipc<k>.png)")
    args = parser.parse_args(argv)
    runs = [location(r) for r in args.runs]
    out = location(args.out) if args.out else runs[0] / "report" / f"compare-ipc{args.ipc}.png"
    plot_image_grid(gather(runs, args.ipc, args.sets), args.ipc, out)
    print(out)


if __name__ == "__main__":
    main()
