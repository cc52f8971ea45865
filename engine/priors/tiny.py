"""The `tiny` prior: a small AutoencoderKL + class-conditional UNet2DModel + DDIM scheduler, in diffusers format.

It is the generative model of the embedded default (digits) and of new small domains. Layout on disk, as
diffusers stores pipelines: <folder>/{vae,unet,scheduler}/ and prior.json (kind, image_size, class names).
The UNet has `num_classes + 1` class embeddings; the last one is the null class used for classifier-free
guidance (trained by dropping labels, see train_tiny.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel

from engine.config import DecodeConfig, PriorConfig
from engine.decode import check_decode_inputs, img2img_timesteps, pixels_to_images, row_noise
from engine.encode import images_to_tensor, tensor_to_images
from engine.priors.base import guided

PRIOR_FILE = "prior.json"
SUBFOLDERS = ("vae", "unet", "scheduler")


@dataclass
class TinyPrior:
    """Implements engine.priors.base.Prior."""

    kind = "tiny"  # class attribute, not a field
    vae: AutoencoderKL
    unet: UNet2DModel
    scheduler: DDIMScheduler
    image_size: int
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        side = self.image_size // factor
        return (self.vae.config.latent_channels, side, side)

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        self.vae.save_pretrained(folder / "vae")
        self.unet.save_pretrained(folder / "unet")
        self.scheduler.save_pretrained(folder / "scheduler")
        meta = {"kind": "tiny", "image_size": self.image_size, "class_names": list(self.class_names)}
        (folder / PRIOR_FILE).write_text(json.dumps(meta, indent=2))

    def to(self, device: str, dtype: str = "float32") -> "TinyPrior":
        from engine.priors.base import move

        move(self.vae, device, dtype)
        move(self.unet, device, dtype)
        return self

    def encode(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        from engine.encode import encode_images

        return encode_images(self.vae, images, batch_size, size=self.image_size)

    def decode(self, latents: np.ndarray, labels: np.ndarray, config: DecodeConfig, keys: np.ndarray,
               size: int | None = None) -> np.ndarray:
        images = decode_centroids(self, latents, labels, config.guidance_scale, config.strength, config.num_steps,
                                  config.seed, keys)
        return images if not size or size == self.image_size else pixels_to_images(images_to_tensor(images), size)

    def eval(self) -> "TinyPrior":
        self.vae.eval()
        self.unet.eval()
        return self

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    def condition(self, labels: np.ndarray, config: DecodeConfig) -> torch.Tensor:
        """The class ids of a batch, then the null class for each: one UNet call guides (engine/invert.py)."""
        cond = torch.tensor(np.asarray(labels), dtype=torch.long, device=self.unet.device)
        return torch.cat([cond, torch.full_like(cond, self.null_class)])

    def guided_eps(self, x: torch.Tensor, t: int, condition: torch.Tensor, guidance_scale: float,
                   config: DecodeConfig) -> torch.Tensor:
        from engine.invert import epsilon_of

        if guidance_scale == 1.0:  # the conditional branch alone: half the work
            return epsilon_of(self.scheduler, self.unet(x, t, class_labels=condition[:len(x)]).sample, x, t)
        out_cond, out_null = self.unet(torch.cat([x, x]), t, class_labels=condition).sample.chunk(2)
        return epsilon_of(self.scheduler, guided(out_cond, out_null, guidance_scale), x, t)


@torch.no_grad()
def decode_centroids(
    prior: TinyPrior,
    latents: np.ndarray,
    labels: np.ndarray,
    guidance_scale: float,
    strength: float,
    num_steps: int,
    seed: int,
    keys: np.ndarray | None = None,
) -> np.ndarray:
    """latents (K, C, h, w) already times the scaling factor; labels (K,) int; keys (K,) ints for the noise."""
    check_decode_inputs(latents, labels, strength, prior.num_classes)
    keys = np.arange(len(latents)) if keys is None else keys
    device = next(prior.unet.parameters()).device
    scheduler = prior.scheduler
    timesteps = img2img_timesteps(scheduler, num_steps, strength)

    dtype = next(prior.unet.parameters()).dtype
    clean = torch.tensor(latents, dtype=dtype, device=device)  # (K, C, h, w)
    noise = row_noise(tuple(clean.shape[1:]), seed, keys).to(device, dtype)
    x = scheduler.add_noise(clean, noise, timesteps[:1].repeat(len(clean)))
    cond = torch.tensor(np.asarray(labels), dtype=torch.long, device=device)  # copy: Ray batches are read-only
    null = torch.full_like(cond, prior.null_class)
    for t in timesteps:
        eps_cond, eps_null = prior.unet(torch.cat([x, x]), t, class_labels=torch.cat([cond, null])).sample.chunk(2)
        eps = eps_null + guidance_scale * (eps_cond - eps_null)
        x = scheduler.step(eps, t, x).prev_sample
    pixels = prior.vae.decode(x / prior.vae.config.scaling_factor).sample  # (K, 3, H, W) in [-1, 1]
    return tensor_to_images(pixels)


def build_tiny_prior(config: PriorConfig, image_size: int, class_names: tuple[str, ...]) -> TinyPrior:
    """Randomly initialised prior from config (seeded by the caller)."""
    vae_blocks = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * vae_blocks,
        up_block_types=("UpDecoderBlock2D",) * vae_blocks,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=8,
        sample_size=image_size,
    )
    latent_side = image_size // 2 ** (vae_blocks - 1)
    unet_blocks = len(config.unet_channels)
    lowest_down, lowest_up = ("AttnDownBlock2D", "AttnUpBlock2D") if config.unet_attention else ("DownBlock2D", "UpBlock2D")
    unet = UNet2DModel(
        sample_size=latent_side,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        block_out_channels=config.unet_channels,
        layers_per_block=1,
        # Attention, when on, only at the lowest resolution and in the middle block.
        down_block_types=("DownBlock2D",) * (unet_blocks - 1) + (lowest_down,),
        up_block_types=(lowest_up,) + ("UpBlock2D",) * (unet_blocks - 1),
        add_attention=config.unet_attention,
        num_class_embeds=len(class_names) + 1,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=config.prediction,  # saved with the prior: sampling reads what the UNet predicts
    )
    return TinyPrior(vae, unet, scheduler, image_size, tuple(class_names))


def load_tiny_prior(folder: str | Path) -> TinyPrior:
    """Load a saved tiny prior (safetensors weights through diffusers' from_pretrained)."""
    folder = Path(folder)
    missing = [name for name in (*SUBFOLDERS, PRIOR_FILE) if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"prior folder {folder} is missing {', '.join(missing)}")
    meta = json.loads((folder / PRIOR_FILE).read_text())
    if meta.get("kind") != "tiny":
        raise ValueError(f"{folder / PRIOR_FILE}: kind {meta.get('kind')!r} is not 'tiny'")
    return TinyPrior(
        # low_cpu_mem_usage=False: tiny models need no `accelerate` (and its warning).
        vae=AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True, low_cpu_mem_usage=False),
        unet=UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True, low_cpu_mem_usage=False),
        scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"),
        image_size=int(meta["image_size"]),
        class_names=tuple(meta["class_names"]),
    ).eval()
