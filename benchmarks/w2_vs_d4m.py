"""W2 of DDOQ's quantized measure against D4M's whole procedure, on the latents of a finished run.

    python benchmarks/w2_vs_d4m.py runs/fashion_mnist [--ipc 10 50]

The run's `quantization.parquet` compares weightings on the SAME centroids (the effect of the weights alone).
This adds D4M as its authors ran it: sklearn MiniBatchKMeans fed one shuffled pass of batches of K, uniform
weights. Prints, per IPC, the mean (min, max over classes) of 1 - W2(engine centroids, mass) / W2(D4M).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantize import run_d4m  # noqa: E402

from engine.io import store  # noqa: E402
from engine.quantize.transport import w2_distance  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--ipc", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    stats = pq.read_table(run_dir / "quantization.parquet").to_pandas()
    class_dirs = store.class_latent_dirs(run_dir / "latents")
    for k in args.ipc:
        reductions = []
        for label, folder in class_dirs.items():
            _, latents = store.read_class_latents(folder)
            d4m = run_d4m(latents, k, args.seed).astype(np.float32)
            w2_d4m = w2_distance(latents, d4m, np.ones(len(d4m)))
            w2_ddoq = float(stats[(stats.ipc == k) & (stats.label == label)].w2_mass.iloc[0])
            reductions.append(1 - w2_ddoq / w2_d4m)
        print(f"IPC {k}: W2 reduction of engine+mass vs D4M procedure: mean {100 * np.mean(reductions):.1f} % "
              f"(min {100 * min(reductions):.1f} %, max {100 * max(reductions):.1f} %, {len(reductions)} classes)")


if __name__ == "__main__":
    main()
