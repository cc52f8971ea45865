"""The ImageNet-1K rehearsal: the whole data path (prior -> encode -> quantize -> decode -> real-image baselines) on
an ImageNet-shaped dataset at N/4 and at N images, with per-stage time, throughput and peak RSS, side by side.

    python benchmarks/scale.py [--classes 1000] [--per-class N] [--resolution 48] [--only quarter|full]

Data: benchmarks/imagenet_like.py (procedural JPEGs in HF parquet shards, seeded, cached in ~/.cache/ddoq/).
N/4 is the same dataset shape with a quarter of the classes (ImageNet's per-class counts kept), so memory bounded
"by a batch or a class" must come out flat: peak RSS at N / peak at N/4 <= 1.2, stage time ratio <= 4.4.
Each run is `jobs/distill.py --until baselines` in a child process; every process it starts (the driver, Ray's
workers and system processes) is sampled from /proc twice a second for its peak RSS (VmHWM). Runs resume: a
finished run folder is reused (its metrics and the RSS log are kept beside it), so the full run may span sessions.
The bare loop: the same shards read with pyarrow, decoded and encoded by the same VAE in this one process on every
core, without Ray: the encode stage's images/s is printed against it.
Last line: rss_ratio_driver=.. rss_ratio_worker=.. time_ratio_max=.. files_per_class_max=.. decode_actors_busy=../..
encode_vs_bare=..
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import imagenet_like  # noqa: E402

STAGES = ("prior", "encode", "quantize", "decode", "baselines")
WORK = Path(os.path.expanduser(os.environ.get("DDOQ_REHEARSAL_RUNS", "~/.cache/ddoq/rehearsal-runs")))


def rehearsal_overrides(data_root: Path, name: str, resolution: int) -> list[str]:
    """The run: a tiny prior (latents 4x8x8) trained on a bounded sample, IPC 10, a short decode schedule, and every
    pool sized for 2 cores (fractional CPUs leave one for Ray Data's read and write tasks)."""
    return [
        f"name={name}", f"runs_dir={WORK}", "data.source=parquet", f"data.path={data_root}", f"data.name={name}",
        f"data.image_size={resolution}", "prior.vae_channels=[16,32,32]", "prior.unet_channels=[32,64]",
        "prior.vae_steps=300", "prior.unet_steps=300", "prior.train_images=20000",
        "quantize.ipc=[10]", "quantize.nredo=1", "decode.num_steps=10", "decode.batch_size=200",
        "encode.batch_size=512", "evaluate.methods=[random,herding,kcenter,d4m,ddoq]", "evaluate.ddoq_weights=[mass]",
        "runtime.encode_actors=2", "runtime.encode_cpus_per_actor=0.5", "runtime.decode_actors=2",
        "runtime.decode_cpus_per_actor=0.5", "runtime.quantize_actors=2", "runtime.num_cpus=2",
        "runtime.object_store_mb=1024",  # a fixed-size buffer: the workers' share of it cannot grow with N
    ]


def descendants(pid: int) -> list[int]:
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def memory_kb(pid: int) -> tuple[str, int, int] | None:
    """(process title, VmHWM, RssAnon) in KiB of a live process. VmHWM, the kernel's peak RSS, also counts the
    pages of Ray's shared-memory object store a worker has touched, which grow with the run's length up to the
    store's size without any more memory in use; RssAnon is the process's own (private) memory."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    wanted = ("VmHWM", "RssAnon")
    fields = {line.split(":")[0]: line.split()[1] for line in status.splitlines() if line.startswith(wanted)}
    return title, int(fields.get("VmHWM", 0)), int(fields.get("RssAnon", 0))


def kind_of(title: str, is_driver: bool) -> str:
    if is_driver:
        return "driver"
    if title.startswith("ray::"):
        return "worker"  # actors and tasks: encode/decode/quantize actors, Ray Data tasks, trainers
    return "ray-system"  # raylet, gcs_server, dashboard, log monitor


def run_with_rss(command: list[str], log_path: Path) -> tuple[dict, dict]:
    """Run `command`, sampling the memory of it and of everything it starts twice a second; returns
    ({kind: (peak RSS MiB, title)}, {kind: (peak private MiB, title)})."""
    peaks: dict[int, tuple[str, int]] = {}
    private: dict[int, tuple[str, int]] = {}
    with open(log_path, "w") as log:  # audit: a log of this benchmark, not a run output
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                   env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"})
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                for pid in [process.pid, *descendants(process.pid)]:
                    seen = memory_kb(pid)
                    if seen and seen[1] >= peaks.get(pid, ("", -1))[1]:
                        peaks[pid] = seen[:2]
                    if seen and seen[2] >= private.get(pid, ("", -1))[1]:
                        private[pid] = (seen[0], seen[2])
                stop.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        stop.set()
        sampler.join()
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed ({code}); see {log_path}")
    def largest(table: dict) -> dict[str, tuple[float, str]]:
        by_kind: dict[str, tuple[float, str]] = {}
        for pid, (title, kb) in table.items():
            kind = kind_of(title, pid == process.pid)
            if kb / 1024 > by_kind.get(kind, (0.0, ""))[0]:
                by_kind[kind] = (kb / 1024, title[:60])
        return by_kind

    return largest(peaks), largest(private)


def run_size(classes: int, per_class: int | None, resolution: int) -> dict:
    """Generate (cached) and distill one size; returns its figures (cached in the run folder)."""
    data_root = imagenet_like.default_root(classes, per_class, resolution)
    imagenet_like.generate(data_root, classes, per_class, resolution=resolution, log=lambda m: None)
    name = f"rehearsal-{classes}x{per_class or 'imagenet'}-r{resolution}"
    run_dir = WORK / name
    figures_path = run_dir / "rehearsal.json"
    if figures_path.exists():
        return json.loads(figures_path.read_text())
    WORK.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(ROOT / "jobs" / "distill.py"), "--until", "baselines",
               *rehearsal_overrides(data_root, name, resolution)]
    start = time.perf_counter()
    rss, private = run_with_rss(command, WORK / f"{name}.log")
    wall = time.perf_counter() - start
    metrics = json.loads((run_dir / "metrics.json").read_text())
    decode_marker = json.loads((run_dir / "_stages" / "decode.json").read_text())
    latents = run_dir / "latents"
    files_per_class = max(len(list(d.iterdir())) for d in latents.iterdir() if d.name.startswith("label="))
    figures = {"classes": classes, "images": metrics["counts"]["images_encoded"], "wall_s": wall,
               "timings_s": metrics["timings_s"], "rss_mb": rss, "private_mb": private,
               "files_per_class_max": files_per_class,
               "decode_images_per_actor": decode_marker.get("images_per_actor", []),
               "decoded": decode_marker["images"],
               "baseline_files": json.loads((run_dir / "_stages" / "baselines.json").read_text()).get("files", 0)}
    figures_path.write_text(json.dumps(figures, indent=2))  # audit: written last, once the run has finished
    return figures


def bare_encode_images_per_s(classes: int, per_class: int | None, resolution: int, images: int = 20000) -> float:
    """The same shards, decoded and encoded by the run's own prior in this process, torch on every core, no Ray."""
    import numpy as np
    import torch

    from engine.config import load_config
    from engine.data.images import decode_rows, resize_mode
    from engine.data.sources import iter_row_batches
    from engine.priors import load_prior, prior_folder

    torch.set_num_threads(os.cpu_count() or 1)
    name = f"rehearsal-{classes}x{per_class or 'imagenet'}-r{resolution}"
    data_root = imagenet_like.default_root(classes, per_class, resolution)
    config = load_config(None, rehearsal_overrides(data_root, name, resolution))
    prior = load_prior("tiny", prior_folder(config.prior, config.data, config.cache_path), ())
    done, start = 0, time.perf_counter()
    for rows in iter_row_batches(config.data, "train", batch_size=config.encode.batch_size):
        decoded, _ = decode_rows(rows, resolution, classes, mode=resize_mode(config.data))
        prior.encode(np.asarray(decoded["image"]), config.encode.batch_size)
        done += len(decoded["id"])
        if done >= images:
            break
    return done / (time.perf_counter() - start)


def print_table(quarter: dict, full: dict) -> dict:
    units = {"encode": ("images", quarter["images"], full["images"]),
             "quantize": ("classes", quarter["classes"], full["classes"]),
             "decode": ("images", quarter["decoded"], full["decoded"]),
             "baselines": ("files", quarter["baseline_files"], full["baseline_files"])}
    print(f"{'stage':<10} {'N/4 s':>8} {'N s':>8} {'ratio':>6}   throughput N/4 -> N")
    ratios = {}
    for stage in STAGES:
        a, b = quarter["timings_s"].get(stage, 0.0), full["timings_s"].get(stage, 0.0)
        ratios[stage] = b / a if a else float("nan")
        unit = units.get(stage)
        rate = f"{unit[1] / a:,.1f} -> {unit[2] / b:,.1f} {unit[0]}/s" if unit and a and b else ""
        print(f"{stage:<10} {a:>8.1f} {b:>8.1f} {ratios[stage]:>6.2f}   {rate}")
    print(f"{'wall':<10} {quarter['wall_s']:>8.1f} {full['wall_s']:>8.1f} {full['wall_s'] / quarter['wall_s']:>6.2f}")
    print()
    for figure, heading in (("rss_mb", "peak RSS (MiB)"), ("private_mb", "peak private (MiB)")):
        print(f"{heading:<19} {'N/4':>8} {'N':>8} {'ratio':>6}   largest process at N")
        for kind in ("driver", "worker", "ray-system"):
            a, b = quarter[figure].get(kind, (0, ""))[0], full[figure].get(kind, (0, ""))[0]
            print(f"  {kind:<17} {a:>8.0f} {b:>8.0f} {b / a if a else float('nan'):>6.2f}   "
                  f"{full[figure].get(kind, (0, ''))[1]}")
    return ratios


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=None, help="default: ImageNet's counts (1,281,167 at 1000)")
    parser.add_argument("--resolution", type=int, default=48)
    parser.add_argument("--only", choices=("quarter", "full"), default=None, help="run one size (resumable)")
    args = parser.parse_args(argv)
    sizes = {"quarter": max(1, args.classes // 4), "full": args.classes}
    figures = {}
    for label, classes in sizes.items():
        if args.only in (None, label):
            print(f"[scale] {label}: {classes} classes", flush=True)
            figures[label] = run_size(classes, args.per_class, args.resolution)
            print(f"[scale] {label}: {figures[label]['images']:,} images in {figures[label]['wall_s']:.0f}s",
                  flush=True)
    if len(figures) < 2:
        return
    quarter, full = figures["quarter"], figures["full"]
    ratios = print_table(quarter, full)
    bare = bare_encode_images_per_s(args.classes, args.per_class, args.resolution)
    stage = full["images"] / full["timings_s"]["encode"]
    print(f"\nencode: stage {stage:,.0f} images/s (2 actors, everything from parquet to per-class files) vs bare loop "
          f"{bare:,.0f} images/s (one process, every core)")
    per_actor = full["decode_images_per_actor"]

    def rss_ratio(kind: str) -> float:  # peak RSS, shared object-store pages included (the stricter figure)
        return full["rss_mb"][kind][0] / quarter["rss_mb"][kind][0]

    print(f"rss_ratio_driver={rss_ratio('driver'):.2f} rss_ratio_worker={rss_ratio('worker'):.2f} "
          f"time_ratio_max={max(ratios.values()):.2f} "
          f"files_per_class_max={max(quarter['files_per_class_max'], full['files_per_class_max'])} "
          f"decode_actors_busy={sum(1 for n in per_actor if n > 0)}/2 encode_vs_bare={stage / bare:.2f}")


if __name__ == "__main__":
    main()
