"""The `sd15` prior: Stable Diffusion v1.5 from a local diffusers folder (vae/, unet/, text_encoder/, tokenizer/,
scheduler/), safetensors only, in any layout engine.priors.base accepts (full precision, a variant such as fp16,
sharded).

encode: uint8 (B, H, W, 3) -> resized to the UNet's resolution (sample_size 64 x the VAE's factor 8 = 512) ->
latents (B, 4, 64, 64) = mean x 0.18215.
decode: img2img from each centroid (D4M: strength 0.7 of 50 steps, guidance 8, negative prompt "cartoon, anime,
painting"): noise to `strength`, denoise with the class-name prompt and batched classifier-free guidance against
the negative prompt, VAE-decode, resize to the evaluation resolution.
The SD15_* dicts are SD v1.5's published configs: tests and benchmarks build the real architecture from them
with random weights (no hub access here).
The decode config's speed keys (channels_last, sdpa, compile) are applied to the networks by NetworkTuning, which
the dit prior shares.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from engine.config import DecodeConfig
from engine.decode import check_decode_inputs, img2img_timesteps, pixels_to_images, row_noise
from engine.encode import encode_images
from engine.priors.base import (PriorFolder, Resolution, check_prior_folder, denoiser_resolution, guided,
                                 load_scheduler, move)

COMPONENTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")

SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu", norm_num_groups=32,
)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5, center_input_sample=False,
)
SD15_TEXT_ENCODER = dict(  # openai/clip-vit-large-patch14's text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5,
)
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
)


@dataclass
class NetworkTuning:
    """The decode config's speed keys applied to a prior's networks, once per setting: re-applying them on every
    batch would rebuild the attention processors that a compiled graph guards on, and recompile it."""

    setting: tuple = ()
    compiled: torch.nn.Module | None = None

    def denoiser(self, denoiser: torch.nn.Module, vae: torch.nn.Module, config: DecodeConfig) -> torch.nn.Module:
        """The callable denoiser for `config` (compiled or not), after tuning it and the VAE in place."""
        from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

        setting = (config.channels_last, config.sdpa, config.compile)
        if setting == self.setting:
            return denoiser if self.compiled is None else self.compiled
        memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        for network in (denoiser, vae):
            network.to(memory_format=memory_format)  # 4-D weights only: the convolutions then run NHWC
            for module in network.modules():
                if isinstance(module, Attention):
                    module.set_processor(AttnProcessor2_0() if config.sdpa else AttnProcessor())
        self.compiled = None if config.compile == "none" else torch.compile(denoiser, backend=config.compile)
        self.setting = setting
        return denoiser if self.compiled is None else self.compiled


@dataclass
class StableDiffusionPrior:
    """Implements engine.priors.base.Prior. Class names come from the data: they are the prompts."""

    kind = "sd15"  # class attribute, not a field
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: object
    class_names: tuple[str, ...]
    tuning: NetworkTuning = field(default_factory=NetworkTuning, repr=False, compare=False)

    @property
    def resolution(self) -> Resolution:
        return denoiser_resolution(self.vae.config, self.unet.config, "unet")

    @property
    def image_size(self) -> int:
        return self.resolution.image_size

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.resolution.latent_shape

    def to(self, device: str, dtype: str = "float32") -> "StableDiffusionPrior":
        for module in (self.vae, self.unet, self.text_encoder):
            move(module, device, dtype)
        return self

    def eval(self) -> "StableDiffusionPrior":
        for module in (self.vae, self.unet, self.text_encoder):
            module.eval()
        return self

    def encode(self, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
        return encode_images(self.vae, images, batch_size, size=self.image_size)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    @torch.no_grad()
    def condition(self, labels: np.ndarray, config: DecodeConfig) -> torch.Tensor:
        """The prompts' embeddings of a batch, then the negative prompt's for each (engine/invert.py): one text
        encoder pass for the distinct classes of the batch, prepared once for every step."""
        names = [self.class_names[int(label)] for label in labels]
        unique = sorted(set(names))
        embedded = self.embed_prompts(unique + [config.negative_prompt])  # (U + 1, 77, D)
        cond = embedded[[unique.index(name) for name in names]]
        return torch.cat([cond, embedded[-1:].expand_as(cond)])

    def guided_eps(self, x: torch.Tensor, t: int, condition: torch.Tensor, guidance_scale: float,
                   config: DecodeConfig) -> torch.Tensor:
        from engine.invert import epsilon_of

        unet = self.tuning.denoiser(self.unet, self.vae, config)
        if guidance_scale == 1.0:  # the prompt's branch alone: half the work
            out = unet(self.scheduler.scale_model_input(x, t), t, encoder_hidden_states=condition[:len(x)]).sample
            return epsilon_of(self.scheduler, out, x, t)
        model_input = self.scheduler.scale_model_input(torch.cat([x, x]), t)
        out_cond, out_null = unet(model_input, t, encoder_hidden_states=condition).sample.chunk(2)
        return epsilon_of(self.scheduler, guided(out_cond, out_null, guidance_scale), x, t)

    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(P,) strings -> CLIP last hidden states (P, 77, 768), padded to the tokenizer's max length as SD does."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    @torch.no_grad()
    def decode(self, latents: np.ndarray, labels: np.ndarray, config: DecodeConfig, keys: np.ndarray,
               size: int | None = None) -> np.ndarray:
        check_decode_inputs(latents, labels, config.strength, len(self.class_names))
        parameter = next(self.unet.parameters())
        timesteps = img2img_timesteps(self.scheduler, config.num_steps, config.strength)
        clean = torch.tensor(np.asarray(latents), dtype=parameter.dtype, device=parameter.device)  # (K, 4, 64, 64)
        noise = row_noise(tuple(clean.shape[1:]), config.seed, keys).to(parameter.device, parameter.dtype)
        x = self.scheduler.add_noise(clean, noise, timesteps[:1].repeat(len(clean)))
        # One text-encoder pass for the distinct classes of the batch, one for the negative prompt.
        names = [self.class_names[int(label)] for label in labels]
        unique = sorted(set(names))
        embedded = self.embed_prompts(unique + [config.negative_prompt])  # (U + 1, 77, D)
        cond = embedded[[unique.index(name) for name in names]]
        null = embedded[-1:].expand_as(cond)
        context = torch.cat([cond, null])  # batched CFG: one UNet call on 2K rows
        unet = self.tuning.denoiser(self.unet, self.vae, config)
        for t in timesteps:
            model_input = self.scheduler.scale_model_input(torch.cat([x, x]), t)
            eps_cond, eps_null = unet(model_input, t, encoder_hidden_states=context).sample.chunk(2)
            x = self.scheduler.step(guided(eps_cond, eps_null, config.guidance_scale), t, x).prev_sample
        pixels = self.vae.decode(x / self.vae.config.scaling_factor).sample  # (K, 3, 512, 512) in [-1, 1]
        return pixels_to_images(pixels, size)

    def save(self, folder: Path) -> None:
        """diffusers' StableDiffusionPipeline layout, safetensors weights."""
        folder = Path(folder)
        self.vae.save_pretrained(folder / "vae")
        self.unet.save_pretrained(folder / "unet")
        self.text_encoder.save_pretrained(folder / "text_encoder")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.scheduler.save_pretrained(folder / "scheduler")
        index = {"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"],
                 "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
                 "tokenizer": ["transformers", "CLIPTokenizer"],
                 "scheduler": ["diffusers", type(self.scheduler).__name__]}
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def write_byte_tokenizer(folder: Path, max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer with the 512 byte-level symbols and no merges, built offline (the real SD folder brings
    its own 49408-token vocabulary; this one is for random-weight builds: tests and benchmarks)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_length}))
    return CLIPTokenizer.from_pretrained(folder)


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-level BPE: one printable unicode symbol per byte value, in CLIP's vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1))
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def build_sd15_prior(class_names: tuple[str, ...], tokenizer_folder: Path, vae: dict = SD15_VAE,
                     unet: dict = SD15_UNET, text_encoder: dict = SD15_TEXT_ENCODER,
                     scheduler: dict = SD15_SCHEDULER) -> StableDiffusionPrior:
    """Random weights (seed with torch.manual_seed first) at the given configs; defaults = the real SD v1.5."""
    tokenizer = write_byte_tokenizer(tokenizer_folder, text_encoder["max_position_embeddings"])
    if text_encoder["vocab_size"] < len(tokenizer):
        raise ValueError(f"text encoder vocab_size {text_encoder['vocab_size']} < tokenizer size {len(tokenizer)}")
    text_config = CLIPTextConfig(**text_encoder, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return StableDiffusionPrior(AutoencoderKL(**vae), UNet2DConditionModel(**unet), CLIPTextModel(text_config),
                                tokenizer, PNDMScheduler(**scheduler), tuple(class_names)).eval()


def load_sd15_prior(folder: str | Path, class_names: tuple[str, ...], variant: str = "auto") -> StableDiffusionPrior:
    """Load a Stable Diffusion v1.5 diffusers folder (`variant`: prior.variant); a missing, malformed or mismatched
    part raises an error naming it before any weight is read."""
    checked = check_prior_folder(Path(folder), COMPONENTS, variant)
    check_text_width(checked)
    # dtype float32: transformers 5 would keep an fp16 variant in fp16; the engine casts in `to()` as the run asks.
    # low_cpu_mem_usage=False: loading without the optional `accelerate` package.
    return StableDiffusionPrior(
        vae=AutoencoderKL.from_pretrained(**weights(checked, "vae"), low_cpu_mem_usage=False),
        unet=UNet2DConditionModel.from_pretrained(**weights(checked, "unet"), low_cpu_mem_usage=False),
        text_encoder=CLIPTextModel.from_pretrained(**weights(checked, "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(checked.path / "tokenizer"),
        scheduler=load_scheduler(checked.path / "scheduler"),
        class_names=tuple(class_names),
    ).eval()


def weights(checked: PriorFolder, component: str) -> dict:
    """from_pretrained's arguments for one component of a checked folder: the files check_prior_folder found."""
    return dict(pretrained_model_name_or_path=checked.path / component, variant=checked.variant(component),
                use_safetensors=True, dtype=torch.float32)


def check_text_width(checked: PriorFolder) -> None:
    """A text encoder of another width (SD 2's OpenCLIP-H: 1024) than the UNet's cross-attention would load and
    fail only at the first decode, after the whole encode."""
    width, attends = checked.config("text_encoder")["hidden_size"], checked.config("unet")["cross_attention_dim"]
    if width != attends:
        raise ValueError(f"prior folder {checked.path}: text_encoder/config.json has hidden_size {width} but "
                         f"unet/config.json has cross_attention_dim {attends}: use the text encoder this UNet was "
                         f"trained with")
