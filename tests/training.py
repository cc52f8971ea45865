"""Test-only training helpers: the engine trains its teachers streamed through Ray Train (engine/ray/train_loop.py);
tests train small ones in memory with the same recipe, loss and fit loop."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from engine.config import EvaluateConfig
from engine.evaluate.protocols import standardize, teacher_norm
from engine.evaluate.train import TrainSet, Worker, epochs_to_steps, fit, image_tensor, new_model, teacher_loss, teacher_recipe


def to_float(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1] (a batch: sets stay uint8, see `image_tensor`)."""
    return standardize(image_tensor(images))


def train_teacher(data: TrainSet, num_classes: int, arch: str, config: EvaluateConfig, seed: int,
                  worker: Worker = Worker()) -> nn.Module:
    """A teacher on a train split held in memory, for `teacher_epochs`."""
    torch.manual_seed(seed)
    size = data.images.shape[1]
    model = new_model(arch, num_classes, size, config.width, worker, teacher_norm(config, size))
    steps = epochs_to_steps(len(data.labels), config.teacher_epochs, config.batch_size)
    return fit(model, data, steps, teacher_recipe(config, seed), teacher_loss, worker)
