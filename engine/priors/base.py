"""The interface every prior offers the engine, and the checks shared by the loaders.

A prior encodes uint8 images (B, H, W, 3) into latents (B, C, h, w) float32 (posterior mean x scaling factor, at
the prior's own resolution `image_size`) and decodes centroid latents + data labels back into uint8 images at the
evaluation resolution. Decode noise is per row (engine.decode.row_noise), so an image never depends on its batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from engine.config import DecodeConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@runtime_checkable
class Prior(Protocol):
    kind: str
    class_names: tuple[str, ...]

    @property
    def image_size(self) -> int: ...  # the resolution the VAE encodes at

    @property
    def latent_shape(self) -> tuple[int, int, int]: ...

    def to(self, device: str, dtype: str = "float32") -> "Prior": ...

    def encode(self, images: np.ndarray, batch_size: int = 16) -> np.ndarray: ...

    def decode(self, latents: np.ndarray, labels: np.ndarray, config: DecodeConfig, keys: np.ndarray,
               size: int | None = None) -> np.ndarray: ...


# Files a diffusers component folder must hold: a config and safetensors weights (never a pickle).
# "a|b": either will do (transformers 5 saves tokenizer.json; hub SD folders hold vocab.json + merges.txt).
WEIGHTS = "*.safetensors"
COMPONENT_FILES = {
    "vae": ("config.json", WEIGHTS),
    "unet": ("config.json", WEIGHTS),
    "transformer": ("config.json", WEIGHTS),
    "text_encoder": ("config.json", WEIGHTS),
    "tokenizer": ("tokenizer.json|vocab.json",),
    "scheduler": ("scheduler_config.json",),
}


def check_prior_folder(folder: Path, components: tuple[str, ...]) -> None:
    """Raise FileNotFoundError naming every missing part, ValueError naming a config that is not valid JSON."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"prior folder {folder} does not exist")
    missing = []
    for component in components:
        for pattern in COMPONENT_FILES[component]:
            if not any(list((folder / component).glob(p)) for p in pattern.split("|")):
                missing.append(f"{component}/{pattern}")
    if missing:
        raise FileNotFoundError(f"prior folder {folder} is missing {', '.join(missing)}")
    for config in folder.glob("*/*.json"):
        try:
            json.loads(config.read_text())
        except json.JSONDecodeError as error:
            name = config.relative_to(folder)
            raise ValueError(f"prior folder {folder}: {name} is not valid JSON ({error})") from None


def load_scheduler(folder: Path):
    """The scheduler class the folder names (PNDM for SD v1.5, DDIM for DiT), from the diffusers package only."""
    import diffusers

    name = json.loads((Path(folder) / "scheduler_config.json").read_text()).get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        raise ValueError(f"{folder}/scheduler_config.json names an unknown scheduler {name!r}")
    return cls.from_pretrained(folder)


def move(module: torch.nn.Module, device: str, dtype: str) -> None:
    """to(device), and to the dtype only when it changes (diffusers warns on every dtype cast, even a no-op)."""
    if DTYPES[dtype] == next(module.parameters()).dtype:
        module.to(device)
    else:
        module.to(device, DTYPES[dtype])


def guided(eps_cond: torch.Tensor, eps_null: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance."""
    return eps_null + guidance_scale * (eps_cond - eps_null)
