"""End-to-end DDOQ distillation: prior -> encode -> quantize -> decode -> evaluate, on Ray.

    python jobs/distill.py [--config configs/digits.yaml] [--smoke-test] [--overwrite] [--verbose] [key=value ...]
    ray job submit --working-dir . -- python jobs/distill.py --smoke-test

The stages live in engine/pipeline.py (shared with tune/sweep.py); this file parses the command line and prints
the table. Each stage writes into runs/<name>/ with a completion marker keyed by a hash of everything it depends
on, so a re-run (or a killed run started again) skips finished stages and finished student jobs.
On a cluster of several nodes (RAY_ADDRESS) runs_dir, data.path, prior.path and evaluate.teacher_path must name the
same files on every node, URIs or paths under runtime.shared_paths: anything else is refused before the first stage,
and each stage's record (_stages/) names the nodes that did its work (docs/scale.md "Several nodes").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory

from engine.config import DistillConfig, load_config
from engine.pipeline import DEFAULT_CONFIG, SMOKE_OVERRIDES, UNTIL_CHOICES, run


def parse_args(argv=None) -> tuple[DistillConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/digits.yaml)")
    parser.add_argument("--smoke-test", action="store_true", help="tiny fast run of every stage")
    parser.add_argument("--until", choices=UNTIL_CHOICES, default="evaluate",
                        help="last stage to run: `quantize` stops before decoding (latent W2 only)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what the run folder holds that is not this configuration's run (another "
                             "configuration's outputs, files the engine did not write); stages that still apply are "
                             "reused")
    parser.add_argument("--verbose", action="store_true",
                        help="print Ray's and the libraries' log lines here too (default: into the run folder's "
                             "run.log, the console keeps the engine's progress and results)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. quantize.ipc=10 decode.strength=0.7")
    args = parser.parse_intermixed_args(argv)  # flags may follow the overrides
    overrides = (SMOKE_OVERRIDES if args.smoke_test else ()) + tuple(args.overrides)
    return load_config(args.config, overrides), args


def format_table(metrics: dict) -> str:
    """Top-1 mean ± std over seeds per protocol, student, set and IPC, with the difference to `random` (points),
    Welch's p and DD-Ranking's LRS (engine/report/stats.py); then the latent W2 per IPC."""
    import pandas as pd

    from engine.report.stats import compare_to_random, format_delta, format_lrs, format_p, format_std

    keys = ["protocol", "teacher", "student", "method", "weights", "ipc"]
    summary = compare_to_random(pd.DataFrame(metrics["results"], columns=keys + ["top1"]))
    select = next((row.get("select", "last") for row in metrics["results"]), "last")
    lines = [(f"{'protocol':<8} {'student':<10} {'method':<8} {'weights':<8} {'ipc':>4} {f'top1 {select} (mean ± std)':>20} "
              f"{'seeds':>5} {'Δ random':>9} {'p':>7} {'LRS':>6}")]
    for row in summary.itertuples():
        lines.append(f"{row.protocol:<8} {row.student:<10} {row.method:<8} {row.weights:<8} "
                     f"{row.ipc if row.ipc else 'all':>4} {row.mean:>12.1f} ± {format_std(row.std):>4} {row.seeds:>5} "
                     f"{format_delta(row.delta):>9} {format_p(row.p):>7} {format_lrs(row.lrs):>6}")
    lines.append("(Δ random: top-1 points against `random` at the same IPC, protocol and student; p: Welch's t-test of "
                 "the seeds; LRS: DD-Ranking's label-robust score, 0..1; –: not available)")
    lines.append("")
    lines.append(f"{'ipc':>4} {'distortion':>11} {'W2 uniform':>11} {'W2 mass':>9} {'W2 sqrt':>9} {'mass vs uniform':>16} "
                 f"{'W2 D4M':>8} {'mass vs D4M':>12}")
    for name, q in metrics["quantization"].items():
        lines.append(f"{name[3:]:>4} {q['distortion']:>11.3f} {q['w2_uniform']:>11.3f} {q['w2_mass']:>9.3f} "
                     f"{q['w2_sqrt']:>9.3f} {-100 * q['w2_reduction_mass']:>15.1f}% {q['w2_d4m']:>8.3f} "
                     f"{-100 * q['w2_reduction_mass_vs_d4m']:>11.1f}%")
    lines.append("")
    lines.append("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in metrics["timings_s"].items()))
    return "\n".join(lines)


def run_quietly(config: DistillConfig, until: str, overwrite: bool) -> dict:
    """The run with Ray's and the libraries' log lines in run.log, the console keeping the engine's own."""
    from engine.io.run_folder import run_log_path
    from engine.ray.console import restore_console, send_library_logs_to

    send_library_logs_to(run_log_path(config))
    try:
        return run(config, until, overwrite)
    finally:
        restore_console()


def main(argv=None) -> None:
    from engine.config import RunError
    from engine.config import ConfigError
    from engine.data.images import TooManyBadRows
    from engine.data.rows import SourceError

    start = time.perf_counter()
    try:  # problems the user can fix are one sentence, not a traceback
        config, options = parse_args(argv)
        metrics = (run if options.verbose else run_quietly)(config, options.until, options.overwrite)
    except (ConfigError, RunError, TooManyBadRows, SourceError) as error:
        print(f"distill: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    print()
    print(format_table(metrics))
    print(f"\nrun folder: {config.run_dir}  ({time.perf_counter() - start:.0f}s)")
    if not options.verbose:
        from engine.io.run_folder import run_log_path

        print(f"Ray's and the libraries' log lines: {run_log_path(config)} (--verbose prints them here)")


if __name__ == "__main__":
    main()
