"""Evaluation protocols: how a student is trained on a (distilled) set. Pure torch.

Published distillation numbers differ more by protocol than by method, so each protocol is fixed here with its
source, and a method is always compared under one of them:

rded  RDED (Sun et al., CVPR 2024), its validation code: the teacher runs online on every augmented batch
      (RandomResizedCrop, flip, CutMix); loss = KL(teacher_T || student_T), T = 20; AdamW lr 1e-3, weight decay
      0.01 on weight matrices only; RDED's quarter cosine (the rate ends at half its start); batch 10 / 50 / 100
      at IPC 1 / 10 / 50, twice that from 100 classes; 300 epochs. Crops: the whole image below 128 px (RDED's
      factor 1 for CIFAR and Tiny-ImageNet), area in [0.5, 1] above (factor 2).
fkd   SRe2L / FKD (Shen & Xing 2022) stored soft labels: the crops (area in [0.08, 1]), flips, CutMix boxes and
      the teacher's logits of every batch of every epoch are generated once (`generate_soft_labels`) and replayed
      while the student trains, so the teacher is not needed at train time. AdamW as rded, cosine to 0, batch
      1024, 300 epochs.
hard  DC / DSA / MTT's `evaluate_synset` (Zhao et al. 2021, Cazenavette et al. 2022): hard labels, cross-entropy,
      SGD lr 0.01 momentum 0.9 wd 5e-4, lr x0.1 at half time, batch 256; DSA with ONE of its six groups (colour,
      crop, cutout, flip, scale, rotate) per batch (`ParamDiffAug.aug_mode = "S"`), in the student's input space
      normalized by the data's mean and std, where DSA's zero fills are the mean; 1000 epochs; the teacher is
      ignored. ConvNet-3 width 128 with instance norm is the classic student.

Every protocol trains in epochs that are passes over a fresh permutation of the set (the shuffled DataLoader of
all three reference codes), the last batch of a pass the remainder (`EpochOrder`). docs/protocols.md lists every
knob beside its reference and the deviations that remain.

Weighted loss in every protocol: loss = mean_i w_i * l_i (weights average 1 per class, so uniform weights give
the plain loss). With CutMix, a mixed sample's weight is mixed with the same lambda as its pixels:
w = lambda * w_a + (1 - lambda) * w_b.

Input scale: batches are augmented in [-1, 1] (`standardize`), and each network maps them to the scale it was
trained on as its first step (`attach_input_norm`): students at ImageNet scale take ImageNet mean/std as SRe2L and
RDED's do, a pretrained teacher its weights' own mean/std (timm's pretrained_cfg), the small sets [-1, 1] as ever.
One augmented batch then feeds the student and the online teacher at once, each at its own scale.
"""

from __future__ import annotations

import math
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
    schedule: str  # "cosine" (to 0) | "half_cosine" (RDED: to half the rate) | "step" (x0.1 at half time)
    augmentation: str  # "crop" (RandomResizedCrop + flip [+ CutMix]) | "dsa"
    default_epochs: int
    batch_size: int  # the reference's student batch; 0 = RDED's rule by IPC and class count (`student_batch_size`)
    crop_min_area: tuple[float, float]  # RandomResizedCrop's smallest area below and from LARGE_CROP_IMAGE px


PROTOCOLS = {
    "rded": Protocol("rded", True, False, "adamw", 1e-3, 0.01, "half_cosine", "crop", 300, 0, (1.0, 0.5)),
    "fkd": Protocol("fkd", True, True, "adamw", 1e-3, 0.01, "cosine", "crop", 300, 1024, (0.08, 0.08)),
    "hard": Protocol("hard", False, False, "sgd", 0.01, 5e-4, "step", "dsa", 1000, 256, (1.0, 1.0)),
}
LARGE_CROP_IMAGE = 128  # RDED crops images of this side and more (ImageNet's subsets), never CIFAR's or Tiny's
LAST_BATCH_MIN = 8  # a pass's remainder smaller than this joins the batch before it (a data-parallel group of up
                    # to 8 workers then always has a row for each)


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {name!r}; known: {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def make_optimizer(protocol: Protocol, model: nn.Module, steps: int):
    if protocol.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=protocol.learning_rate, momentum=0.9,
                                    weight_decay=protocol.weight_decay)
    else:  # RDED's and SRe2L's get_parameters: no decay on biases and norm scales
        matrices = [p for p in model.parameters() if p.ndim > 1]
        others = [p for p in model.parameters() if p.ndim <= 1]
        optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": protocol.weight_decay},
                                       {"params": others, "weight_decay": 0.0}], lr=protocol.learning_rate)
    steps = max(1, steps)
    if protocol.schedule == "step":
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, steps // 2), gamma=0.1)
    elif protocol.schedule == "half_cosine":
        quarter_cosine = lambda s: 0.5 * (1 + math.cos(math.pi * s / steps / 2))  # noqa: E731
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, quarter_cosine)
    else:
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    return optimizer, schedule


def student_batch_size(config: EvaluateConfig, ipc: int, num_classes: int) -> int:
    """A student's batch on a set of `ipc` images per class: evaluate.batch_size_by_ipc, else
    evaluate.student_batch_size, else the protocol's reference (RDED: 10 / 50 / 100 from IPC 1 / 10 / 50, twice
    that from 100 classes)."""
    if ipc in config.batch_size_by_ipc:
        return config.batch_size_by_ipc[ipc]
    if config.student_batch_size:
        return config.student_batch_size
    protocol = get_protocol(config.protocol)
    if protocol.batch_size:
        return protocol.batch_size
    return (100 if ipc >= 50 else 50 if ipc >= 10 else 10) * (2 if num_classes >= 100 else 1)


def pass_bounds(n: int, batch: int) -> list[int]:
    """Where each batch of a pass over n rows starts, then n: full batches, then the remainder (under
    LAST_BATCH_MIN rows it joins the batch before it)."""
    batch = max(1, min(batch, n))
    full, remainder = divmod(n, batch)
    starts = list(range(0, full * batch, batch))
    if remainder >= LAST_BATCH_MIN or not starts:
        starts.append(full * batch)
    return starts + [n]


def steps_per_pass(n: int, batch: int) -> int:
    return len(pass_bounds(n, batch)) - 1


class EpochOrder:
    """Which rows each step trains on: epochs are passes over a permutation of the n rows drawn afresh from
    (seed, epoch), in batches of `batch`, the last one the remainder (a remainder under LAST_BATCH_MIN joins the
    batch before it). Stateless in the step, so a resumed run and FKD's label generation see the same batches."""

    def __init__(self, seed: int, n: int, batch: int):
        self.seed, self.n = seed, n
        self.bounds = pass_bounds(n, batch)
        self.steps_per_epoch = len(self.bounds) - 1
        self._epoch: tuple[int, torch.Tensor] | None = None

    def rows(self, step: int) -> torch.Tensor:
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch = (epoch, torch.randperm(self.n, generator=generator))
        return self._epoch[1][self.bounds[position]:self.bounds[position + 1]]


def crop_min_area(protocol: Protocol, image_size: int) -> float:
    return protocol.crop_min_area[image_size >= LARGE_CROP_IMAGE]


def plan_batch(protocol: Protocol, generator: torch.Generator, index: torch.Tensor, image_size: int, flip: bool,
               cutmix: bool) -> dict[str, torch.Tensor]:
    """Everything random about one global batch of the rows `index` (`EpochOrder`): its augmentation
    parameters, drawn in a fixed order from one generator, so a seed fixes every batch of a run (and FKD can store
    and replay them)."""
    batch = len(index)
    if protocol.augmentation == "dsa":
        group, params = augment.sample_dsa(batch, generator, flip, image_size)
        return {"index": index, "dsa_group": torch.tensor([group]), "dsa": params}
    area = crop_min_area(protocol, image_size)
    plan = {"index": index, "affine": augment.sample_crop_flip(batch, generator, flip, area)}
    if cutmix:
        plan["perm"], plan["box"] = augment.sample_cutmix(batch, generator, image_size)
    return plan


def standardize(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 (or float already standardized) -> float32 in [-1, 1]. Sets stay uint8 until here, so
    only a batch is ever float."""
    return images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images


@dataclass(frozen=True)
class InputNorm:
    """A network's input scale: (pixel / 255 - mean) / std per channel, for the channels it reads (3, or 1: the
    first of a grey source's three equal channels)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


SYMMETRIC = InputNorm((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # x / 127.5 - 1: what `standardize` already gives
IMAGENET = InputNorm((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def network_norm(config: EvaluateConfig, image_size: int) -> InputNorm:
    """The input scale of a teacher this engine trains: evaluate.input_norm; "auto" (and "dataset", which needs
    the data) keep the small sets' scale below SMALL_IMAGE px, where the stems are made CIFAR-style too."""
    if config.input_norm == "imagenet" or (config.input_norm != "symmetric" and image_size >= SMALL_IMAGE):
        return for_channels(IMAGENET, network_channels(config))
    return for_channels(SYMMETRIC, network_channels(config))


def network_channels(config: EvaluateConfig) -> int:
    """Input channels of the students and of a teacher this engine trains (evaluate.channels; 0, unresolved, = 3)."""
    return 1 if config.channels == 1 else 3


def teacher_channels(config: EvaluateConfig) -> int:
    """A given teacher_path is someone's RGB network; a teacher this engine trains reads what the students read."""
    return 3 if config.teacher_path else network_channels(config)


def for_channels(norm: InputNorm, channels: int) -> InputNorm:
    """`norm` for a network reading `channels` channels: one channel takes the mean of the three (a grey source's
    channels are equal, so its mean/std are too)."""
    if channels == len(norm.mean):
        return norm
    return InputNorm((float(np.mean(norm.mean)),), (float(np.mean(norm.std)),))


def student_norm(config: EvaluateConfig, image_size: int, data_norm: InputNorm | None = None) -> InputNorm:
    """The students' input scale: evaluate.input_norm; "auto" is the protocol's reference: the data's own
    mean/std for hard (DC/DSA normalize each dataset by its statistics; `data_norm`, measured on real
    validation images), ImageNet's for rded and fkd (RDED and SRe2L use it for every dataset)."""
    choice = config.input_norm
    if choice == "auto":
        choice = "dataset" if config.protocol == "hard" else "imagenet"
    if choice == "dataset":
        if data_norm is None:
            raise ValueError("evaluate.input_norm=dataset (hard's default) needs the data's mean/std (data_norm)")
        return for_channels(data_norm, network_channels(config))
    return for_channels(IMAGENET if choice == "imagenet" else SYMMETRIC, network_channels(config))


def dataset_norm(images: np.ndarray) -> InputNorm:
    """Per-channel mean and std of uint8 images (N, H, W, 3), pixels in [0, 1]: a dataset's normalization."""
    pixels = np.asarray(images, dtype=np.float64).reshape(-1, images.shape[-1]) / 255.0
    return InputNorm(tuple(float(v) for v in pixels.mean(0)), tuple(float(max(v, 1e-3)) for v in pixels.std(0)))


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
        return for_channels(InputNorm(tuple(config.teacher_mean), tuple(config.teacher_std)), teacher_channels(config))
    if config.teacher_path and image_size >= SMALL_IMAGE:
        if model is None:
            with torch.device("meta"):
                model = create_student(config.teacher, 1, image_size, config.width)
        pretrained = pretrained_norm(model)
        if pretrained is not None:
            return pretrained
    return for_channels(network_norm(config, image_size), teacher_channels(config))


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

    def inverse(self, x: torch.Tensor) -> torch.Tensor:  # back to [-1, 1]
        return (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)


def network_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A [-1, 1] batch (B, 3, H, W) as `model` reads it (its forward does this itself, through the hook
    `attach_input_norm` adds): at its input scale, and only its first channel for a one-channel network. For
    callers that enter the network elsewhere than its forward (its features, for set quality)."""
    rescale = getattr(model, "input_rescale", None)
    if rescale is None:
        return x
    if x.shape[1] > rescale.scale.shape[1]:  # a one-channel network on a grey source's batch: its channels are equal
        x = x[:, :rescale.scale.shape[1]]
    return rescale(x)


def _rescale_input(model: nn.Module, args: tuple) -> tuple:
    return (network_input(model, args[0]), *args[1:])


def attach_input_norm(model: nn.Module, norm: InputNorm) -> nn.Module:
    """`model` reading [-1, 1] batches at its own scale `norm`: a forward pre-hook rescales its input, so every
    caller (training, the online teacher, held-out top-1, set quality) feeds it the same standardized batch, and
    DDP, checkpoints and saved teachers see the bare architecture. SYMMETRIC adds nothing (the small sets'
    networks are bit for bit as before); a one-channel `norm` also keeps the batch's first channel."""
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
               rows: torch.Tensor | slice | None = None, device: torch.device | str | None = None,
               norm: InputNorm | None = None):
    """(augmented batch (b, 3, H, W) float, per-sample weights (b,)) for the `rows` of a global batch planned by
    `plan_batch` (all of them by default), computed on `device`. `images` (N, 3, H, W) may be uint8.

    DSA runs in the input scale `norm` of the network the batch is for (its zero fills are that scale's zero).
    A data-parallel worker passes its own rows: only they (and, with CutMix, the rows they paste from) are read
    and augmented, on its device, and the result equals those rows of the whole batch augmented at once."""
    norm = norm or SYMMETRIC
    every = torch.arange(len(plan["index"]))
    rows = every if rows is None else every[rows]

    def augmented(selected: torch.Tensor) -> torch.Tensor:
        x = standardize(images[plan["index"][selected]].to(device))
        if "dsa" in plan:  # in the network's own scale, where DSA's zeros are the data's mean
            rescale = InputRescale(norm).to(x.device)
            x = augment.apply_dsa(rescale(x), int(plan["dsa_group"]), plan["dsa"][selected])
            return rescale.inverse(x)
        return augment.apply_affine(x, plan["affine"][selected])

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
    """mean_i w_i * KL(softmax(t_i / T) || softmax(s_i / T)): RDED's and SRe2L's KLDivLoss("batchmean"), with no
    T^2 factor (both leave it out)."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    per_sample = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(1)  # (B,)
    return (weights * per_sample).mean()


def weighted_ce_loss(logits, labels, weights) -> torch.Tensor:
    """mean_i w_i * CE(logits_i, y_i): the hard-label protocol's loss."""
    return (weights * F.cross_entropy(logits, labels, reduction="none")).mean()
