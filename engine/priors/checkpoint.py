"""Resumable training state of the tiny prior: safetensors weights + optimizer/RNG state + a small JSON pointer.

<folder>/state.json -> {"phase": "vae" | "unet", "step": n, "dir": "step-..."}; <folder>/<dir>/ holds vae/ (and
unet/ in the unet phase) saved with save_pretrained (safetensors) and training.pt: optimizer, LR schedule and the
torch.Generator state, read back with torch.load(weights_only=True) (tensors and plain containers only, no pickle
of code). The pointer is replaced atomically after the step folder is complete, so a kill at any moment leaves
the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

STATE_FILE = "state.json"


class Checkpointer:
    def __init__(self, folder: str | Path, every: int = 200):
        self.folder = Path(folder)
        self.every = every

    def state(self) -> dict | None:
        path = self.folder / STATE_FILE
        return json.loads(path.read_text()) if path.exists() else None

    def due(self, step: int, total: int) -> bool:
        return step % self.every == 0 or step == total

    def save(self, phase: str, step: int, prior, optimizer, lr_schedule, generator: torch.Generator,
             ema=None) -> None:
        name = f"{phase}-{step:07d}"
        target = self.folder / name
        shutil.rmtree(target, ignore_errors=True)
        prior.vae.save_pretrained(target / "vae")
        if phase == "unet":
            prior.unet.save_pretrained(target / "unet")
        training = {"optimizer": optimizer.state_dict() if optimizer else None,
                    "lr_schedule": lr_schedule.state_dict() if lr_schedule else None,
                    "generator": generator.get_state(), "ema": ema.state_dict() if ema else None}
        torch.save(training, target / "training.pt")
        pointer = self.folder / (STATE_FILE + ".tmp")
        pointer.write_text(json.dumps({"phase": phase, "step": step, "dir": name}))
        os.replace(pointer, self.folder / STATE_FILE)  # the checkpoint exists from here on
        for old in self.folder.iterdir():
            if old.is_dir() and old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def restore(self, prior, optimizer, lr_schedule, generator: torch.Generator, ema=None) -> dict:
        """Load weights and optimizer/RNG state (and the UNet's moving average) of the last checkpoint into the
        given objects; returns its state."""
        from diffusers import AutoencoderKL, UNet2DModel

        state = self.state()
        source = self.folder / state["dir"]
        vae = AutoencoderKL.from_pretrained(source / "vae", use_safetensors=True, low_cpu_mem_usage=False)
        prior.vae.load_state_dict(vae.state_dict())
        prior.vae.register_to_config(scaling_factor=vae.config.scaling_factor)
        if (source / "unet").exists():
            unet = UNet2DModel.from_pretrained(source / "unet", use_safetensors=True, low_cpu_mem_usage=False)
            prior.unet.load_state_dict(unet.state_dict())
        training = torch.load(source / "training.pt", weights_only=True)
        if optimizer is not None and training["optimizer"] is not None:
            optimizer.load_state_dict(training["optimizer"])
        if lr_schedule is not None and training["lr_schedule"] is not None:
            lr_schedule.load_state_dict(training["lr_schedule"])
        generator.set_state(training["generator"])
        if ema is not None and training.get("ema") is not None:
            ema.load_state_dict(training["ema"])
        return state

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
