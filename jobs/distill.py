"""End-to-end DDOQ distillation: prior -> encode -> quantize -> decode -> evaluate, on Ray.

    python jobs/distill.py [--config configs/digits.yaml] [--smoke-test] [key.path=value ...]
    ray job submit --working-dir . -- python jobs/distill.py --smoke-test

Each stage writes into runs/<name>/ with a completion marker keyed by a hash of everything it depends on, so a
re-run (or a killed run started again) skips finished stages and finished student jobs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from engine import store  # noqa: E402
from engine.config import DistillConfig, config_hash, load_config, save_config  # noqa: E402

STAGES = ("quantize", "evaluate")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"

# A tiny, fast version of the same run: every stage runs for real, on fewer steps.
SMOKE_OVERRIDES = (
    "name=smoke", "quantize.ipc=[1,2]", "prior.vae_steps=30", "prior.unet_steps=30", "decode.num_steps=4",
    "evaluate.teacher_epochs=1", "evaluate.student_steps=10", "evaluate.full_epochs=1", "evaluate.seeds=[0]",
)


def log(message: str) -> None:
    print(f"[distill {time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv=None) -> tuple[DistillConfig, str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/digits.yaml)")
    parser.add_argument("--smoke-test", action="store_true", help="tiny fast run of every stage")
    parser.add_argument("--until", choices=STAGES, default="evaluate",
                        help="last stage to run: `quantize` stops before decoding (latent W2 only)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. quantize.ipc=10 decode.strength=0.7")
    args = parser.parse_args(argv)
    overrides = (SMOKE_OVERRIDES if args.smoke_test else ()) + tuple(args.overrides)
    return load_config(args.config, overrides), args.until


def student_jobs(config: DistillConfig, set_dirs: dict[tuple[str, int], Path]) -> list[dict]:
    jobs = []
    for method in config.evaluate.methods:
        ipcs = [0] if method == "full" else list(config.quantize.ipc)
        for ipc in ipcs:
            for seed in config.evaluate.seeds:
                weights = {"ddoq": config.quantize.weights, "d4m": "uniform"}.get(method, "none")
                jobs.append({"job": f"{method}-ipc{ipc}-seed{seed}", "method": method, "ipc": ipc, "seed": seed,
                             "weights": weights, "set_dir": str(set_dirs.get((method, ipc), ""))})
    return jobs


def write_random_sets(config: DistillConfig) -> dict[tuple[str, int], Path]:
    from engine.baselines import select_random
    from engine.data import load_split

    train = load_split(config.data, "train")
    dirs = {}
    for ipc in config.quantize.ipc:
        folder = store.distilled_dir(config.run_dir, "random", ipc)
        chosen = select_random(train.labels, ipc, seed=config.quantize.seed)
        files = []
        for rank, i in enumerate(chosen):
            files.append(store.image_file_name(int(train.labels[i]), rank))
            store.write_png(folder / files[-1], train.images[i])
        ones = np.ones(len(chosen))
        store.write_set_index(folder, files, train.labels[chosen], train.class_names, ones, ones.astype(int))
        dirs[("random", ipc)] = folder
    return dirs


def teacher_cache_path(config: DistillConfig) -> Path:
    """Teachers are cached by (dataset, architecture, seed 0, everything that shapes their training)."""
    e = config.evaluate
    key = config_hash(config.data, e.student, e.width, e.teacher_epochs, e.batch_size, e.learning_rate,
                      e.weight_decay, e.flip)
    return config.cache_path / "teachers" / f"{config.data.name}-{e.student}-seed0-{key}.safetensors"


def decode_and_evaluate(config: DistillConfig, run_dir: Path, folder: Path, centroids, quantize_key: str,
                        names: tuple[str, ...], timings: dict, train_callbacks: tuple = ()) -> list[dict]:
    from engine import ray_stages

    # Decode: once per (centroids, decode config).
    start = time.perf_counter()
    methods = config.evaluate.methods
    set_dirs: dict[tuple[str, int], Path] = {}
    latent_methods = [m for m in ("d4m", "ddoq") if m in methods]
    for method in latent_methods:
        set_dirs.update({(method, ipc): store.distilled_dir(run_dir, method, ipc) for ipc in config.quantize.ipc})
    decode_key = config_hash(quantize_key, config.decode, latent_methods)
    if latent_methods and store.finished_stage(run_dir, "decode", decode_key) is None:
        log(f"decoding {centroids.num_rows} centroids (strength {config.decode.strength}, "
            f"guidance {config.decode.guidance_scale}, {config.decode.num_steps} steps)")
        targets = {ipc: [str(set_dirs[(m, ipc)]) for m in latent_methods] for ipc in config.quantize.ipc}
        decoded = ray_stages.decode_centroids_to_sets(config, folder, centroids, targets)
        files = {(r["ipc"], r["label"], r["index"]): r["path"] for r in decoded.to_pylist()}
        rows = centroids.drop_columns(["latent"]).to_pandas()
        for method in latent_methods:
            mode = "uniform" if method == "d4m" else config.quantize.weights
            for ipc in config.quantize.ipc:
                part = rows[rows.ipc == ipc]
                paths = [files[(ipc, label, index)] for label, index in zip(part.label, part["index"])]
                store.write_set_index(set_dirs[(method, ipc)], paths, part.label.to_numpy(), names,
                                      part[f"weight_{mode}"].to_numpy(), part["count"].to_numpy())
        store.mark_stage_finished(run_dir, "decode", decode_key, images=len(files))
    if "random" in methods:
        set_dirs.update(write_random_sets(config))
    timings["decode"] = time.perf_counter() - start

    # Evaluate: every student through Ray Train; finished jobs of the same config are kept.
    start = time.perf_counter()
    evaluate_key = config_hash(decode_key, config.data, config.evaluate)
    results_dir = run_dir / "results" / evaluate_key
    teacher_path = teacher_cache_path(config)
    jobs = student_jobs(config, set_dirs)
    log(f"training {len(jobs)} students ({config.runtime.train_workers} Ray Train worker(s))")
    results = ray_stages.evaluate_students(config, jobs, teacher_path, results_dir, callbacks=train_callbacks)
    timings["evaluate"] = time.perf_counter() - start

    return results


def prepare_prior(config: DistillConfig) -> tuple[Path, tuple[str, ...], tuple[int, ...]]:
    """Load (or train once and cache) the prior -> (its folder, class names, latent shape)."""
    from engine.data import class_names
    from engine.priors import load_or_train_prior, prior_folder

    names = class_names(config.data)
    prior = load_or_train_prior(config.prior, config.data, config.cache_path, log=log)
    folder = prior_folder(config.prior, config.data, config.cache_path)
    if prior.class_names != tuple(names):
        raise ValueError(f"prior {folder} was trained for classes {prior.class_names[:5]}... ({prior.num_classes}), "
                         f"but the data has {len(names)} classes {tuple(names)[:5]}...")
    return folder, tuple(names), tuple(prior.latent_shape)


def encode_stage(config: DistillConfig, run_dir: Path, folder: Path, latent_shape) -> tuple[str, Path, int]:
    """Encode once per (data, prior) into run_dir/latents -> (encode key, latents folder, images encoded)."""
    from engine import ray_stages

    encode_key = config_hash(config.data, config.prior, str(folder.resolve()))
    latents_dir = run_dir / "latents"
    marker = store.finished_stage(run_dir, "encode", encode_key)
    if marker is None:
        log(f"encoding the train split with the prior's VAE (latent shape {latent_shape})")
        encoded = ray_stages.encode_to_parquet(config, folder, latents_dir)
        store.mark_stage_finished(run_dir, "encode", encode_key, images=encoded, latent_shape=latent_shape)
    else:
        encoded = marker["images"]
        log(f"encode: reusing {encoded} latents from an earlier run")
    return encode_key, latents_dir, encoded


def quantize_stage(config: DistillConfig, run_dir: Path, latents_dir: Path, encode_key: str):
    """Quantize once per (latents, quantizer config) into run_dir -> (quantize key, centroids, stats frame)."""
    from engine import ray_stages

    quantize_key = config_hash(encode_key, config.quantize)
    if store.finished_stage(run_dir, "quantize", quantize_key) is None:
        class_dirs = store.class_latent_dirs(latents_dir)
        log(f"quantizing {len(class_dirs)} classes at IPC {list(config.quantize.ipc)} on "
            f"{config.runtime.quantize_actors} actors")
        centroids, stats = ray_stages.quantize_classes(config, class_dirs, run_dir / "quantized" / quantize_key, log)
        store.atomic_write_table(run_dir / "centroids.parquet", centroids)
        store.atomic_write_table(run_dir / "quantization.parquet", stats)
        store.mark_stage_finished(run_dir, "quantize", quantize_key, classes=len(class_dirs))
    centroids = pq.read_table(run_dir / "centroids.parquet")
    stats = pq.read_table(run_dir / "quantization.parquet").to_pandas()
    return quantize_key, centroids, stats


def run(config: DistillConfig, until: str = "evaluate") -> dict:
    from engine import ray_stages
    from engine.report import write_report

    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    timings: dict[str, float] = {}

    start = time.perf_counter()
    folder, names, latent_shape = prepare_prior(config)
    timings["prior"] = time.perf_counter() - start
    ray_stages.init_ray(config.runtime)

    start = time.perf_counter()
    encode_key, latents_dir, encoded = encode_stage(config, run_dir, folder, latent_shape)
    timings["encode"] = time.perf_counter() - start

    start = time.perf_counter()
    quantize_key, centroids, stats = quantize_stage(config, run_dir, latents_dir, encode_key)
    timings["quantize"] = time.perf_counter() - start

    # Decode + the real-image baseline: the distilled sets, then every student.
    results: list[dict] = []
    if until == "evaluate":
        results = decode_and_evaluate(config, run_dir, folder, centroids, quantize_key, names, timings)

    quantization = {
        f"ipc{ipc}": {
            "distortion": float(part.distortion.mean()),
            **{f"w2_{m}": float(part[f"w2_{m}"].mean()) for m in ("uniform", "mass", "sqrt")},
            "w2_reduction_mass": float((1 - part.w2_mass / part.w2_uniform).mean()),
            "w2_reduction_sqrt": float((1 - part.w2_sqrt / part.w2_uniform).mean()),
        }
        for ipc, part in stats.groupby("ipc")
    }
    metrics = {"results": results, "quantization": quantization, "timings_s": {k: round(v, 2) for k, v in
                                                                            timings.items()},
               "counts": {"images_encoded": int(encoded), "classes": int(stats.label.nunique())}}
    store.atomic_write_json(run_dir / "metrics.json", metrics)
    log(f"report: {write_report(run_dir)}")
    return metrics


def format_table(metrics: dict) -> str:
    """Top-1 mean ± std over seeds per method and IPC, then the latent W2 per IPC."""
    import pandas as pd

    frame = pd.DataFrame(metrics["results"], columns=["method", "ipc", "weights", "top1"])
    lines = [f"{'method':<8} {'weights':<8} {'ipc':>4} {'top1 (mean ± std)':>20} {'seeds':>5}"]
    for (method, ipc, weights), part in frame.groupby(["method", "ipc", "weights"], sort=False):
        top1 = part.top1.to_numpy() * 100
        lines.append(f"{method:<8} {weights:<8} {ipc if ipc else 'all':>4} "
                     f"{top1.mean():>12.1f} ± {top1.std():4.1f} {len(top1):>5}")
    lines.append("")
    lines.append(f"{'ipc':>4} {'distortion':>11} {'W2 uniform':>11} {'W2 mass':>9} {'W2 sqrt':>9} {'mass vs uniform':>16}")
    for name, q in metrics["quantization"].items():
        lines.append(f"{name[3:]:>4} {q['distortion']:>11.3f} {q['w2_uniform']:>11.3f} {q['w2_mass']:>9.3f} "
                     f"{q['w2_sqrt']:>9.3f} {-100 * q['w2_reduction_mass']:>15.1f}%")
    lines.append("")
    lines.append("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in metrics["timings_s"].items()))
    return "\n".join(lines)


def main(argv=None) -> None:
    config, until = parse_args(argv)
    start = time.perf_counter()
    metrics = run(config, until)
    print()
    print(format_table(metrics))
    print(f"\nrun folder: {config.run_dir}  ({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
