"""An exponential moving average of a module's weights (the weights a diffusion model samples with)."""

from __future__ import annotations

import torch
from torch import nn


class EmaWeights:
    """shadow <- decay_t * shadow + (1 - decay_t) * weights after every step, decay_t = min(decay, 1 - 1/(10 + t))
    so the first steps do not keep the random initialisation; buffers are copied as they are."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.steps = 0
        self.shadow = {name: value.detach().clone() for name, value in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.steps += 1
        decay = min(self.decay, 1.0 - 1.0 / (10 + self.steps))
        for name, value in module.state_dict().items():
            if value.is_floating_point():
                self.shadow[name].lerp_(value.detach(), 1.0 - decay)
            else:
                self.shadow[name].copy_(value)

    def copy_to(self, module: nn.Module) -> None:
        module.load_state_dict(self.shadow)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
