"""Ray Tune sweeps over any config key (IPC, guidance, strength, weights mode, ...), with shared stage outputs.

    python tune/sweep.py [--config configs/digits.yaml] [--search-space tune/spaces/digits.yaml] [--smoke-test]
                         [--max-concurrent N] [key.path=value ...]
    ray job submit --working-dir . -- python tune/sweep.py --smoke-test

Work sharing: before Tune starts, the driver encodes once per (data, prior) and quantizes once per (latents,
quantizer settings) at the union of every IPC the space can draw, into <runs_dir>/<name>-sweep/shared/. A trial
then only decodes its centroids and trains its students (Ray Train, reporting to Tune through
TuneReportCallback), in its own folder trials/t-<hash of its parameters>/ — so a re-run skips finished trials too.
Outputs in <runs_dir>/<name>-sweep/: trials.parquet (also printed), best_config.yaml, accuracy_vs_ipc.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from any directory

import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from engine import pipeline  # noqa: E402
from engine.config import ConfigError, DistillConfig, config_hash, config_to_dict, load_config  # noqa: E402
from engine.io.location import location, ray_storage  # noqa: E402

DEFAULT_SPACE = ROOT / "tune" / "spaces" / "digits.yaml"
SMOKE_SPACE = ROOT / "tune" / "spaces" / "smoke.yaml"
# Keys whose stages run once per sweep in the driver, not per trial: a trial cannot draw them from a
# continuous distribution (the driver must know every value in advance). ipc only selects among the shared
# centroids (and evaluate.ddoq_weights among their weight columns), so it stays free per trial.
SHARED_PREFIXES = ("data.", "prior.", "encode.", "quantize.")
PER_TRIAL_QUANTIZE_KEYS = ("quantize.ipc",)
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
TRIAL_CPU = 0.01  # a trial's own process only waits on its stages; Ray rejects 0


def log(message: str) -> None:
    print(f"[sweep {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass(frozen=True)
class SearchSpace:
    params: dict  # dotted key -> {distribution: values}
    fixed: tuple[str, ...]  # dotted overrides applied to every trial
    num_samples: int = 1  # random search: samples; with grids: repeats of the whole grid
    scheduler: str = "asha"  # "asha" or "none"
    grace_period: int = 1  # ASHA: reports a trial always gets before it can be stopped
    reduction_factor: int = 2
    noise: bool = False  # a trial may quantize in the noise space: the inversion's keys are shared (noise_sweep)


def load_search_space(path: str | Path, base: DistillConfig) -> SearchSpace:
    """Read and validate a search-space YAML against the config (every key must be a real config key)."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(raw) - {"params", "fixed", "num_samples", "scheduler", "asha"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}")
    params = raw.get("params") or {}
    if not params:
        raise ConfigError(f"{path}: `params` must name at least one dotted config key")
    for key, spec in params.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"{path}: params.{key} must be one of {{{', '.join(DISTRIBUTIONS)}: ...}}")
        kind = next(iter(spec))
        if is_shared(key, noise_sweep(params, raw.get("fixed") or {})) and kind not in ("grid", "choice"):
            raise ConfigError(f"params.{key}: stages shared by trials need known values; use grid or choice")
        if key == "quantize.ipc" and kind not in ("grid", "choice"):
            raise ConfigError("params.quantize.ipc: use grid or choice (the driver quantizes every IPC once)")
    fixed = tuple(f"{k}={json.dumps(v)}" for k, v in (raw.get("fixed") or {}).items())
    asha = raw.get("asha") or {}
    space = SearchSpace(params, fixed, int(raw.get("num_samples", 1)), raw.get("scheduler", "asha"),
                        int(asha.get("grace_period", 1)), int(asha.get("reduction_factor", 2)),
                        noise_sweep(params, raw.get("fixed") or {}))
    if space.scheduler not in ("asha", "none"):
        raise ConfigError(f"{path}: scheduler must be asha or none")
    for combo in shared_combinations(space):  # every key and value must build a valid config
        trial_config(base, space, {**combo, **{k: first_value(v) for k, v in params.items()}}, Path("/tmp"))
    return space


def first_value(spec: dict):
    kind, values = next(iter(spec.items()))
    return values[0] if kind in ("grid", "choice") else (int(values[0]) if kind == "randint" else values[0])


def tune_domain(spec: dict):
    from ray import tune

    kind, values = next(iter(spec.items()))
    return {"grid": tune.grid_search, "choice": tune.choice}[kind](list(values)) if kind in ("grid", "choice") \
        else getattr(tune, kind)(*values)


def noise_sweep(params: dict, fixed: dict) -> bool:
    """Whether a trial may quantize in the noise space (its `quantize.space` drawn, or fixed to noise)."""
    return "quantize.space" in params or fixed.get("quantize.space") == "noise"


def is_shared(key: str, noise: bool) -> bool:
    """A key whose stage the driver runs once per value before the trials: data, prior, encode and quantize keys
    (but the IPC), and in a noise-space sweep the decode keys the inversion depends on (pipeline.INVERT_KEYS)."""
    if key in PER_TRIAL_QUANTIZE_KEYS:
        return False
    return key.startswith(SHARED_PREFIXES) or (noise and key in pipeline.INVERT_KEYS)


def shared_combinations(space: SearchSpace) -> list[dict]:
    """Every combination of the shared-stage keys the space can draw (IPC excluded)."""
    keys = [k for k in space.params if is_shared(k, space.noise)]
    values = [next(iter(space.params[k].values())) for k in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def all_ipcs(base: DistillConfig, space: SearchSpace) -> tuple[int, ...]:
    spec = space.params.get("quantize.ipc")
    if spec is None:
        return tuple(base.quantize.ipc)
    drawn = set()
    for value in next(iter(spec.values())):
        drawn |= set(value) if isinstance(value, (list, tuple)) else {value}
    return tuple(sorted(int(k) for k in drawn))


def trial_config(base: DistillConfig, space: SearchSpace, params: dict, sweep_dir: Path) -> DistillConfig:
    """The base config + the space's fixed overrides + this trial's parameters, in its own run folder."""
    values = config_to_dict(base)
    overrides = space.fixed + tuple(f"{k}={json.dumps(v)}" for k, v in params.items())
    config = load_config(None, overrides, values=values)
    name = "t-" + config_hash(config)  # the whole trial config: a re-run finds it, any change gets a new folder
    return dataclasses.replace(config, runs_dir=str(location(sweep_dir) / "trials"), name=name)


def shared_folder(config: DistillConfig, sweep_dir):
    """Where the quantized centroids for this trial's (data, prior, quantizer[, inversion]) live: IPC excluded."""
    quantizer = dataclasses.replace(config.quantize, ipc=(1,))
    inversion = pipeline.invert_identity(config) if quantizer.space == "noise" else ()
    return location(sweep_dir) / "shared" / f"quantize-{config_hash(config.data, config.prior, quantizer, *inversion)}"


def prepare_shared_stages(base: DistillConfig, space: SearchSpace, sweep_dir) -> list:
    """Encode once per (data, prior) and quantize once per (latents, quantizer) at every IPC the sweep can use."""
    ipcs = all_ipcs(base, space)
    folders = []
    for combo in shared_combinations(space):
        config = trial_config(base, space, combo, sweep_dir)
        config = dataclasses.replace(config, quantize=dataclasses.replace(config.quantize, ipc=ipcs))
        prior = pipeline.prepare_prior(config)
        encode_dir = location(sweep_dir) / "shared" / f"encode-{config_hash(config.data, config.prior)}"
        encoded = pipeline.encode_stage(config, encode_dir, prior)
        target = shared_folder(config, sweep_dir)
        encoded = pipeline.invert_stage(config, target, prior, encoded)  # the latents themselves in the latent space
        pipeline.quantize_stage(config, target, encoded)
        folders.append(target)
    return folders


def run_trial(params: dict, base: DistillConfig, space: SearchSpace, sweep_dir: str) -> None:
    """One Tune trial: decode this trial's centroids, train its students; Ray Train reports reach Tune."""
    import ray
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from engine.io import store
    from engine.io.run_folder import save_config

    config = trial_config(base, space, params, sweep_dir)
    finished = config.run_dir / "metrics.json"
    if finished.exists():  # done in an earlier run of the sweep: nothing to train, so Tune gets its rows
        report_rows(json.loads(finished.read_text())["results"])
        return
    shared = shared_folder(config, sweep_dir)
    marker = json.loads(store.stage_marker(shared, "quantize").read_text())
    quantized = pipeline.Quantized(marker["key"], shared / "quantized" / marker["key"],  # every IPC of the sweep
                                   marker.get("grey", False))
    prior = pipeline.prepare_prior(config)  # cached by the driver: a load, not a training
    config = pipeline.resolve_channels(config, quantized.grey)
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    # Tune runs a trial inside a placement group that captures its child tasks: Ray Data's decode actors would
    # wait forever for CPUs inside the trial's 0.01-CPU group. Run the stages from a task outside any group
    # (the trainer makes its own group anyway); the rule in max_concurrent_trials sizes them.
    outside = ray.remote(num_cpus=0)(_decode_and_evaluate).options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    results, timings = ray.get(outside.remote(config, run_dir, prior, quantized, (TuneReportCallback(),)))
    store.atomic_write_json(run_dir / "metrics.json", {"params": params, "results": results, "timings_s": timings})
    # Students finished in an earlier run of the sweep (one ASHA stopped before its metrics.json) train nothing now
    # and report nothing through Ray Train; Tune fails a trial without its metric, so the rows are reported here,
    # after metrics.json: a stop at this report loses nothing.
    report_rows(results)


def report_rows(rows: list[dict]) -> None:
    """Each result row's validation top-1 to Tune (the last report of its job)."""
    from ray import tune

    from engine.evaluate.sets import SetKey

    for row in rows:
        key = SetKey(row["method"], row["weights"], row["ipc"])
        job = pipeline.job_name(key, row["student"], row["seed"])
        tune.report({"job": job, "step": 0, "val_top1": row["val_top1"]})


def _decode_and_evaluate(config, run_dir, prior, quantized, callbacks) -> tuple[list, dict]:
    """engine/pipeline.py's decode + baselines + evaluate, as a Ray task body -> (result rows, stage timings)."""
    timings: dict[str, float] = {}
    results = pipeline.decode_and_evaluate(config, run_dir, prior, quantized, timings, train_callbacks=callbacks)
    return results, timings


def peak_trial_resources(config: DistillConfig, streams: bool = False) -> dict[str, float]:
    """What one trial holds at its busiest: its own process plus the larger of its decode actors and its
    trainer (a trial runs them one after the other, never together). `streams`: the trainer reads a real split
    through Ray Data (engine/ray/evaluate.py: the test split when not in memory, the train split for `full`),
    whose tasks need their CPU free beside it."""
    from engine.ray.cluster import stage_resources

    stages = stage_resources(config)
    cpu = max(stages.decode_cpus, stages.trainer_and_stream_cpus(streams))
    return {"CPU": TRIAL_CPU + cpu, "GPU": float(max(stages.decode_gpus, stages.trainer_gpus))}


def trial_streams(config: DistillConfig) -> bool:
    """Whether a trial's trainer reads a real split through Ray Data: `full` streams train, and a test split
    larger than the evaluation holds in memory streams for every job's final top-1."""
    from engine.ray.evaluate import held_out_streams

    return "full" in config.evaluate.methods or held_out_streams(config)


def max_concurrent_trials(config: DistillConfig, cluster: dict[str, float], autoscaling: bool = False,
                          streams: bool = False) -> int:
    """The rule that keeps a sweep from starving its own trainers: run only as many trials at once as can all
    be at their peak together. Tune reserves only TRIAL_CPU per trial, and a trial's trainer asks for its
    workers later; if N trials each held a CPU and then all waited for a trainer's CPU, none could start
    (measured on 2 CPUs: two 1-CPU trials deadlock). On an autoscaling cluster whose GPU group is at 0 nodes,
    pass --max-concurrent to size for the nodes the autoscaler may add."""
    peak = peak_trial_resources(config, streams)
    if peak["CPU"] > cluster.get("CPU", 0.0) + 1e-9 and not autoscaling:
        raise ConfigError(f"one trial needs {peak['CPU']:g} CPUs at its peak (its process + trainer and its data "
                          f"stream, or decoders) but the cluster has {cluster.get('CPU', 0.0):g}: its trainer (or "
                          f"the stream feeding it) could never start. Lower "
                          f"runtime.train_cpus_per_worker / runtime.decode_actors (or pass --max-concurrent on an "
                          f"autoscaling cluster).")
    fits = [math.floor(cluster.get(name, 0.0) / need + 1e-9) for name, need in peak.items() if need > 0]
    return max(1, min(fits))


def trial_val_top1(result, finished_rows: list[dict] | None) -> pd.Series:
    """Validation top-1 of each of a trial's jobs: its result rows when the trial finished (metrics.json: each
    row's val_top1 scores the final model, as its last report does), else each job's last report (a job stopped
    by ASHA counts with the last report it made). A re-run of a sweep finds its finished trials' students done
    and reports nothing for them: without the rows they would rank as NaN."""
    if finished_rows:
        return pd.Series([float(r["val_top1"]) for r in finished_rows], dtype=float)
    history = result.metrics_dataframe
    reported = history is not None and {"job", "val_top1"} <= set(history.columns)
    return history.groupby("job", sort=False).val_top1.last() if reported else pd.Series(dtype=float)


def trials_table(grid, space: SearchSpace, jobs_per_trial: int, finished_rows=lambda params: None) -> pd.DataFrame:
    """One row per trial, best first. `finished_rows(params)`: the result rows of a trial that finished (its
    metrics.json), or None."""
    rows = []
    for result in grid:
        # A trial is ranked by validation top-1 (engine/data/splits.py), never by test: the mean over its jobs.
        top1 = trial_val_top1(result, finished_rows({k: result.config.get(k) for k in space.params}))
        rows.append({**{k: result.config.get(k) for k in space.params},
                     "val_top1_mean": float(top1.mean()) if len(top1) else float("nan"),
                     "val_top1_std": float(top1.std(ddof=0)) if len(top1) else float("nan"),
                     "jobs_done": int(len(top1)), "jobs": jobs_per_trial,
                     "stopped_early": bool(result.error is None and len(top1) < jobs_per_trial),
                     "error": "" if result.error is None else str(result.error).splitlines()[0][:200],
                     "trial_dir": str(result.path)})
    for key in space.params:  # lists (e.g. an IPC tuple) as text, so parquet gets one type per column
        rows_key = [r[key] for r in rows]
        if any(isinstance(v, (list, tuple)) for v in rows_key):
            for r in rows:
                r[key] = json.dumps(r[key])
    return pd.DataFrame(rows).sort_values("val_top1_mean", ascending=False, na_position="last").reset_index(drop=True)


def run_sweep(base: DistillConfig, space: SearchSpace, max_concurrent: int | None = None) -> dict:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from engine.io import store
    from engine.io.run_folder import save_config
    from engine.ray.cluster import cluster_span, init_ray
    from engine.report.run_report import plot_sweep_accuracy

    # Absolute: Tune runs each trial in its own working directory.
    base = dataclasses.replace(base, runs_dir=str(location(base.runs_dir).resolve()),
                               cache_dir=str(base.cache_path.expanduser().resolve()))
    span = cluster_span(base.runtime)  # node-local paths on several nodes: refused before anything is written
    pipeline.check_cluster_places(base, span.nodes, span.address)
    sweep_dir = location(base.runs_dir) / f"{base.name}-sweep"
    sweep_dir.mkdir(parents=True, exist_ok=True)
    init_ray(base.runtime)
    if __name__ != "__main__":  # imported (tests): ship run_trial by value, workers need not find tune/ on a path
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    # The resource rule first: a config whose trials could never run is refused before hours of encoding.
    example = trial_config(base, space, {k: first_value(v) for k, v in space.params.items()}, sweep_dir)
    jobs_per_trial = len(pipeline.student_jobs(example, {}))
    streams = trial_streams(example)
    concurrent = max_concurrent or max_concurrent_trials(example, ray.cluster_resources(), streams=streams)

    start = time.perf_counter()
    shared = prepare_shared_stages(base, space, sweep_dir)
    log(f"shared stages ready in {time.perf_counter() - start:.0f}s: {len(shared)} quantized set(s)")
    if pipeline.needs_teacher(example):  # once, before any trial: concurrent trials would each train their own
        pipeline.prepare_teacher(example, sweep_dir / "shared" / "teacher")
    log(f"trials: {jobs_per_trial} student job(s) each, at most {concurrent} at once "
        f"(peak per trial {peak_trial_resources(example, streams)}, cluster {ray.cluster_resources()})")
    scheduler = None
    if space.scheduler == "asha":
        # One Tune iteration per ray.train.report: evaluate.reports per student job (one more where its steps do
        # not divide evenly: the last step always reports). max_t one past the last report: ASHA stops a trial
        # that reaches max_t, and a trial must finish its jobs to write its files.
        reports = jobs_per_trial * (example.evaluate.reports + 1)
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max(reports, space.grace_period) + 1,
                                  grace_period=space.grace_period, reduction_factor=space.reduction_factor)
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base, space=space,
                                                         sweep_dir=str(sweep_dir)), {"cpu": TRIAL_CPU})
    tuner = tune.Tuner(
        trainable,
        param_space={k: tune_domain(v) for k, v in space.params.items()},
        tune_config=tune.TuneConfig(metric="val_top1", mode="max", scheduler=scheduler, num_samples=space.num_samples,
                                    max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name="tune", **ray_storage(sweep_dir), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    grid = tuner.fit()
    def finished_rows(params: dict) -> list[dict] | None:
        metrics = trial_config(base, space, params, sweep_dir).run_dir / "metrics.json"
        return json.loads(metrics.read_text())["results"] if metrics.exists() else None

    table = trials_table(grid, space, jobs_per_trial, finished_rows)
    store.atomic_write_table(sweep_dir / "trials.parquet", __import__("pyarrow").Table.from_pandas(table))
    finished = table[table.error == ""].dropna(subset=["val_top1_mean"])
    if finished.empty:
        raise RuntimeError(f"every trial failed; first error: {table.error.iloc[0]}")
    best_params = {k: _from_cell(finished.iloc[0][k]) for k in space.params}
    # Runnable as is (`jobs/distill.py --config best_config.yaml`), into runs_dir/<name>-best, not a trial folder.
    best = dataclasses.replace(trial_config(base, space, best_params, sweep_dir), runs_dir=base.runs_dir,
                               name=f"{base.name}-best")
    save_config(best, sweep_dir / "best_config.yaml")
    plot = plot_sweep_accuracy(table, sweep_dir / "accuracy_vs_ipc.png")
    history = store.stage_history(sweep_dir)
    counts = {stage: sum(1 for h in history if h["stage"] == stage) for stage in ("encode", "quantize", "decode")}
    return {"sweep_dir": sweep_dir, "table": table, "best": best_params, "plot": plot, "stage_runs": counts}


def _from_cell(value):
    if hasattr(value, "item"):
        return value.item()
    return json.loads(value) if isinstance(value, str) and value.startswith("[") else value


def parse_args(argv=None) -> tuple[DistillConfig, SearchSpace, int | None]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(pipeline.DEFAULT_CONFIG), help="base config (default: digits)")
    parser.add_argument("--search-space", default=None, help=f"search-space YAML (default: {DEFAULT_SPACE.name}; "
                                                             f"{SMOKE_SPACE.name} with --smoke-test)")
    parser.add_argument("--smoke-test", action="store_true", help="2 x 2 trials of jobs/distill.py's smoke run")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="trials at once (default: as many as the cluster holds at their peak)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the base config")
    args = parser.parse_intermixed_args(argv)  # flags may follow the overrides
    overrides = (pipeline.SMOKE_OVERRIDES if args.smoke_test else ()) + tuple(args.overrides)
    base = load_config(args.config, overrides)
    space_path = args.search_space or (SMOKE_SPACE if args.smoke_test else DEFAULT_SPACE)
    return base, load_search_space(space_path, base), args.max_concurrent


def main(argv=None) -> dict:
    from engine.config import RunError
    from engine.data.images import TooManyBadRows
    from engine.data.rows import SourceError

    start = time.perf_counter()
    try:  # problems the user can fix are one sentence, not a traceback
        base, space, max_concurrent = parse_args(argv)
        out = run_sweep(base, space, max_concurrent)
    except (ConfigError, RunError, TooManyBadRows, SourceError) as error:
        print(f"sweep: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(out["table"].drop(columns=["trial_dir"]).to_string(index=False))
    print(f"\nbest: {out['best']}  (full config: {out['sweep_dir'] / 'best_config.yaml'})")
    print(f"stage runs: {out['stage_runs']}")
    print(f"sweep folder: {out['sweep_dir']}  ({time.perf_counter() - start:.0f}s)")
    return out


if __name__ == "__main__":
    main()
