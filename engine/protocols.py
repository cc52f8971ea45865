"""Evaluation protocols: how a student is trained on a (distilled) set. Pure torch.

Published distillation numbers differ more by protocol than by method, so each protocol is fixed here with its
source, and a method is always compared under one of them:

rded  RDED (Sun et al., CVPR 2024), after SRe2L: the teacher runs online on every augmented batch
      (RandomResizedCrop, flip, CutMix); loss = T^2 KL(teacher_T || student_T); AdamW lr 1e-3 wd 0.01, cosine
      schedule; 300 epochs at ImageNet scale (`evaluate.student_epochs` scales it down).
fkd   SRe2L / FKD (Shen & Xing 2022) stored soft labels: the crops, flips, CutMix boxes and the teacher's logits
      of every batch of every epoch are generated once (`generate_soft_labels`) and replayed while the student
      trains, so the teacher is not needed at train time. Same optimizer and schedule as rded.
hard  DC / DSA / MTT (Zhao et al. 2021, Cazenavette et al. 2022): hard labels, cross-entropy, SGD lr 0.01
      momentum 0.9 wd 5e-4, lr x0.1 at half time, DSA augmentation (colour, crop, cutout, flip, scale, rotate),
      1000 epochs; the teacher is ignored. ConvNet-3 width 128 with instance norm is the classic student.

Weighted loss in every protocol: loss = mean_i w_i * l_i (weights average 1 per class, so uniform weights give
the plain loss). With CutMix, a mixed sample's weight is mixed with the same lambda as its pixels:
w = lambda * w_a + (1 - lambda) * w_b.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine import augment


@dataclass(frozen=True)
class Protocol:
    name: str
    soft_labels: bool  # teacher logits as targets (rded, fkd) or the set's labels (hard)
    stored_labels: bool  # fkd: logits generated once and replayed
    optimizer: str  # "adamw" | "sgd"
    learning_rate: float
    weight_decay: float
    schedule: str  # "cosine" | "step" (x0.1 at half time)
    augmentation: str  # "crop" (RandomResizedCrop + flip [+ CutMix]) | "dsa"
    default_epochs: int


PROTOCOLS = {
    "rded": Protocol("rded", True, False, "adamw", 1e-3, 0.01, "cosine", "crop", 300),
    "fkd": Protocol("fkd", True, True, "adamw", 1e-3, 0.01, "cosine", "crop", 300),
    "hard": Protocol("hard", False, False, "sgd", 0.01, 5e-4, "step", "dsa", 1000),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {name!r}; known: {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def make_optimizer(protocol: Protocol, model: nn.Module, steps: int):
    if protocol.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=protocol.learning_rate, momentum=0.9,
                                    weight_decay=protocol.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=protocol.learning_rate,
                                      weight_decay=protocol.weight_decay)
    if protocol.schedule == "step":
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, steps // 2), gamma=0.1)
    else:
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    return optimizer, schedule


def plan_batch(protocol: Protocol, generator: torch.Generator, n: int, batch: int, image_size: int, flip: bool,
               cutmix: bool) -> dict[str, torch.Tensor]:
    """Everything random about one global batch: sample indices and augmentation parameters. Drawn in a fixed
    order from one generator, so a seed fixes every batch of a run (and FKD can store and replay them)."""
    index = torch.randint(0, n, (batch,), generator=generator)
    if protocol.augmentation == "dsa":
        return {"index": index, "affine": augment.sample_dsa(batch, generator, flip),
                "color": augment.sample_dsa_color_cutout(batch, generator)}
    plan = {"index": index, "affine": augment.sample_crop_flip(batch, generator, flip)}
    if cutmix:
        plan["perm"], plan["box"] = augment.sample_cutmix(batch, generator, image_size)
    return plan


def standardize(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 (or float already standardized) -> float32 in [-1, 1]. Sets stay uint8 until here, so
    only a batch is ever float."""
    return images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images


def apply_plan(images: torch.Tensor, weights: torch.Tensor, plan: dict[str, torch.Tensor],
               rows: torch.Tensor | slice | None = None, device: torch.device | str | None = None):
    """(augmented batch (b, 3, H, W) float, per-sample weights (b,)) for the `rows` of a global batch planned by
    `plan_batch` (all of them by default), computed on `device`. `images` (N, 3, H, W) may be uint8.

    A data-parallel worker passes its own rows: only they (and, with CutMix, the rows they paste from) are read
    and augmented, on its device, and the result equals those rows of the whole batch augmented at once."""
    every = torch.arange(len(plan["index"]))
    rows = every if rows is None else every[rows]

    def augmented(selected: torch.Tensor) -> torch.Tensor:
        x = standardize(images[plan["index"][selected]].to(device))
        x = augment.apply_affine(x, plan["affine"][selected])
        return augment.apply_color_cutout(x, plan["color"][selected]) if "color" in plan else x

    x = augmented(rows)
    w = weights[plan["index"][rows]].to(x.device)
    if "perm" in plan:
        partners = plan["perm"][rows]
        y0, y1, x0, x1 = plan["box"].tolist()
        source = x[partners] if len(rows) == len(every) else augmented(partners)  # whole batch: done already
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = source[:, :, y0:y1, x0:x1]
        lam = augment.cutmix_lambda(plan["box"], images.shape[-1])
        w = lam * w + (1 - lam) * weights[plan["index"][partners]].to(x.device)
    return x, w


def weighted_kd_loss(student_logits, teacher_logits, weights, temperature: float) -> torch.Tensor:
    """mean_i w_i * T^2 * KL(softmax(t_i / T) || softmax(s_i / T))."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    per_sample = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(1) * temperature**2  # (B,)
    return (weights * per_sample).mean()


def weighted_ce_loss(logits, labels, weights) -> torch.Tensor:
    """mean_i w_i * CE(logits_i, y_i): the hard-label protocol's loss."""
    return (weights * F.cross_entropy(logits, labels, reduction="none")).mean()
