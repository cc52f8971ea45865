"""FLOPs per image of the noise space's invert stage beside the encode and decode stages, on the real
architectures (SD v1.5 at 512 px, DiT-XL/2 with sd-vae-ft-mse at 256 px), counted by torch's FlopCounterMode on
meta tensors (no weights allocated, nothing computed: the count is exact for the operators it knows, convolutions
and matrix products, which dominate these networks).

    python benchmarks/invert_flops.py [--steps 50] [--strength 0.7]

Prints per prior: encode (one VAE encoder pass), one denoiser pass, the inversion (round(steps × strength) passes
at inversion guidance 1), a decode (the same number of passes at guidance > 1, two batch rows each, plus the VAE
decoder), and the ratio inversion / encode.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402


def count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def networks(kind: str):
    """(vae, denoiser, image side, latent shape, denoiser call) of a prior's real architecture, on meta tensors."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel, UNet2DConditionModel

    from engine.priors.dit import DIT_XL2_256, SD_VAE_FT_MSE
    from engine.priors.sd15 import SD15_UNET, SD15_VAE

    with torch.device("meta"):
        if kind == "sd15":
            vae, unet = AutoencoderKL(**SD15_VAE), UNet2DConditionModel(**SD15_UNET)
            context = torch.zeros(1, 77, SD15_UNET["cross_attention_dim"])
            return vae, 512, (4, 64, 64), lambda x: unet(x, 500, encoder_hidden_states=context)
        vae, transformer = AutoencoderKL(**SD_VAE_FT_MSE), DiTTransformer2DModel(**DIT_XL2_256)
        return vae, 256, (4, 32, 32), lambda x: transformer(x, timestep=torch.tensor([500]),
                                                             class_labels=torch.tensor([1]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--strength", type=float, default=0.7)
    args = parser.parse_args(argv)
    passes = max(1, round(args.steps * args.strength))
    print(f"{'prior':<6} {'encode':>9} {'denoiser':>9} {'invert':>9} {'decode':>9} {'invert/encode':>14}  (GFLOPs "
          f"per image; {passes} denoiser passes = {args.steps} steps x strength {args.strength})")
    for kind in ("sd15", "dit"):
        vae, side, latent, denoise = networks(kind)
        with torch.no_grad(), torch.device("meta"):
            encode = count(lambda: vae.encode(torch.zeros(1, 3, side, side)))
            step = count(lambda: denoise(torch.zeros(1, *latent)))
            vae_decode = count(lambda: vae.decode(torch.zeros(1, *latent)))
        invert, decode = passes * step, 2 * passes * step + vae_decode
        print(f"{kind:<6} {encode / 1e9:>9.0f} {step / 1e9:>9.0f} {invert / 1e9:>9.0f} {decode / 1e9:>9.0f} "
              f"{invert / encode:>14.1f}")


if __name__ == "__main__":
    main()
