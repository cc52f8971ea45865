"""The interface every prior offers the engine, and the checks shared by the loaders.

A prior encodes uint8 images (B, H, W, 3) into latents (B, C, h, w) float32 (posterior mean x scaling factor, at
the prior's own resolution `image_size`) and decodes centroid latents + data labels back into uint8 images at the
evaluation resolution. Decode noise is per row (engine.decode.row_noise), so an image never depends on its batch.

`image_size` comes from the denoiser, not the VAE: the UNet/transformer's `sample_size` (its latent side) times the
VAE's downsampling factor. A VAE's own `sample_size` is only the crop it was fine-tuned on (sd-vae-ft-mse says 256,
and is the usual VAE for SD v1.5 at 512), so it is never read.

`check_prior_folder` checks a diffusers folder file by file, as `from_pretrained` will read it, so a folder that
passes it loads. Weights are safetensors only, in any of the layouts diffusers and transformers save:
    <stem>.safetensors                                   full precision
    <stem>.<variant>.safetensors                         a variant (save_pretrained(variant="fp16"))
    <stem>.safetensors.index[.<variant>].json + shards   sharded (save_pretrained(max_shard_size=...))
with <stem> = diffusion_pytorch_model (diffusers) or model (transformers). A folder holding only pickles (*.bin) is
refused with the command that converts it (jobs/convert_weights.py): the engine never unpickles weights.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
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

    # The noise space (engine/invert.py): the denoiser, a batch's class condition prepared once, and the guided
    # noise prediction in epsilon units at timestep t.
    @property
    def denoiser(self) -> torch.nn.Module: ...

    def condition(self, labels: np.ndarray, config: DecodeConfig) -> torch.Tensor: ...

    def guided_eps(self, x: torch.Tensor, t: int, condition: torch.Tensor, guidance_scale: float,
                   config: DecodeConfig) -> torch.Tensor: ...


# The weight file stem of each weighted component: diffusers models, then transformers' text encoder.
WEIGHT_STEMS = {"vae": "diffusion_pytorch_model", "unet": "diffusion_pytorch_model",
                "transformer": "diffusion_pytorch_model", "text_encoder": "model"}
# Files of the other components; each entry lists alternatives, any one of which will do (transformers 5 saves
# tokenizer.json; hub SD folders hold the slow tokenizer's vocab.json + merges.txt).
OTHER_FILES = {"tokenizer": (("tokenizer.json",), ("vocab.json", "merges.txt")),
               "scheduler": (("scheduler_config.json",),)}
# The classes each weighted component's config may name (the DiT hub folder predates DiTTransformer2DModel and names
# Transformer2DModel, whose weights load into it unchanged).
CLASS_NAMES = {"vae": ("AutoencoderKL",), "unet": ("UNet2DConditionModel",),
               "transformer": ("DiTTransformer2DModel", "Transformer2DModel"), "text_encoder": ("CLIPTextModel",)}
DENOISERS = ("unet", "transformer")
CONVERT_COMMAND = "python jobs/convert_weights.py"


@dataclass(frozen=True)
class Resolution:
    """The working resolution of a VAE + denoiser pair."""
    image_size: int  # pixels: the denoiser's latent side x the VAE's downsampling factor
    latent_shape: tuple[int, int, int]  # (C, h, w) the denoiser takes


@dataclass(frozen=True)
class ComponentWeights:
    """The safetensors files one component's from_pretrained will read."""
    component: str
    variant: str | None  # None: the files without a variant suffix
    files: tuple[str, ...]  # relative to the component folder: one file, or an index and every shard it lists


@dataclass(frozen=True)
class PriorFolder:
    """A diffusers folder that passed check_prior_folder."""
    path: Path
    weights: tuple[ComponentWeights, ...]
    resolution: Resolution

    def variant(self, component: str) -> str | None:
        """The `variant=` argument of this component's from_pretrained."""
        return next(w.variant for w in self.weights if w.component == component)

    def config(self, component: str) -> dict:
        return read_json(self.path / component / "config.json", self.path)


def check_prior_folder(folder: Path, components: tuple[str, ...], variant: str = "auto") -> PriorFolder:
    """Every file the loaders will read, by exact name, and the resolution of its VAE + denoiser.
    Raise FileNotFoundError naming a missing part, ValueError naming a malformed or mismatched one.
    `variant` (prior.variant): "auto" (the files without a variant suffix, else the only variant present), "none"
    (only those without a suffix) or a variant name such as "fp16" (a component without it: its unsuffixed files)."""
    folder = Path(folder)
    if folder.is_file():  # a single-file checkpoint (v1-5-pruned-emaonly.safetensors)
        raise FileNotFoundError(f"prior folder {folder} is a file, not a diffusers folder: save it as one with "
                                f"diffusers' from_single_file(...).save_pretrained(<folder>)")
    if not folder.is_dir():
        raise FileNotFoundError(f"prior folder {folder} does not exist: set prior.path to a diffusers folder")
    missing = [part for component in components for part in missing_parts(folder, component)]
    if missing:
        raise FileNotFoundError(f"prior folder {folder} is missing {', '.join(missing)}: copy the whole "
                                f"diffusers folder (one subfolder per component)")
    for config in sorted(folder.glob("*/*.json")):
        read_json(config, folder)
    weights = tuple(find_weights(folder, c, variant) for c in components if c in WEIGHT_STEMS)
    for component in (c for c in components if c in CLASS_NAMES):
        check_class_name(folder, component)
    denoiser = next(c for c in components if c in DENOISERS)
    vae, net = (read_json(folder / c / "config.json", folder) for c in ("vae", denoiser))
    return PriorFolder(folder, weights, denoiser_resolution(vae, net, denoiser, where=f"prior folder {folder}"))


def missing_parts(folder: Path, component: str) -> list[str]:
    """The files of `component` that are absent, as component/name (weights are checked by find_weights)."""
    if component in WEIGHT_STEMS:
        return [] if (folder / component / "config.json").is_file() else [f"{component}/config.json"]
    options = OTHER_FILES[component]
    if any(all((folder / component / name).is_file() for name in option) for option in options):
        return []
    first, *others = (" + ".join(option) for option in options)
    return [f"{component}/{first}" + "".join(f" (or {other})" for other in others)]


def read_json(path: Path, folder: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"prior folder {folder}: {path.relative_to(folder)} is not valid JSON ({error}): "
                         f"download it again") from None


def find_weights(folder: Path, component: str, variant: str = "auto") -> ComponentWeights:
    """The weight set of one component that `variant` selects, with every file it needs present."""
    directory, stem = folder / component, WEIGHT_STEMS[component]
    found = weight_variants(directory, stem)
    if not found:
        raise FileNotFoundError(no_weights_message(folder, component))
    chosen = choose_variant(folder, component, found, variant)
    return ComponentWeights(component, chosen, variant_files(folder, component, chosen))


def weight_variants(directory: Path, stem: str) -> set[str | None]:
    """The variants whose safetensors weights (single file or index) the folder holds; None = no suffix."""
    patterns = (rf"{stem}(?:\.(\w+))?\.safetensors", rf"{stem}\.safetensors\.index(?:\.(\w+))?\.json")
    matches = (re.fullmatch(p, path.name) for path in directory.iterdir() for p in patterns)
    return {match.group(1) for match in matches if match}


def choose_variant(folder: Path, component: str, found: set[str | None], variant: str) -> str | None:
    """`variant` where the component has it; a named variant a component lacks falls back to its unsuffixed files,
    as diffusers' pipelines do (hub SD folders hold non_ema weights for the UNet alone)."""
    if variant == "auto" and len(found) == 1:
        return next(iter(found))  # a download of one variant only
    wanted = None if variant in ("auto", "none") else variant
    if wanted in found:
        return wanted
    if wanted is not None and None in found:
        return None
    held = ", ".join(sorted("full precision (unsuffixed)" if v is None else v for v in found))
    ask = "several variants" if variant == "auto" else f"no {wanted or 'full-precision (unsuffixed)'} weights"
    raise FileNotFoundError(f"prior folder {folder}: {component}/ holds {ask} ({held}): set prior.variant to the "
                            f"one to load")


def variant_files(folder: Path, component: str, variant: str | None) -> tuple[str, ...]:
    """The single file and/or the index with every shard it lists (a listed shard that is absent is refused)."""
    directory, stem, suffix = folder / component, WEIGHT_STEMS[component], f".{variant}" if variant else ""
    single, index = f"{stem}{suffix}.safetensors", f"{stem}.safetensors.index{suffix}.json"
    files = [single] if (directory / single).is_file() else []
    if (directory / index).is_file():
        shards = sorted(set(read_json(directory / index, folder).get("weight_map", {}).values()))
        if not shards:
            raise ValueError(f"prior folder {folder}: {component}/{index} lists no shards: download it again")
        for shard in shards:
            if not (directory / shard).is_file():
                raise FileNotFoundError(f"prior folder {folder}: {component}/{index} lists {shard}, which is "
                                        f"missing: download every shard the index lists")
        files += [index, *shards]
    return tuple(files)


def no_weights_message(folder: Path, component: str) -> str:
    """Why a component has no safetensors weights, and the fix: convert its pickles, or download the weights."""
    directory, stem = folder / component, WEIGHT_STEMS[component]
    pickles = sorted(path.name for path in directory.iterdir() if path.suffix == ".bin")
    if pickles:
        return (f"prior folder {folder}: {component}/{pickles[0]} is a pickle, which the engine never loads: convert "
                f"the folder to safetensors once with `{CONVERT_COMMAND} {shlex.quote(str(folder))}`")
    return (f"prior folder {folder}: {component}/ holds no weights ({stem}.safetensors, a variant such as "
            f"{stem}.fp16.safetensors, or {stem}.safetensors.index.json with its shards): download them")


def check_class_name(folder: Path, component: str) -> None:
    """A component folder of another model (an SDXL UNet, a PixArt transformer) is refused by its config's class."""
    config = read_json(folder / component / "config.json", folder)
    name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if name is not None and name not in CLASS_NAMES[component]:
        raise ValueError(f"prior folder {folder}: {component}/config.json is a {name}, not a "
                         f"{' or '.join(CLASS_NAMES[component])}: point prior.path at a folder of this prior kind")


def vae_scale_factor(vae_config: Mapping) -> int:
    """Pixels per latent side: the VAE halves the resolution between consecutive encoder blocks."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def denoiser_resolution(vae_config: Mapping, denoiser_config: Mapping, denoiser: str = "unet",
                        where: str = "prior") -> Resolution:
    """The image size the denoiser was trained at, and the latent shape it takes; ValueError naming both configs
    when the VAE does not make latents the denoiser takes."""
    side, channels = denoiser_config["sample_size"], vae_config["latent_channels"]
    if isinstance(side, (list, tuple)):
        if len(set(side)) != 1:
            raise ValueError(f"{where}: {denoiser}/config.json has a non-square sample_size {list(side)}: only "
                             f"square priors are supported")
        side = side[0]
    if denoiser_config["in_channels"] != channels:
        raise ValueError(f"{where}: vae/config.json makes {channels}-channel latents but {denoiser}/config.json "
                         f"takes in_channels {denoiser_config['in_channels']}: use the VAE this {denoiser} was "
                         f"trained with")
    return Resolution(int(side) * vae_scale_factor(vae_config), (int(channels), int(side), int(side)))


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
