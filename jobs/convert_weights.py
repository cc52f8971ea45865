"""Convert the pickled weights of a diffusers folder (*.bin, as older hub snapshots hold) to safetensors, in place.

    python jobs/convert_weights.py /models/stable-diffusion-v1-5

The engine loads safetensors only and never unpickles weights. This one-off conversion reads each pickle with
torch.load(weights_only=True), which rebuilds tensors and plain containers but refuses to run code from the file,
and writes the safetensors file diffusers/transformers would have written beside it:
    diffusion_pytorch_model[.<variant>].bin            -> diffusion_pytorch_model[.<variant>].safetensors
    pytorch_model[.<variant>].bin (transformers)       -> model[.<variant>].safetensors
    <stem>[-0000k-of-0000n].bin + <stem>.bin.index[.<variant>].json -> the same names in .safetensors
A file whose safetensors twin exists is left alone, so a rerun (or a folder that already has both) does nothing.
The pickles are kept: delete them yourself once the folder loads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

# transformers names its pickles pytorch_model*.bin and its safetensors model*.safetensors; diffusers keeps its stem.
STEMS = {"pytorch_model": "model", "diffusion_pytorch_model": "diffusion_pytorch_model"}
WEIGHTS = re.compile(r"(?P<stem>pytorch_model|diffusion_pytorch_model)(?P<rest>[.\-][\w.\-]*)?\.bin")
INDEX = re.compile(r"(?P<stem>pytorch_model|diffusion_pytorch_model)\.bin\.index(?P<variant>\.\w+)?\.json")


def safetensors_name(name: str) -> str | None:
    """The safetensors name of a pickle or pickle index, None for any other file."""
    if match := INDEX.fullmatch(name):
        return f"{STEMS[match['stem']]}.safetensors.index{match['variant'] or ''}.json"
    if match := WEIGHTS.fullmatch(name):
        return f"{STEMS[match['stem']]}{match['rest'] or ''}.safetensors"
    return None


def convert_pickle(source: Path, target: Path) -> None:
    state = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source} is not a state dict of tensors: convert it with the tool that made it")
    # safetensors refuses tensors that share memory (tied weights): each gets its own copy.
    seen: set[int] = set()
    tensors = {}
    for key, tensor in state.items():
        shared = tensor.untyped_storage().data_ptr() in seen
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor.clone().contiguous() if shared else tensor.contiguous()
    partial = target.with_name(target.name + ".partial")
    save_file(tensors, str(partial), metadata={"format": "pt"})  # transformers checks the "pt" format tag
    os.replace(partial, target)  # a killed conversion never leaves a half-written file the engine would read


def convert_index(source: Path, target: Path) -> None:
    index = json.loads(source.read_text())
    index["weight_map"] = {key: safetensors_name(shard) for key, shard in index["weight_map"].items()}
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps(index, indent=2))
    os.replace(partial, target)


def convert_folder(folder: Path, log=print) -> int:
    """Convert every pickle under `folder` (its component subfolders, or a single component folder)."""
    converted = 0
    for source in sorted(Path(folder).rglob("*")):
        target_name = safetensors_name(source.name)
        if target_name is None or not source.is_file():
            continue
        target = source.with_name(target_name)
        if target.exists():
            continue
        (convert_index if target_name.endswith(".json") else convert_pickle)(source, target)
        log(f"{source.relative_to(folder)} -> {target.name}")
        converted += 1
    return converted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a diffusers folder (vae/, unet/, text_encoder/, ...)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    converted = convert_folder(args.folder)
    print(f"converted {converted} file(s) in {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
