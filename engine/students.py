"""Student and teacher networks. ConvNet-3 is the dataset-distillation standard (DC/DM/MTT): three blocks of
conv 3x3 -> instance norm -> ReLU -> avg-pool 2, then a linear classifier. timm students are the
evaluation issue."""

from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    def __init__(self, num_classes: int, image_size: int, width: int = 128, depth: int = 3, channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [
                nn.Conv2d(channels if i == 0 else width, width, 3, padding=1),
                nn.GroupNorm(width, width, affine=True),  # instance norm, as in the DC/DM ConvNet
                nn.ReLU(inplace=True),
                nn.AvgPool2d(2),
            ]
        self.features = nn.Sequential(*layers)
        side = image_size // 2**depth
        if side < 1:
            raise ValueError(f"image size {image_size} is too small for a depth-{depth} ConvNet")
        self.classifier = nn.Linear(width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, classes)
        return self.classifier(self.features(x).flatten(1))


def create_student(name: str, num_classes: int, image_size: int, width: int = 128) -> nn.Module:
    if name == "convnet3":
        return ConvNet(num_classes, image_size, width=width, depth=3)
    raise NotImplementedError(f"student {name!r}: timm students are the evaluation issue (#6); only convnet3 exists")
