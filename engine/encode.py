"""Encode: uint8 RGB images (B, H, W, 3) -> VAE latents (B, C, h, w) float32, times the VAE scaling factor.

Images are resized to the prior's resolution first when `size` is given (SD v1.5: 512, DiT: 256); the source
stage already reads them at that size, so this only matters for in-memory sets such as digits.

The posterior mean is used rather than a sample, so encoding is deterministic (the variance of a trained
AutoencoderKL posterior is tiny; D4M samples, which only adds noise to the quantization).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1], the range diffusers VAEs expect."""
    pixels = torch.tensor(np.ascontiguousarray(images), dtype=torch.float32)  # copy: Ray batches are read-only
    return pixels.permute(0, 3, 1, 2) / 127.5 - 1.0


def tensor_to_images(pixels: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8."""
    scaled = ((pixels.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).cpu().numpy()


def resize_pixels(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, size, size), antialiased bilinear (a no-op at the same size)."""
    if pixels.shape[-2:] == (size, size):
        return pixels
    return F.interpolate(pixels.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 256, size: int | None = None) -> np.ndarray:
    """Latents (B, C, h, w) float32 = posterior mean * vae.config.scaling_factor, at resolution `size` if given."""
    parameter = next(vae.parameters())
    out = []
    for start in range(0, len(images), batch_size):
        pixels = images_to_tensor(images[start : start + batch_size])
        if size is not None:
            pixels = resize_pixels(pixels, size)
        pixels = pixels.to(parameter.device, parameter.dtype)
        mean = vae.encode(pixels).latent_dist.mean  # (b, C, h, w)
        out.append((mean * vae.config.scaling_factor).float().cpu())
    if not out:
        raise ValueError("encode_images got no images")
    return torch.cat(out).numpy()
