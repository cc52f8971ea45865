"""Batch augmentations as (sample parameters, apply) pairs. Pure torch.

Sampling and applying are split so the FKD protocol can store the parameters of every batch and replay them
exactly later, and so several DDP workers can draw the same global batch and each take its own rows.
Images are (B, 3, H, W) float tensors; every sampler takes a torch.Generator, so a seed fixes everything.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Affine parameters per sample: x-scale, y-scale, x-shift, y-shift, rotation (radians); flips are negative scales.
AFFINE_COLUMNS = 5


def sample_crop_flip(b: int, generator: torch.Generator, flip: bool, min_scale: float = 0.5) -> torch.Tensor:
    """RandomResizedCrop (area in [min_scale, 1], aspect in [3/4, 4/3]) + optional horizontal flip -> (b, 5)."""
    area = min_scale + (1 - min_scale) * torch.rand(b, generator=generator)
    log_ratio = (torch.rand(b, generator=generator) - 0.5) * 2 * math.log(4 / 3)
    sx = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    sy = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    tx = (1 - sx) * (2 * torch.rand(b, generator=generator) - 1)
    ty = (1 - sy) * (2 * torch.rand(b, generator=generator) - 1)
    if flip:
        sx = sx * torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    return torch.stack([sx, sy, tx, ty, torch.zeros(b)], dim=1)


def sample_dsa(b: int, generator: torch.Generator, flip: bool) -> torch.Tensor:
    """DSA's geometric chain (Zhao & Bilen 2021: scale 1.2, rotate 15 deg, crop/translate 1/8, flip) -> (b, 5).
    The colour and cutout parts are sampled by `sample_dsa_color_cutout`."""
    scale = 1.0 + 0.2 * (2 * torch.rand(b, 2, generator=generator) - 1)
    angle = (2 * torch.rand(b, generator=generator) - 1) * math.radians(15)
    shift = (2 * torch.rand(b, 2, generator=generator) - 1) * 0.125 * 2  # 1/8 of the side, in [-1, 1] units
    sx, sy = scale[:, 0], scale[:, 1]
    if flip:
        sx = sx * torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    return torch.stack([sx, sy, shift[:, 0], shift[:, 1], angle], dim=1)


def apply_affine(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """One grid_sample for the whole batch: scale/flip, rotate, shift. (B, 3, H, W) -> (B, 3, H, W)."""
    sx, sy, tx, ty, angle = params.to(x.device, x.dtype).unbind(1)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([sx * cos, -sy * sin, tx], 1), torch.stack([sx * sin, sy * cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def sample_dsa_color_cutout(b: int, generator: torch.Generator) -> torch.Tensor:
    """DSA's colour (brightness shift in [-0.5, 0.5], saturation x[0, 2], contrast x[0.5, 1.5]) and cutout (a
    square of half the side at a random centre) -> (b, 5): brightness, saturation, contrast, cx, cy."""
    brightness = torch.rand(b, generator=generator) - 0.5
    saturation = torch.rand(b, generator=generator) * 2.0
    contrast = torch.rand(b, generator=generator) + 0.5
    centre = torch.rand(b, 2, generator=generator)
    return torch.stack([brightness, saturation, contrast, centre[:, 0], centre[:, 1]], dim=1)


def apply_color_cutout(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    brightness, saturation, contrast, cx, cy = (p.view(-1, 1, 1, 1) for p in params.to(x.device, x.dtype).unbind(1))
    x = x + brightness
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * saturation + grey
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    h, w = x.shape[-2:]
    ys = torch.arange(h, device=x.device, dtype=x.dtype).view(1, 1, h, 1) / h
    xs = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, 1, w) / w
    hole = ((ys - cy).abs() < 0.25) & ((xs - cx).abs() < 0.25)
    return x.masked_fill(hole, 0.0)


def sample_cutmix(b: int, generator: torch.Generator, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix (Yun et al. 2019, alpha = 1 as RDED uses it) for one batch: (permutation (b,), box (4,) = y0, y1,
    x0, x1). lambda ~ Beta(1, 1) = U(0, 1) sets the box's area; the exact mixing weight is recomputed from the
    clipped box by `cutmix_lambda`."""
    lam = float(torch.rand(1, generator=generator))
    cut = math.sqrt(1.0 - lam)
    side = int(image_size * cut)
    cy, cx = (torch.randint(0, image_size, (2,), generator=generator)).tolist()
    y0, y1 = max(cy - side // 2, 0), min(cy + side // 2, image_size)
    x0, x1 = max(cx - side // 2, 0), min(cx + side // 2, image_size)
    return torch.randperm(b, generator=generator), torch.tensor([y0, y1, x0, x1])


def cutmix_lambda(box: torch.Tensor, image_size: int) -> float:
    """Fraction of each image that stays its own (1 - pasted area)."""
    y0, y1, x0, x1 = box.tolist()
    return 1.0 - (y1 - y0) * (x1 - x0) / image_size**2
