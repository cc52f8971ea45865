"""The `dit` prior: DiT-XL/2-256 (DiTTransformer2DModel, class-conditional on 1000 classes) + an
sd-vae-ft-mse-style AutoencoderKL + its scheduler, from a local diffusers folder (vae/, transformer/, scheduler/):
the engine's own save, or the hub folder, whose transformer/config.json names the older Transformer2DModel.

encode: uint8 (B, H, W, 3) -> resized to the transformer's resolution (sample_size 32 x the VAE's factor 8 = 256)
-> latents (B, 4, 32, 32) = mean x 0.18215.
decode: the quantized latent is the sampler's initialisation: the centroid noised to `strength` starts the
reverse process (guidance default 4.0, 50 steps). strength 1.0 starts from pure noise and ignores the centroid:
the plain class-conditional DiT baseline. The transformer predicts (eps, sigma); sigma is dropped as in
diffusers' DiTPipeline, and guidance is applied to eps with the extra "null" class id num_classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

from engine.config import DecodeConfig
from engine.decode import check_decode_inputs, img2img_timesteps, pixels_to_images, row_noise
from engine.encode import encode_images
from engine.priors.base import (PriorFolder, Resolution, check_prior_folder, denoiser_resolution, guided,
                                 load_scheduler, move)
from engine.priors.sd15 import SD15_VAE, NetworkTuning, weights

COMPONENTS = ("vae", "transformer", "scheduler")

DIT_XL2_256 = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, patch_size=2,
    sample_size=32, num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False,
    norm_eps=1e-5, attention_bias=True, activation_fn="gelu-approximate", dropout=0.0, norm_num_groups=32,
    upcast_attention=False,
)
SD_VAE_FT_MSE = {**SD15_VAE, "sample_size": 256}  # same architecture as SD's VAE, decoder fine-tuned
DIT_SCHEDULER = dict(  # DiT's training schedule: linear betas 1e-4 .. 0.02 over 1000 steps
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False,
)


@dataclass
class DiTPrior:
    """Implements engine.priors.base.Prior. class_ids maps data labels to the model's class ids (empty = same)."""

    kind = "dit"  # class attribute, not a field
    vae: AutoencoderKL
    transformer: DiTTransformer2DModel
    scheduler: object
    class_names: tuple[str, ...]
    tuning: NetworkTuning = field(default_factory=NetworkTuning, repr=False, compare=False)

    @property
    def resolution(self) -> Resolution:
        return denoiser_resolution(self.vae.config, self.transformer.config, "transformer")

    @property
    def image_size(self) -> int:
        return self.resolution.image_size

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.resolution.latent_shape

    @property
    def num_model_classes(self) -> int:
        return int(self.transformer.config.num_embeds_ada_norm)

    def to(self, device: str, dtype: str = "float32") -> "DiTPrior":
        for module in (self.vae, self.transformer):
            move(module, device, dtype)
        return self

    def eval(self) -> "DiTPrior":
        self.vae.eval()
        self.transformer.eval()
        return self

    def encode(self, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
        return encode_images(self.vae, images, batch_size, size=self.image_size)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    def condition(self, labels: np.ndarray, config: DecodeConfig) -> torch.Tensor:
        """The model's class ids of a batch, then its null class for each (engine/invert.py)."""
        ids = torch.tensor(self.model_class_ids(np.asarray(labels), config.class_ids), device=self.transformer.device)
        return torch.cat([ids, torch.full_like(ids, self.num_model_classes)])

    def guided_eps(self, x: torch.Tensor, t: int, condition: torch.Tensor, guidance_scale: float,
                   config: DecodeConfig) -> torch.Tensor:
        from engine.invert import epsilon_of

        transformer = self.tuning.denoiser(self.transformer, self.vae, config)
        alone = guidance_scale == 1.0  # the class's branch alone: half the work
        model_input = self.scheduler.scale_model_input(x if alone else torch.cat([x, x]), t)
        timestep = torch.full((len(model_input),), int(t), device=model_input.device)
        out = transformer(model_input, timestep=timestep, class_labels=condition[:len(model_input)]).sample
        eps = out[:, :self.latent_shape[0]]  # the transformer also predicts its sigma
        if not alone:
            eps = guided(*eps.chunk(2), guidance_scale)
        return epsilon_of(self.scheduler, eps, x, t)

    def model_class_ids(self, labels: np.ndarray, class_ids: tuple[int, ...]) -> np.ndarray:
        if class_ids and len(class_ids) != len(self.class_names):
            raise ValueError(f"decode.class_ids has {len(class_ids)} entries for {len(self.class_names)} data classes")
        ids = np.asarray(class_ids)[labels] if class_ids else np.asarray(labels)
        if len(ids) and not 0 <= ids.min() <= ids.max() < self.num_model_classes:
            raise ValueError(f"DiT class ids must lie in [0, {self.num_model_classes}); set decode.class_ids to map "
                             f"the data's labels onto the model's classes")
        return ids

    @torch.no_grad()
    def decode(self, latents: np.ndarray, labels: np.ndarray, config: DecodeConfig, keys: np.ndarray,
               size: int | None = None) -> np.ndarray:
        check_decode_inputs(latents, labels, config.strength, len(self.class_names))
        parameter = next(self.transformer.parameters())
        device, dtype = parameter.device, parameter.dtype
        ids = torch.tensor(self.model_class_ids(np.asarray(labels), config.class_ids), device=device)
        timesteps = img2img_timesteps(self.scheduler, config.num_steps, config.strength)
        noise = row_noise(self.latent_shape, config.seed, keys).to(device, dtype)  # (K, 4, 32, 32)
        if config.strength >= 1.0:  # plain DiT: start from noise alone
            x = noise * self.scheduler.init_noise_sigma
        else:
            clean = torch.tensor(np.asarray(latents), dtype=dtype, device=device)
            x = self.scheduler.add_noise(clean, noise, timesteps[:1].repeat(len(clean)))
        classes = torch.cat([ids, torch.full_like(ids, self.num_model_classes)])  # batched CFG: class, then null
        channels = self.latent_shape[0]
        transformer = self.tuning.denoiser(self.transformer, self.vae, config)
        for t in timesteps:
            model_input = self.scheduler.scale_model_input(torch.cat([x, x]), t)
            out = transformer(model_input, timestep=t.expand(len(model_input)).to(device),
                              class_labels=classes).sample  # (2K, 8, 32, 32): eps and learned sigma
            eps_cond, eps_null = out[:, :channels].chunk(2)
            x = self.scheduler.step(guided(eps_cond, eps_null, config.guidance_scale), t, x).prev_sample
        pixels = self.vae.decode(x / self.vae.config.scaling_factor).sample  # (K, 3, 256, 256)
        return pixels_to_images(pixels, size)

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        self.vae.save_pretrained(folder / "vae")
        self.transformer.save_pretrained(folder / "transformer")
        self.scheduler.save_pretrained(folder / "scheduler")
        index = {"_class_name": "DiTPipeline", "vae": ["diffusers", "AutoencoderKL"],
                 "transformer": ["diffusers", "DiTTransformer2DModel"],
                 "scheduler": ["diffusers", type(self.scheduler).__name__]}
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def build_dit_prior(class_names: tuple[str, ...], vae: dict = SD_VAE_FT_MSE, transformer: dict = DIT_XL2_256,
                    scheduler: dict = DIT_SCHEDULER) -> DiTPrior:
    """Random weights (seed with torch.manual_seed first); defaults = the real DiT-XL/2-256 and sd-vae-ft-mse."""
    return DiTPrior(AutoencoderKL(**vae), DiTTransformer2DModel(**transformer), DDIMScheduler(**scheduler),
                    tuple(class_names)).eval()


def load_dit_prior(folder: str | Path, class_names: tuple[str, ...], variant: str = "auto") -> DiTPrior:
    """Load a DiT diffusers folder (`variant`: prior.variant); a missing, malformed or mismatched part raises an
    error naming it before any weight is read."""
    checked = check_prior_folder(Path(folder), COMPONENTS, variant)
    check_dit_config(checked)
    return DiTPrior(
        vae=AutoencoderKL.from_pretrained(**weights(checked, "vae"), low_cpu_mem_usage=False),
        transformer=DiTTransformer2DModel.from_pretrained(**weights(checked, "transformer"), low_cpu_mem_usage=False),
        scheduler=load_scheduler(checked.path / "scheduler"),
        class_names=tuple(class_names),
    ).eval()


def check_dit_config(checked: PriorFolder) -> None:
    """Transformer2DModel is also the class of text-conditioned transformers (PixArt): only DiT's class-conditional
    adaLN-zero layout loads into DiTTransformer2DModel."""
    config = checked.config("transformer")
    if config.get("norm_type") != "ada_norm_zero" or not config.get("num_embeds_ada_norm"):
        raise ValueError(f"prior folder {checked.path}: transformer/config.json is not a class-conditional DiT "
                         f"(norm_type {config.get('norm_type')!r}, num_embeds_ada_norm "
                         f"{config.get('num_embeds_ada_norm')!r}): point prior.path at a DiT folder")
