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
    """RandomResizedCrop (area in [min_scale, 1], aspect in [3/4, 4/3]) + optional horizontal flip -> (b, 5).
    min_scale 1 is the whole image (torchvision's fallback when no crop of that area fits)."""
    area = min_scale + (1 - min_scale) * torch.rand(b, generator=generator)
    log_ratio = (torch.rand(b, generator=generator) - 0.5) * 2 * math.log(4 / 3)
    if min_scale >= 1:
        log_ratio = torch.zeros(b)
    sx = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    sy = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    tx = (1 - sx) * (2 * torch.rand(b, generator=generator) - 1)
    ty = (1 - sy) * (2 * torch.rand(b, generator=generator) - 1)
    if flip:
        sx = sx * torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    return torch.stack([sx, sy, tx, ty, torch.zeros(b)], dim=1)


def apply_affine(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """One grid_sample for the whole batch: scale/flip, rotate, shift. (B, 3, H, W) -> (B, 3, H, W)."""
    sx, sy, tx, ty, angle = params.to(x.device, x.dtype).unbind(1)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([sx * cos, -sy * sin, tx], 1), torch.stack([sx * sin, sy * cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# DSA's six groups (DC/DSA/MTT's `ParamDiffAug`, strategy "color_crop_cutout_flip_scale_rotate"); "color" is
# brightness, saturation and contrast in turn.
DSA_GROUPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
DSA_SCALE = 1.2  # ratio_scale: each axis x U[1/1.2, 1.2]
DSA_ROTATE = math.radians(15.0)  # ratio_rotate: U[-15, 15] degrees
DSA_CROP = 0.125  # ratio_crop_pad: a whole-pixel shift of up to 1/8 of the side, zero fill
DSA_CUTOUT = 0.5  # ratio_cutout: one zero square of half the side, cut short at the borders


def dsa_groups(flip: bool) -> tuple[str, ...]:
    """The groups DSA draws from: without flip for orientation-bearing data (its strategy string without it)."""
    return DSA_GROUPS if flip else tuple(g for g in DSA_GROUPS if g != "flip")


def sample_dsa(b: int, generator: torch.Generator, flip: bool, image_size: int) -> tuple[int, torch.Tensor]:
    """DSA as DC/DSA/MTT train students with it (aug_mode "S"): ONE group per batch, drawn uniformly, its
    parameters drawn per sample -> (index of the group in DSA_GROUPS, (b, 3) parameters; unused columns 0)."""
    groups = dsa_groups(flip)
    group = groups[int(torch.randint(len(groups), (1,), generator=generator))]
    u = torch.rand(b, 3, generator=generator)
    if group == "color":  # brightness shift, saturation factor, contrast factor
        params = torch.stack([u[:, 0] - 0.5, u[:, 1] * 2.0, u[:, 2] + 0.5], 1)
    elif group == "crop":  # whole-pixel shifts along rows and columns
        shift = int(image_size * DSA_CROP + 0.5)
        params = torch.randint(-shift, shift + 1, (b, 2), generator=generator).float()
        params = torch.cat([params, torch.zeros(b, 1)], 1)
    elif group == "cutout":  # the square's centre (row, column)
        size = int(image_size * DSA_CUTOUT + 0.5)
        centre = torch.randint(0, image_size + (1 - size % 2), (b, 2), generator=generator).float()
        params = torch.cat([centre, torch.zeros(b, 1)], 1)
    elif group == "flip":
        params = torch.stack([(u[:, 0] < 0.5).float(), torch.zeros(b), torch.zeros(b)], 1)
    elif group == "scale":
        params = torch.stack([u[:, 0], u[:, 1]], 1) * (DSA_SCALE - 1 / DSA_SCALE) + 1 / DSA_SCALE
        params = torch.cat([params, torch.zeros(b, 1)], 1)
    else:  # rotate
        params = torch.stack([(u[:, 0] - 0.5) * 2 * DSA_ROTATE, torch.zeros(b), torch.zeros(b)], 1)
    return DSA_GROUPS.index(group), params


def _zero_filled_affine(x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def apply_dsa(x: torch.Tensor, group: int, params: torch.Tensor) -> torch.Tensor:
    """One DSA group on a batch in its network's normalized space (zero is the data's mean: DSA fills with
    zeros there), as DC/DSA's rand_* functions do. (B, C, H, W) -> (B, C, H, W)."""
    name, p = DSA_GROUPS[group], params.to(x.device, x.dtype)
    b, _, h, w = x.shape
    if name == "color":
        x = x + p[:, 0].view(-1, 1, 1, 1)
        grey = x.mean(dim=1, keepdim=True)
        x = (x - grey) * p[:, 1].view(-1, 1, 1, 1) + grey
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * p[:, 2].view(-1, 1, 1, 1) + mean
    if name == "flip":
        return torch.where(p[:, 0].view(-1, 1, 1, 1) > 0, x.flip(3), x)
    if name == "crop":  # output pixel (i, j) reads (i + di, j + dj), zero outside: exact on the pixel grid
        zero, one = torch.zeros(b), torch.ones(b)
        rows, cols = p[:, 0].cpu() * 2 / h, p[:, 1].cpu() * 2 / w
        theta = torch.stack([torch.stack([one, zero, cols], 1), torch.stack([zero, one, rows], 1)], 1)
        return _zero_filled_affine(x, theta, mode="nearest")
    if name == "cutout":
        size_h, size_w = int(h * DSA_CUTOUT + 0.5), int(w * DSA_CUTOUT + 0.5)
        top, left = (p[:, 0] - size_h // 2).view(-1, 1, 1, 1), (p[:, 1] - size_w // 2).view(-1, 1, 1, 1)
        ys = torch.arange(h, device=x.device, dtype=x.dtype).view(1, 1, h, 1)
        xs = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, 1, w)
        hole = (ys >= top) & (ys < top + size_h) & (xs >= left) & (xs < left + size_w)
        return x.masked_fill(hole, 0.0)
    zero = torch.zeros(b)
    if name == "scale":
        sx, sy = p[:, 0].cpu(), p[:, 1].cpu()
        theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
    else:  # rotate
        angle = p[:, 0].cpu()
        cos, sin = angle.cos(), angle.sin()
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _zero_filled_affine(x, theta)


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
