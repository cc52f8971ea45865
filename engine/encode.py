"""Encode: uint8 RGB images (B, H, W, 3) -> VAE latents (B, C, h, w) float32, times the VAE scaling factor.

Images are resized to the prior's resolution first when `size` is given (SD v1.5: 512, DiT: 256); the source
stage already reads them at that size, so this only matters for in-memory sets such as digits.

The posterior mean is used rather than a sample, so encoding is deterministic (the variance of a trained
AutoencoderKL posterior is tiny; D4M samples, which only adds noise to the quantization).

A batch is split when one of its activations would reach ELEMENT_LIMIT elements (`largest_vae_batch`): SD v1.5's
VAE at 512 px makes 128 x 513^2 elements per image in its encoder and 256 x 512^2 in its decoder, so an encode
batch of 64 or a decode batch of 32 is exactly at 2^31.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

# Some CUDA kernels index tensors with 32-bit integers (nearest upsampling in channels_last, group norm, some
# convolutions) and fail or corrupt memory at 2^31 elements; diffusers' own guard undercounts (its issue 3643).
ELEMENT_LIMIT = 2**31


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


def vae_peak_elements(config, side: int, part: str) -> int:
    """Elements of the largest activation one `side` x `side` image makes in the VAE's "encoder" or "decoder",
    from its config (block_out_channels). Level i runs at side / 2^i with the channels of the blocks meeting
    there; the encoder pads each level but the last by one pixel before its stride-2 convolution (diffusers'
    Downsample2D, padding 0); the mid-block's attention scores are tokens^2 (one head)."""
    channels = list(config.block_out_channels)
    peak = 0
    for level, width in enumerate(channels):
        s = side // 2**level
        if part == "encoder":
            width = max(width, channels[max(level - 1, 0)])  # the previous block's output arrives here
            padded = channels[level] * (s + 1) ** 2 if level < len(channels) - 1 else 0
            peak = max(peak, width * s * s, padded)
        else:  # the decoder climbs the same levels; each upsampled input keeps the lower block's channels
            width = max(width, channels[min(level + 1, len(channels) - 1)])
            peak = max(peak, width * s * s)
    latent_side = side // 2 ** (len(channels) - 1)
    if getattr(config, "mid_block_add_attention", True):
        peak = max(peak, latent_side**4)
    return peak


def largest_vae_batch(config, side: int, part: str) -> int:
    """The most images whose every activation in the VAE's `part` stays below ELEMENT_LIMIT elements."""
    return max(1, (ELEMENT_LIMIT - 1) // vae_peak_elements(config, side, part))


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 256, size: int | None = None) -> np.ndarray:
    """Latents (B, C, h, w) float32 = posterior mean * vae.config.scaling_factor, at resolution `size` if given,
    `batch_size` images at a time (fewer when a batch would reach ELEMENT_LIMIT elements)."""
    parameter = next(vae.parameters())
    if len(images):
        batch_size = min(batch_size, largest_vae_batch(vae.config, size or max(images.shape[1:3]), "encoder"))
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
