"""Decode: centroid latents (K, C, h, w) + labels -> uint8 images (K, H, W, 3) through the prior.

img2img from each centroid: noise it to the timestep reached after (1 - strength) of the scheduler's schedule, run
the remaining steps with classifier-free guidance, eps = eps(null) + g * (eps(class) - eps(null)), and VAE-decode.
Noise is drawn per row from a generator seeded by (seed, row key), so an image does not depend on which other
centroids share its batch. Each prior's loop lives with the prior (engine/priors/: tiny, sd15, dit) and shares the
helpers below; every prior is reached through `decode_latents`.

`decode_by_ipc` packs the rows of every IPC decoded at the same strength into full batches of decode.batch_size
(a class's 1 + 10 + 50 centroids alone would give the denoiser batches of 1, 10, 32 and 18), capped where the
VAE decoder's activations would reach 2^31 elements (engine.encode.largest_vae_batch).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from engine.config import DecodeConfig
from engine.encode import largest_vae_batch, resize_pixels, tensor_to_images


def row_noise(shape: tuple[int, ...], seed: int, keys: np.ndarray) -> torch.Tensor:
    """One standard-normal tensor per row, each from its own generator seeded by (seed, key)."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(seed) * 1_000_003 + int(k))) for k in keys]
    return torch.stack(rows)


def check_decode_inputs(latents: np.ndarray, labels: np.ndarray, strength: float, num_classes: int) -> None:
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if not np.isfinite(latents).all():
        raise ValueError("decode_centroids got NaN or Inf latents")
    if len(labels) and not 0 <= int(np.min(labels)) <= int(np.max(labels)) < num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) for this prior, "
                         f"got {np.min(labels)}..{np.max(labels)}")


def img2img_timesteps(scheduler, num_steps: int, strength: float) -> torch.Tensor:
    """Set the schedule and keep its last `strength` fraction (like diffusers' img2img; scheduler.order aware)."""
    scheduler.set_timesteps(num_steps)  # also resets multistep state (PNDM's history) between batches
    steps_run = max(1, int(round(num_steps * strength)))
    start = (num_steps - steps_run) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def pixels_to_images(pixels: torch.Tensor, size: int | None) -> np.ndarray:
    """VAE output (K, 3, H, W) in [-1, 1] -> uint8 (K, size, size, 3), resized to the evaluation resolution."""
    return tensor_to_images(resize_pixels(pixels.float(), size) if size else pixels.float())


def decode_latents(prior, latents: np.ndarray, labels: np.ndarray, config: DecodeConfig,
                   keys: np.ndarray | None = None, size: int | None = None, space: str = "latent") -> np.ndarray:
    """Any prior (engine.priors.base.Prior): centroids -> uint8 images at `size` (None = the prior's own). In the
    noise space (quantize.space) the centroids are diffusion states, sampled back without noise (engine/invert.py)."""
    if space == "noise":
        from engine.invert import states_to_images

        return states_to_images(prior, np.asarray(latents), np.asarray(labels), config, size)
    keys = np.arange(len(latents)) if keys is None else np.asarray(keys)
    return prior.decode(np.asarray(latents), np.asarray(labels), config, keys, size)


@dataclass(frozen=True)
class DecodedRows:
    """What `decode_by_ipc` made: the images in the rows' order and the row indices of each denoiser batch, in
    the order they ran (their lengths are the batch sizes the denoiser saw)."""

    images: np.ndarray  # (N, H, W, 3) uint8
    batches: tuple[np.ndarray, ...]

    def batch_size_of_rows(self) -> np.ndarray:
        """(N,) the size of the denoiser batch each row was decoded in."""
        sizes = np.zeros(len(self.images), np.int64)
        for rows in self.batches:
            sizes[rows] = len(rows)
        return sizes


def strength_groups(ipcs: np.ndarray, decode: DecodeConfig) -> list[tuple[float, np.ndarray]]:
    """[(strength, row indices)]: the rows of every IPC decoded at one strength share batches; groups in order of
    their smallest IPC, rows in input order."""
    groups: dict[float, list[int]] = {}
    for ipc in np.unique(ipcs):
        groups.setdefault(decode.strength_at(int(ipc)), []).append(int(ipc))
    return [(strength, np.flatnonzero(np.isin(ipcs, members))) for strength, members in groups.items()]


def denoiser_batch_size(prior, decode: DecodeConfig) -> int:
    """decode.batch_size, or fewer where the prior's VAE decoder would reach 2^31 elements at its resolution."""
    vae = getattr(prior, "vae", None)
    if vae is None:
        return decode.batch_size
    side = prior.latent_shape[-1] * 2 ** (len(vae.config.block_out_channels) - 1)  # the VAE's full resolution
    return min(decode.batch_size, largest_vae_batch(vae.config, side, "decoder"))


def decode_by_ipc(prior, latents: np.ndarray, labels: np.ndarray, ipcs: np.ndarray, keys: np.ndarray,
                  decode: DecodeConfig, size: int | None, space: str = "latent") -> DecodedRows:
    """Decode rows of several IPCs, each IPC at its own strength (decode.strength_at), into uint8 images in the
    rows' order: the rows of one strength in full batches of `denoiser_batch_size` (the last one partial).
    Noise is keyed per row, so packing changes no image beyond float rounding."""
    if not len(latents):
        return DecodedRows(np.zeros((0, 1, 1, 3), np.uint8), ())
    batch = denoiser_batch_size(prior, decode)
    images, batches = None, []
    for strength, rows in strength_groups(np.asarray(ipcs), decode):
        config = dataclasses.replace(decode, strength=strength)
        for start in range(0, len(rows), batch):
            part = rows[start:start + batch]
            decoded = decode_latents(prior, latents[part], labels[part], config, keys[part], size, space)
            if images is None:
                images = np.zeros((len(latents), *decoded.shape[1:]), decoded.dtype)
            images[part] = decoded
            batches.append(part)
    return DecodedRows(images, tuple(batches))
