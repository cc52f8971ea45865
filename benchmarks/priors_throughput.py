"""Throughput of the sd15 (512^2) and dit (256^2) priors at their real architectures, random weights.

    python benchmarks/priors_throughput.py [--batch-sizes 1,2] [--kinds sd15,dit] [--device cpu --dtype float32]

encode: images/s of prior.encode (VAE encoder, posterior mean) at the prior's resolution.
decode: prior.decode (the engine's img2img loop: text encoding, batched CFG, VAE decode) is timed twice, with
num_steps=1 and num_steps=2 at strength 1.0; with n(S, s) the denoiser calls the scheduler makes for S steps at
strength s (DDIM: round(S * s); SD's PNDM repeats one step: one more for S > 1),
step = (t(2) - t(1)) / (n(2, 1) - n(1, 1)) is one denoiser call on 2B rows and
overhead = t(1) - n(1, 1) * step (text encoder + VAE decode + setup), so
s/img = (overhead + n(S, s) * step) / B. Printed for D4M's 50 x 0.7 and for 50 x 1.0 (plain DiT).
Figures in one run come from the same process and machine.
On a shared machine wall time measures the neighbours too, so every figure is derived from the process's CPU
time divided by torch's thread count ("free-core seconds": the wall time the same work takes on idle cores);
wall times are printed beside them.
"""

from __future__ import annotations

import argparse
import gc
from dataclasses import replace
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.config import DecodeConfig  # noqa: E402
from engine.decode import img2img_timesteps  # noqa: E402


def timed(fn) -> float:
    """Free-core seconds: process CPU time / threads (robust to other processes on the cores); also prints wall."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"    (wall {wall:.1f}s, cpu {cpu:.1f}s)", flush=True)
    return cpu / torch.get_num_threads()


def build(kind: str, tmp: Path):
    torch.manual_seed(0)
    names = ("tench", "goldfish")
    if kind == "sd15":
        from engine.priors.sd15 import build_sd15_prior

        return build_sd15_prior(names, tmp / "tokenizer")
    from engine.priors.dit import build_dit_prior

    return build_dit_prior(names)


def measure(kind: str, batch_sizes: list[int], device: str, dtype: str, tmp: Path) -> list[dict]:
    start = time.perf_counter()
    prior = build(kind, tmp).to(device, dtype)
    params = sum(p.numel() for m in vars(prior).values() if isinstance(m, torch.nn.Module) for p in m.parameters())
    print(f"{kind}: built from the real config in {time.perf_counter() - start:.1f}s, {params / 1e6:.0f} M parameters, "
          f"{prior.image_size}^2 -> latents {prior.latent_shape}", flush=True)
    rng = np.random.default_rng(0)
    prior.encode(rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8), 1)  # warm-up
    rows = []
    for b in batch_sizes:
        images = rng.integers(0, 256, (b, prior.image_size, prior.image_size, 3), dtype=np.uint8)
        encode_s = timed(lambda: prior.encode(images, b))
        latents = rng.standard_normal((b, *prior.latent_shape)).astype(np.float32)
        labels, keys = np.arange(b) % 2, np.arange(b)
        config = DecodeConfig(strength=1.0, guidance_scale=4.0, negative_prompt="cartoon, anime, painting")
        one = timed(lambda: prior.decode(latents, labels, replace(config, num_steps=1), keys))
        two = timed(lambda: prior.decode(latents, labels, replace(config, num_steps=2), keys))
        # Denoiser calls per decode come from the scheduler itself (PNDM, SD's, runs num_steps + 1 calls).
        calls = {k: len(img2img_timesteps(prior.scheduler, n, s)) for k, (n, s) in
                 {"one": (1, 1.0), "two": (2, 1.0), "d4m": (50, 0.7), "full": (50, 1.0)}.items()}
        step = max(two - one, 0.0) / (calls["two"] - calls["one"])
        overhead = one - calls["one"] * step
        row = {"kind": kind, "batch": b, "encode_img_s": b / encode_s, "step_s": step, "overhead_s": overhead,
               "decode_s_img_35": (overhead + calls["d4m"] * step) / b,
               "decode_s_img_50": (overhead + calls["full"] * step) / b}
        print(f"  B={b}: encode {row['encode_img_s']:.3f} img/s | denoiser step (2B rows, CFG) {step:.2f}s, "
              f"text+VAE-decode {overhead:.2f}s | decode {row['decode_s_img_35']:.1f} s/img at 50x0.7, "
              f"{row['decode_s_img_50']:.1f} s/img at 50x1.0", flush=True)
        rows.append(row)
    del prior
    gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="sd15,dit")
    parser.add_argument("--batch-sizes", default="1,2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, {args.dtype}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for kind in args.kinds.split(",") for r in measure(kind, batch_sizes, args.device, args.dtype,
                                                                     Path(tmp))]
    for kind in {r["kind"] for r in rows}:
        mine = [r for r in rows if r["kind"] == kind]
        first, last = mine[0], mine[-1]
        speedup = last["encode_img_s"] / first["encode_img_s"]
        print(f"{kind}: B={last['batch']} vs B={first['batch']}: encode img/s x{speedup:.2f}, "
              f"decode s/img (50x0.7) x{last['decode_s_img_35'] / first['decode_s_img_35']:.2f}")


if __name__ == "__main__":
    main()
