"""Student and teacher networks: ConvNet-3 (the dataset-distillation standard of DC/DM/MTT: three blocks of
conv 3x3 -> instance norm -> ReLU -> avg-pool 2, then a linear classifier) or any timm model by name.

Small images: timm's ImageNet stems downsample 4x (ResNet: 7x7 stride-2 conv + max-pool; MobileNet/EfficientNet:
stride-2 conv), which leaves 1-2 pixels of a 28x28 image for the later stages. Below 64 px the stem is made
CIFAR-style, as the distillation literature does for ResNet-18 on 32x32: ResNets get a 3x3 stride-1 conv and no
max-pool; MobileNet/EfficientNet stems get stride 1; Swin gets the image size and a window that divides it.
"""

from __future__ import annotations

import torch
from torch import nn

SMALL_IMAGE = 64  # below this side length, timm stems are made CIFAR-style


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


def _small_image_stem(model: nn.Module, name: str, channels: int) -> nn.Module:
    if hasattr(model, "conv1") and hasattr(model, "maxpool"):  # timm ResNet family
        model.conv1 = nn.Conv2d(channels, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif hasattr(model, "conv_stem"):  # MobileNet / EfficientNet family
        model.conv_stem.stride = (1, 1)
    elif "swin" not in name:
        raise ValueError(f"student {name!r}: no small-image stem rule for this timm family; use images >= "
                         f"{SMALL_IMAGE} px or add a rule in engine/evaluate/students.py")
    return model


def create_student(name: str, num_classes: int, image_size: int, width: int = 128, channels: int = 3) -> nn.Module:
    """`convnet3` (`width` = its feature channels) or a timm architecture name (randomly initialised; `width`
    unused), reading `channels` input channels."""
    if name == "convnet3":
        return ConvNet(num_classes, image_size, width=width, depth=3, channels=channels)
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown student {name!r}: not convnet3 and not a timm model name")
    kwargs = {}
    if "swin" in name and image_size < 224:
        # Patch 4 -> (image_size / 4)^2 tokens; the window must divide that side at every stage.
        kwargs = {"img_size": image_size, "window_size": max(1, image_size // 32)}
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=channels, **kwargs)
    return _small_image_stem(model, name, channels) if image_size < SMALL_IMAGE else model
