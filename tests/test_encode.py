import numpy as np

from engine.encode import encode_images, images_to_tensor, tensor_to_images


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
