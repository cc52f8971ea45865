"""Scaled-down configs of the real SD v1.5 / DiT classes for the fast tier (same block types, smaller widths), and
the weight layouts users download, written by diffusers' and transformers' own save_pretrained."""

import copy
import json
from pathlib import Path

import torch

from engine.priors.dit import DIT_XL2_256, SD_VAE_FT_MSE
from engine.priors.sd15 import SD15_TEXT_ENCODER, SD15_UNET, SD15_VAE

SMALL_VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, sample_size=32)
SD15_SMALL = dict(
    vae={**SD15_VAE, **SMALL_VAE},
    unet={**SD15_UNET, "sample_size": 16, "block_out_channels": (16, 32), "layers_per_block": 1,
          "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
          "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32, "attention_head_dim": 4,
          "norm_num_groups": 4},
    text_encoder={**SD15_TEXT_ENCODER, "vocab_size": 514, "hidden_size": 32, "intermediate_size": 37,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "projection_dim": 32},
)
DIT_SMALL = dict(
    vae={**SD_VAE_FT_MSE, **SMALL_VAE},
    transformer={**DIT_XL2_256, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2, "sample_size": 16},
)

WEIGHTED = ("vae", "unet", "transformer", "text_encoder")
LAYOUTS = ("full", "fp16", "sharded", "bin")


def weighted_modules(prior) -> dict[str, torch.nn.Module]:
    return {name: getattr(prior, name) for name in WEIGHTED if hasattr(prior, name)}


def save_in_layout(prior, folder: Path, layout: str) -> Path:
    """The prior's folder with its weights as users find them: "full" (the engine's own save), "fp16" (fp16 tensors
    in *.fp16.safetensors only, as save_pretrained(variant="fp16") of a half model writes), "sharded" (several
    shards + index) or "bin" (pickles only, as old hub snapshots hold)."""
    prior.save(folder)
    if layout == "full":
        return folder
    for name, module in weighted_modules(prior).items():
        directory = folder / name
        for old in directory.glob("*.safetensors*"):
            old.unlink()
        if layout == "fp16":
            copy.deepcopy(module).half().save_pretrained(directory, variant="fp16")
        elif layout == "sharded":
            module.save_pretrained(directory, max_shard_size="40KB")
        elif name == "text_encoder":  # transformers 5 writes safetensors only: the pickle an old snapshot holds
            torch.save(module.state_dict(), directory / "pytorch_model.bin")
        else:
            module.save_pretrained(directory, safe_serialization=False)
    return folder


def save_dit_hub_layout(prior, folder: Path) -> Path:
    """The DiT hub folder's layout: the transformer saved by diffusers' Transformer2DModel (its class before
    DiTTransformer2DModel existed), named so in transformer/config.json and model_index.json."""
    from diffusers import Transformer2DModel

    prior.save(folder)
    # The constructor, not from_config: from_config of a DiT config remaps to DiTTransformer2DModel.
    legacy = Transformer2DModel(**{k: v for k, v in prior.transformer.config.items() if not k.startswith("_")})
    legacy.load_state_dict(prior.transformer.state_dict())
    for old in (folder / "transformer").iterdir():
        old.unlink()
    legacy.save_pretrained(folder / "transformer")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "transformer": ["diffusers", "Transformer2DModel"]}))
    return folder


def edit_config(folder: Path, component: str, **changes) -> None:
    path = folder / component / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
