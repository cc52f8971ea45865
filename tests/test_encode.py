from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from engine.encode import (ELEMENT_LIMIT, encode_images, images_to_tensor, largest_vae_batch, tensor_to_images,
                           vae_peak_elements)


def test_pixel_round_trip_is_exact(images_u8):
    np.testing.assert_array_equal(tensor_to_images(images_to_tensor(images_u8)), images_u8)


def test_latents_shape_dtype_and_scaling(tiny_prior, images_u8):
    latents = encode_images(tiny_prior.vae, images_u8, batch_size=4)
    assert latents.shape == (6, 4, 8, 8) and latents.dtype == np.float32
    old = tiny_prior.vae.config.scaling_factor
    tiny_prior.vae.register_to_config(scaling_factor=2.0)
    np.testing.assert_allclose(encode_images(tiny_prior.vae, images_u8), latents * 2.0 / old, rtol=1e-5, atol=1e-6)


def test_encoding_is_deterministic_and_batch_independent(tiny_prior, images_u8):
    whole = encode_images(tiny_prior.vae, images_u8, batch_size=6)
    pieces = encode_images(tiny_prior.vae, images_u8, batch_size=2)
    np.testing.assert_allclose(whole, pieces, atol=1e-5)


@pytest.mark.parametrize("channels", [(8, 16), (8, 16, 32), (16, 8, 32)])
@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_peak_elements_are_the_largest_tensor_the_vae_makes(channels, part):
    """Every input and output of every module of a real VAE (mid-block attention off: its scores are not a
    module's output) for one 32 px image: the largest is what vae_peak_elements computes from the config."""
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * len(channels),
                        up_block_types=("UpDecoderBlock2D",) * len(channels), norm_num_groups=4,
                        latent_channels=4, mid_block_add_attention=False)
    largest = [0]

    def record(_module, inputs, output):
        for tensor in (*inputs, output):
            if torch.is_tensor(tensor):
                largest[0] = max(largest[0], tensor[:1].numel())  # one image's share

    hooks = [module.register_forward_hook(record) for module in vae.modules()]
    latent_side = 32 // 2 ** (len(channels) - 1)
    with torch.no_grad():
        if part == "encoder":
            vae.encoder(torch.randn(2, 3, 32, 32))
        else:
            vae.decoder(torch.randn(2, 4, latent_side, latent_side))
    for hook in hooks:
        hook.remove()
    assert vae_peak_elements(vae.config, 32, part) == largest[0]


def test_sd15_at_512_px_reaches_two_to_the_31_at_encode_64_and_decode_32():
    from engine.priors.sd15 import SD15_VAE

    config = SimpleNamespace(**SD15_VAE)
    assert vae_peak_elements(config, 512, "encoder") == 128 * 513**2  # the padded input of the first downsample
    assert vae_peak_elements(config, 512, "decoder") == 256 * 512**2 == 2**26  # the last upsample's output
    assert largest_vae_batch(config, 512, "encoder") == 63 and 64 * 128 * 513**2 >= ELEMENT_LIMIT
    assert largest_vae_batch(config, 512, "decoder") == 31 and 32 * 2**26 == ELEMENT_LIMIT
    assert largest_vae_batch(config, 256, "decoder") == 127  # DiT's sd-vae-ft-mse at 256 px: no split at 64


def test_an_encode_batch_at_the_limit_is_split_and_gives_the_same_latents(tiny_prior, images_u8, monkeypatch):
    import engine.encode

    whole = encode_images(tiny_prior.vae, images_u8, batch_size=6)
    seen = []
    hook = tiny_prior.vae.encoder.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    monkeypatch.setattr(engine.encode, "ELEMENT_LIMIT", 4 * vae_peak_elements(tiny_prior.vae.config, 16, "encoder"))
    split = encode_images(tiny_prior.vae, images_u8, batch_size=6)
    hook.remove()
    assert seen == [3, 3]  # 4 images' worth would reach the limit: at most 3 a batch
    np.testing.assert_allclose(split, whole, atol=1e-5)


def test_colour_is_any_difference_between_channels():
    """What decides a grey source (decode.color_mode=auto): an image is in colour when any pixel's channels differ."""
    from engine.data.images import has_colour

    grey = np.repeat(np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1), 3, axis=3)
    one_pixel = grey.copy()
    one_pixel[0, 2, 3, 1] += 1
    assert has_colour(np.concatenate([grey, one_pixel])).tolist() == [False, True]
