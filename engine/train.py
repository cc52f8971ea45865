"""Evaluate: train networks on image sets and measure top-1 on the held-out split. Pure torch.

Teacher: trained with cross-entropy on the full train split. Student (RDED-style online soft labels): on every
augmented batch the teacher's logits at temperature T are the target; the per-sample loss is
T^2 * KL(teacher || student) and each sample carries its set weight w (weights average 1 per class, so
`uniform` weights reproduce the plain loss): loss = mean_i w_i * l_i.
Images are (N, H, W, 3) uint8; `wrap_model` lets the Ray layer wrap the model for DDP without this module
knowing about Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import EvaluateConfig
from engine.students import create_student


@dataclass(frozen=True)
class TrainSet:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64
    weights: np.ndarray  # (N,) float, averaging 1 per class


def to_float(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, standardized to roughly zero mean, unit scale."""
    return (torch.tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


def augment(x: torch.Tensor, generator: torch.Generator, flip: bool, min_scale: float = 0.5) -> torch.Tensor:
    """Random-resized-crop (area scale in [min_scale, 1], aspect in [3/4, 4/3]) and optional horizontal flip,
    vectorized as one affine grid_sample per batch. (B, 3, H, W) -> (B, 3, H, W)."""
    b = len(x)
    area = min_scale + (1 - min_scale) * torch.rand(b, generator=generator)
    log_ratio = (torch.rand(b, generator=generator) - 0.5) * 2 * np.log(4 / 3)
    sx = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    sy = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    tx = (1 - sx) * (2 * torch.rand(b, generator=generator) - 1)
    ty = (1 - sy) * (2 * torch.rand(b, generator=generator) - 1)
    if flip:
        sx = sx * torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def weighted_kd_loss(student_logits, teacher_logits, weights, temperature: float) -> torch.Tensor:
    """mean_i w_i * T^2 * KL(softmax(t_i / T) || softmax(s_i / T))."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    per_sample = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(1) * temperature**2  # (B,)
    return (weights * per_sample).mean()


def _fit(model: nn.Module, data: TrainSet, steps: int, config: EvaluateConfig, seed: int,
         loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> nn.Module:
    """AdamW + cosine schedule for `steps` steps on random augmented batches drawn with replacement."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    images, labels = to_float(data.images), torch.as_tensor(data.labels)
    weights = torch.as_tensor(data.weights, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    batch = min(config.batch_size, len(images))
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(images), (batch,), generator=generator)
        x = augment(images[index], generator, config.flip).to(device)  # augmentation on CPU: same draws anywhere
        loss = loss_fn(model(x), x, labels[index].to(device), weights[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def epochs_to_steps(n: int, epochs: int, batch_size: int) -> int:
    return max(1, epochs * -(-n // batch_size))


def train_teacher(data: TrainSet, num_classes: int, config: EvaluateConfig, seed: int,
                  wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m) -> nn.Module:
    torch.manual_seed(seed)
    model = wrap_model(create_student(config.student, num_classes, data.images.shape[1], config.width))
    steps = epochs_to_steps(len(data.labels), config.teacher_epochs, config.batch_size)

    def loss_fn(logits, _x, labels, _w):
        return F.cross_entropy(logits, labels)

    return _fit(model, data, steps, config, seed, loss_fn)


def train_student(data: TrainSet, teacher: nn.Module, num_classes: int, steps: int, config: EvaluateConfig,
                  seed: int, wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m) -> nn.Module:
    torch.manual_seed(seed)
    model = wrap_model(create_student(config.student, num_classes, data.images.shape[1], config.width))
    teacher.eval()

    def loss_fn(logits, x, _labels, weights):
        with torch.no_grad():
            target = teacher(x)  # soft labels of this very augmented batch
        return weighted_kd_loss(logits, target, weights, config.temperature)

    return _fit(model, data, steps, config, seed, loss_fn)


@torch.no_grad()
def evaluate_top1(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 512) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(to_float(images[start : start + batch_size]).to(device))
        correct += int((logits.argmax(1).cpu().numpy() == labels[start : start + batch_size]).sum())
    return correct / len(labels)
