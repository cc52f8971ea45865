"""The `hard` protocol's DSA against DC/DSA's own code: one group per batch (ParamDiffAug.aug_mode "S"), and each
group's pixels equal to DC/DSA's rand_* functions (utils.py of VICO-UoE/DatasetCondensation, transcribed below
with their random draws made parameters) for the same draws."""

import numpy as np
import torch
import torch.nn.functional as F

from engine.evaluate import augment
from engine.evaluate.protocols import InputNorm, apply_plan, get_protocol, plan_batch

# ---------------------------------------------------------------- DC/DSA's rand_* with their draws given


def reference_color(x, randb, rands, randc):
    x = x + (randb.view(-1, 1, 1, 1) - 0.5) * 1.0  # rand_brightness, ratio 1.0
    x_mean = x.mean(dim=1, keepdim=True)  # rand_saturation, ratio 2.0
    x = (x - x_mean) * (rands.view(-1, 1, 1, 1) * 2.0) + x_mean
    x_mean = x.mean(dim=[1, 2, 3], keepdim=True)  # rand_contrast, ratio 0.5
    return (x - x_mean) * (randc.view(-1, 1, 1, 1) + 0.5) + x_mean


def reference_crop(x, translation_x, translation_y):
    translation_x, translation_y = translation_x.view(-1, 1, 1), translation_y.view(-1, 1, 1)
    grid_batch, grid_x, grid_y = torch.meshgrid(
        torch.arange(x.size(0), dtype=torch.long), torch.arange(x.size(2), dtype=torch.long),
        torch.arange(x.size(3), dtype=torch.long), indexing="ij")
    grid_x = torch.clamp(grid_x + translation_x + 1, 0, x.size(2) + 1)
    grid_y = torch.clamp(grid_y + translation_y + 1, 0, x.size(3) + 1)
    x_pad = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return x_pad.permute(0, 2, 3, 1).contiguous()[grid_batch, grid_x, grid_y].permute(0, 3, 1, 2)


def reference_cutout(x, offset_x, offset_y, ratio=0.5):
    cutout_size = int(x.size(2) * ratio + 0.5), int(x.size(3) * ratio + 0.5)
    offset_x, offset_y = offset_x.view(-1, 1, 1), offset_y.view(-1, 1, 1)
    grid_batch, grid_x, grid_y = torch.meshgrid(
        torch.arange(x.size(0), dtype=torch.long), torch.arange(cutout_size[0], dtype=torch.long),
        torch.arange(cutout_size[1], dtype=torch.long), indexing="ij")
    grid_x = torch.clamp(grid_x + offset_x - cutout_size[0] // 2, min=0, max=x.size(2) - 1)
    grid_y = torch.clamp(grid_y + offset_y - cutout_size[1] // 2, min=0, max=x.size(3) - 1)
    mask = torch.ones(x.size(0), x.size(2), x.size(3), dtype=x.dtype)
    mask[grid_batch, grid_x, grid_y] = 0
    return x * mask.unsqueeze(1)


def reference_flip(x, randf):
    return torch.where(randf.view(-1, 1, 1, 1) < 0.5, x.flip(3), x)


def reference_scale(x, sx, sy):
    theta = torch.tensor([[[sx[i], 0, 0], [0, sy[i], 0]] for i in range(x.shape[0])], dtype=torch.float)
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def reference_rotate(x, theta):
    theta = torch.tensor([[[torch.cos(theta[i]), torch.sin(-theta[i]), 0],
                           [torch.sin(theta[i]), torch.cos(theta[i]), 0]] for i in range(x.shape[0])],
                         dtype=torch.float)
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def reference(x, group: str, p: torch.Tensor) -> torch.Tensor:
    """DC/DSA's group applied with the draws behind the engine's parameters `p`."""
    if group == "color":
        return reference_color(x, p[:, 0] + 0.5, p[:, 1] / 2.0, p[:, 2] - 0.5)
    if group == "crop":
        return reference_crop(x, p[:, 0].long(), p[:, 1].long())
    if group == "cutout":
        return reference_cutout(x, p[:, 0].long(), p[:, 1].long())
    if group == "flip":
        return reference_flip(x, torch.where(p[:, 0] > 0, 0.0, 1.0))
    if group == "scale":
        return reference_scale(x, p[:, 0], p[:, 1])
    return reference_rotate(x, p[:, 0])


def draws_by_group(b: int, size: int, flip: bool = True, seeds: int = 400) -> dict[str, list[torch.Tensor]]:
    found: dict[str, list[torch.Tensor]] = {}
    for seed in range(seeds):
        group, params = augment.sample_dsa(b, torch.Generator().manual_seed(seed), flip, size)
        found.setdefault(augment.DSA_GROUPS[group], []).append(params)
    return found


def test_dsa_draws_one_group_per_batch_uniformly_and_no_flip_where_flips_are_off():
    with_flip = draws_by_group(4, 32, flip=True, seeds=1200)
    shares = {group: len(draws) / 1200 for group, draws in with_flip.items()}
    assert set(shares) == set(augment.DSA_GROUPS)
    assert all(abs(share - 1 / 6) < 0.04 for share in shares.values()), shares
    assert set(draws_by_group(4, 32, flip=False)) == set(augment.DSA_GROUPS) - {"flip"}


def test_every_dsa_group_equals_dc_dsas_own_function_for_the_same_draws():
    torch.manual_seed(0)
    for size in (32, 28, 9):
        x = torch.randn(6, 3, size, size)
        for group, draws in draws_by_group(6, size).items():
            for params in draws[:5]:
                mine = augment.apply_dsa(x, augment.DSA_GROUPS.index(group), params)
                torch.testing.assert_close(mine, reference(x, group, params), atol=1e-5, rtol=1e-5,
                                           msg=f"{group} at {size} px")


def test_dsa_parameter_ranges_are_dc_dsas():
    draws = draws_by_group(256, 32)
    scale, rotate = torch.cat(draws["scale"]), torch.cat(draws["rotate"])
    assert scale[:, :2].min() >= 1 / 1.2 and scale[:, :2].max() <= 1.2 and scale[:, :2].max() > 1.15
    assert rotate[:, 0].abs().max() <= np.radians(15) and rotate[:, 0].abs().max() > np.radians(14)
    crop = torch.cat(draws["crop"])[:, :2]
    assert set(crop.unique().long().tolist()) == set(range(-4, 5))  # int(32 * 0.125 + 0.5) = 4 px
    color = torch.cat(draws["color"])
    assert color[:, 0].abs().max() <= 0.5 and 0 <= color[:, 1].min() and color[:, 1].max() <= 2
    assert 0.5 <= color[:, 2].min() and color[:, 2].max() <= 1.5


def test_dsa_fills_with_the_datas_mean_in_the_students_scale():
    """A uniformly white batch, DSA in a scale whose zero is the data's mean grey 0.3: what a crop shifts in, or a
    cutout cuts out, is that grey (in [-1, 1]: 2 * 0.3 - 1), as DSA's zeros are in a normalized dataset."""
    images = torch.full((8, 3, 16, 16), 255, dtype=torch.uint8)
    norm = InputNorm((0.3, 0.3, 0.3), (0.2, 0.2, 0.2))
    for seed in range(60):
        plan = plan_batch(get_protocol("hard"), torch.Generator().manual_seed(seed), torch.arange(8), 16, True, False)
        group = augment.DSA_GROUPS[int(plan["dsa_group"])]
        if group not in ("crop", "cutout"):
            continue
        x, _ = apply_plan(images, torch.ones(8), plan, norm=norm)
        values = {round(float(v), 4) for v in x.unique()}
        assert values <= {1.0, round(2 * 0.3 - 1, 4)} and len(values) == 2, (group, values)
