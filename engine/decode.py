"""Decode: centroid latents (K, C, h, w) + labels -> uint8 images (K, H, W, 3) through the prior.

img2img from each centroid: noise it to the timestep reached after (1 - strength) of the DDIM schedule, run the
remaining steps with classifier-free guidance, eps = eps(null) + g * (eps(class) - eps(null)), and VAE-decode.
Noise is drawn per row from a generator seeded by (seed, row key), so an image does not depend on which other
centroids share its batch.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.encode import tensor_to_images
from engine.priors.tiny import TinyPrior


def row_noise(shape: tuple[int, ...], seed: int, keys: np.ndarray) -> torch.Tensor:
    """One standard-normal tensor per row, each from its own generator seeded by (seed, key)."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(seed) * 1_000_003 + int(k))) for k in keys]
    return torch.stack(rows)


@torch.no_grad()
def decode_centroids(
    prior: TinyPrior,
    latents: np.ndarray,
    labels: np.ndarray,
    guidance_scale: float,
    strength: float,
    num_steps: int,
    seed: int,
    keys: np.ndarray | None = None,
) -> np.ndarray:
    """latents (K, C, h, w) already times the scaling factor; labels (K,) int; keys (K,) ints for the noise."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if not np.isfinite(latents).all():
        raise ValueError("decode_centroids got NaN or Inf latents")
    if len(labels) and not 0 <= int(np.min(labels)) <= int(np.max(labels)) < prior.num_classes:
        raise ValueError(f"labels must lie in [0, {prior.num_classes}) for this prior, got {np.min(labels)}..{np.max(labels)}")
    keys = np.arange(len(latents)) if keys is None else keys
    device = next(prior.unet.parameters()).device
    scheduler = prior.scheduler
    scheduler.set_timesteps(num_steps)
    # Like diffusers' img2img: keep the last `strength` fraction of the schedule.
    steps_run = max(1, int(round(num_steps * strength)))
    timesteps = scheduler.timesteps[num_steps - steps_run :]

    clean = torch.tensor(latents, dtype=torch.float32, device=device)  # (K, C, h, w)
    noise = row_noise(tuple(clean.shape[1:]), seed, keys).to(device)
    x = scheduler.add_noise(clean, noise, timesteps[:1].repeat(len(clean)))
    cond = torch.tensor(np.asarray(labels), dtype=torch.long, device=device)  # copy: Ray batches are read-only
    null = torch.full_like(cond, prior.null_class)
    for t in timesteps:
        eps_cond, eps_null = prior.unet(torch.cat([x, x]), t, class_labels=torch.cat([cond, null])).sample.chunk(2)
        eps = eps_null + guidance_scale * (eps_cond - eps_null)
        x = scheduler.step(eps, t, x).prev_sample
    pixels = prior.vae.decode(x / prior.vae.config.scaling_factor).sample  # (K, 3, H, W) in [-1, 1]
    return tensor_to_images(pixels)
