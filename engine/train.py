"""Train teachers and students on image sets and measure top-1 on the held-out split. Pure torch.

Images are (N, H, W, 3) uint8. The Ray layer passes `wrap_model` (DDP), its worker `rank`/`world`, a `report`
callback and a checkpoint path; this module knows nothing about Ray. Data parallelism: every worker draws the
same global batch plan from the same seeded generator and trains on its own rows (rank::world) of it, so the
gradient DDP averages is the gradient of the global batch, and the result does not depend on the worker count
beyond float rounding.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import EvaluateConfig
from engine.protocols import (Protocol, apply_plan, get_protocol, make_optimizer, plan_batch, weighted_ce_loss,
                              weighted_kd_loss)
from engine.store import atomic_write_bytes
from engine.students import create_student


@dataclass(frozen=True)
class TrainSet:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64
    weights: np.ndarray  # (N,) float, averaging 1 per class


@dataclass(frozen=True)
class Worker:
    """Where this process sits in a data-parallel group, and how to wrap its model."""
    rank: int = 0
    world: int = 1
    wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m


def to_float(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, standardized to roughly zero mean, unit scale."""
    return (torch.tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


def epochs_to_steps(n: int, epochs: int, batch_size: int) -> int:
    return max(1, epochs * -(-n // batch_size))


def student_epochs(config: EvaluateConfig) -> int:
    return config.student_epochs or get_protocol(config.protocol).default_epochs


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def fit(model: nn.Module, data: TrainSet, steps: int, protocol: Protocol, config: EvaluateConfig, seed: int,
        loss_fn: Callable, worker: Worker = Worker(), report: Callable[[int, nn.Module], None] | None = None,
        report_every: int = 0, checkpoint: Path | None = None) -> nn.Module:
    """The one training loop. `loss_fn(logits, x, plan_index, labels, weights, step)` on this worker's rows.

    Every `report_every` steps (and at the end) `report(step, model)` is called and, when `checkpoint` is given,
    the model, optimizer, schedule and generator are saved there (atomically, rank 0), so a killed job resumes
    from its last report with the same batches it would have drawn."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    images, labels = to_float(data.images), torch.as_tensor(data.labels)
    weights = torch.as_tensor(data.weights, dtype=torch.float32)
    optimizer, schedule = make_optimizer(protocol, model, steps)
    batch = min(config.batch_size, len(images))
    if batch < worker.world:
        raise ValueError(f"batch of {batch} images cannot be split over {worker.world} workers")
    start = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(io.BytesIO(checkpoint.read_bytes()), weights_only=True)
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        start = int(state["step"])
    image_size = images.shape[-1]
    model.train()
    for step in range(start, steps):
        plan = plan_batch(protocol, generator, len(images), batch, image_size, config.flip, config.cutmix)
        x, w = apply_plan(images, weights, plan)  # the global batch, identical on every worker
        mine = slice(worker.rank, None, worker.world)
        x, w, y = x[mine].to(device), w[mine].to(device), labels[plan["index"][mine]].to(device)
        loss = loss_fn(model(x), x, y, w, step, mine)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        done = step + 1
        if report_every and (done % report_every == 0 or done == steps):
            if checkpoint is not None and done < steps and worker.rank == 0:
                state = {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                         "schedule": schedule.state_dict(), "generator": generator.get_state(), "step": done}
                buffer = io.BytesIO()
                torch.save(state, buffer)
                atomic_write_bytes(checkpoint, buffer.getvalue())  # local or object store, whole or not at all
            if report is not None:
                report(done, _unwrap(model))
                model.train()
    return model.eval()


def train_teacher(data: TrainSet, num_classes: int, arch: str, config: EvaluateConfig, seed: int,
                  worker: Worker = Worker()) -> nn.Module:
    """Cross-entropy on the full train split (AdamW, cosine, crop/flip, no CutMix) for `teacher_epochs`."""
    torch.manual_seed(seed)
    model = worker.wrap_model(create_student(arch, num_classes, data.images.shape[1], config.width))
    steps = epochs_to_steps(len(data.labels), config.teacher_epochs, config.batch_size)
    crop = get_protocol("rded")
    no_cutmix = dataclasses.replace(config, cutmix=False)
    return fit(model, data, steps, crop, no_cutmix, seed, lambda logits, _x, y, _w, _s, _m: F.cross_entropy(logits, y),
               worker)


def train_student(data: TrainSet, teacher: nn.Module | None, num_classes: int, arch: str, epochs: int,
                  config: EvaluateConfig, seed: int, worker: Worker = Worker(),
                  soft_labels: dict[str, torch.Tensor] | None = None, report: Callable | None = None,
                  reports: int = 10, checkpoint: Path | None = None) -> nn.Module:
    """Train `arch` on `data` under `config.protocol` for `epochs` epochs of the set.

    rded: `teacher` labels each augmented batch online. fkd: `soft_labels` (from `generate_soft_labels`, same
    seed) supply each batch's stored logits; the teacher is not used. hard: labels and cross-entropy; the
    teacher is ignored."""
    protocol = get_protocol(config.protocol)
    torch.manual_seed(seed)
    model = worker.wrap_model(create_student(arch, num_classes, data.images.shape[1], config.width))
    steps = epochs_to_steps(len(data.labels), epochs, config.batch_size)
    if protocol.stored_labels and (soft_labels is None or len(soft_labels["logits"]) != steps):
        raise ValueError(f"protocol fkd needs stored soft labels for all {steps} steps (generate_soft_labels)")
    if protocol.soft_labels and not protocol.stored_labels and teacher is None:
        raise ValueError(f"protocol {protocol.name} needs a teacher")
    if teacher is not None:
        teacher.eval()

    def loss_fn(logits, x, y, w, step, mine):
        if not protocol.soft_labels:
            return weighted_ce_loss(logits, y, w)
        if protocol.stored_labels:
            target = soft_labels["logits"][step][mine].to(logits.device)
        else:
            with torch.no_grad():
                target = teacher(x)  # soft labels of this very augmented batch
        return weighted_kd_loss(logits, target, w, config.temperature)

    every = max(1, steps // max(1, reports))
    return fit(model, data, steps, protocol, config, seed, loss_fn, worker, report, every, checkpoint)


def load_teacher(path_or_bytes: str | Path | bytes, architecture: str, num_classes: int, image_size: int,
                 width: int, device: str | torch.device) -> nn.Module:
    """A teacher from a safetensors state dict (a local path, anything with `read_bytes()` such as an object-store
    path, or the bytes themselves), in eval mode and ON `device`: the student's batches live on the worker's
    device, and a teacher left on the CPU crashes the first soft-label batch on a GPU."""
    from safetensors.torch import load

    if isinstance(path_or_bytes, (bytes, bytearray)):
        blob = bytes(path_or_bytes)
    elif hasattr(path_or_bytes, "read_bytes"):
        blob = path_or_bytes.read_bytes()
    else:
        blob = Path(path_or_bytes).read_bytes()
    teacher = create_student(architecture, num_classes, image_size, width)
    teacher.load_state_dict(load(blob))
    return teacher.to(device).eval().requires_grad_(False)


@torch.no_grad()
def generate_soft_labels(data: TrainSet, teacher: nn.Module, epochs: int, config: EvaluateConfig,
                         seed: int) -> dict[str, torch.Tensor]:
    """FKD: every batch plan of the run (same generator as `fit` with this seed) and the teacher's logits on it.
    Returns {"logits": (steps, B, classes), "index": (steps, B), "affine": (steps, B, 5)[, "perm", "box"]}."""
    protocol = get_protocol(config.protocol)
    generator = torch.Generator().manual_seed(seed)
    images, weights = to_float(data.images), torch.as_tensor(data.weights, dtype=torch.float32)
    steps = epochs_to_steps(len(data.labels), epochs, config.batch_size)
    batch = min(config.batch_size, len(images))
    device = next(teacher.parameters()).device
    teacher.eval()
    stored: dict[str, list[torch.Tensor]] = {}
    for _ in range(steps):
        plan = plan_batch(protocol, generator, len(images), batch, images.shape[-1], config.flip, config.cutmix)
        x, _ = apply_plan(images, weights, plan)
        plan["logits"] = teacher(x.to(device)).float().cpu()
        for key, value in plan.items():
            stored.setdefault(key, []).append(value)
    return {key: torch.stack(values) for key, values in stored.items()}


@torch.no_grad()
def evaluate_top1(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 512) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(to_float(images[start : start + batch_size]).to(device))
        correct += int((logits.argmax(1).cpu().numpy() == labels[start : start + batch_size]).sum())
    return correct / len(labels)
