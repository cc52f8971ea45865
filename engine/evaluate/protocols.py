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

Input scale: batches are augmented in [-1, 1] (`standardize`), and each network maps them to the scale it was
trained on as its first step (`attach_input_norm`): students at ImageNet scale take ImageNet mean/std as SRe2L and
RDED's do, a pretrained teacher its weights' own mean/std (timm's pretrained_cfg), the small sets [-1, 1] as ever.
One augmented batch then feeds the student and the online teacher at once, each at its own scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import EvaluateConfig
from engine.evaluate import augment
from engine.evaluate.students import SMALL_IMAGE, create_student


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


@dataclass(frozen=True)
class InputNorm:
    """A network's input scale: (pixel / 255 - mean) / std per channel."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


SYMMETRIC = InputNorm((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # x / 127.5 - 1: what `standardize` already gives
IMAGENET = InputNorm((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def student_norm(config: EvaluateConfig, image_size: int) -> InputNorm:
    """The students' input scale (and that of a teacher this engine trains): evaluate.input_norm; "auto" keeps
    the small sets' scale below SMALL_IMAGE px, where the students' stems are made CIFAR-style too."""
    if config.input_norm == "imagenet" or (config.input_norm == "auto" and image_size >= SMALL_IMAGE):
        return IMAGENET
    return SYMMETRIC


def pretrained_norm(model: nn.Module) -> InputNorm | None:
    """The mean/std a timm model's weights were trained with (its pretrained_cfg), None for other networks."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "mean" not in cfg or "std" not in cfg:
        return None
    return InputNorm(tuple(map(float, cfg["mean"])), tuple(map(float, cfg["std"])))


def teacher_norm(config: EvaluateConfig, image_size: int, model: nn.Module | None = None) -> InputNorm:
    """The teacher's input scale: evaluate.teacher_mean/std when given; for a given teacher_path of a timm
    architecture at >= SMALL_IMAGE px (a stem left as timm built it), the pretrained_cfg of `model` (or of the
    architecture, built on the meta device: no memory, no weights); else the students' (a teacher this engine
    trained, or a convnet3)."""
    if config.teacher_mean:
        return InputNorm(tuple(config.teacher_mean), tuple(config.teacher_std))
    if config.teacher_path and image_size >= SMALL_IMAGE:
        if model is None:
            with torch.device("meta"):
                model = create_student(config.teacher, 1, image_size, config.width)
        pretrained = pretrained_norm(model)
        if pretrained is not None:
            return pretrained
    return student_norm(config, image_size)


class InputRescale(nn.Module):
    """[-1, 1] -> (x01 - mean) / std, as one multiply-add: x01 = (x + 1) / 2, so x * 1 / (2 std) +
    (1/2 - mean) / std. Its buffers are not persistent: the network's state dict stays the bare architecture's."""

    def __init__(self, norm: InputNorm):
        super().__init__()
        std, mean = np.asarray(norm.std, np.float64), np.asarray(norm.mean, np.float64)
        self.register_buffer("scale", torch.tensor(0.5 / std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("shift", torch.tensor((0.5 - mean) / std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) in [-1, 1]
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def _rescale_input(model: nn.Module, args: tuple) -> tuple:
    return (model.input_rescale(args[0]), *args[1:])


def attach_input_norm(model: nn.Module, norm: InputNorm) -> nn.Module:
    """`model` reading [-1, 1] batches at its own scale `norm`: a forward pre-hook rescales its input, so every
    caller (training, the online teacher, held-out top-1, set quality) feeds it the same standardized batch, and
    DDP, checkpoints and saved teachers see the bare architecture. SYMMETRIC adds nothing (the small sets'
    networks are bit for bit as before)."""
    if hasattr(model, "input_rescale"):
        raise ValueError(f"{type(model).__name__} already has an input scale ({model.input_rescale.norm})")
    if norm == SYMMETRIC:
        return model
    parameter = next(model.parameters(), None)
    model.input_rescale = InputRescale(norm).to(parameter.device if parameter is not None else "cpu")
    model.register_forward_pre_hook(_rescale_input)
    return model


def input_norm_of(model: nn.Module) -> InputNorm:
    """The scale `attach_input_norm` gave `model` (DDP-wrapped or not)."""
    rescale = getattr(getattr(model, "module", model), "input_rescale", None)
    return SYMMETRIC if rescale is None else rescale.norm


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
