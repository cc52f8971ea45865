import numpy as np
import pytest

from engine.priors.tiny import decode_centroids


@pytest.fixture
def centroids():
    return np.random.default_rng(0).standard_normal((4, 4, 8, 8)).astype(np.float32)


LABELS = np.array([0, 1, 2, 0])


def decode(prior, latents, **kwargs):
    args = {"guidance_scale": 2.0, "strength": 0.6, "num_steps": 5, "seed": 0} | kwargs
    return decode_centroids(prior, latents, LABELS[: len(latents)], **args)


def test_output_is_uint8_images(tiny_prior, centroids):
    images = decode(tiny_prior, centroids)
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8


def test_seeded_and_batch_independent(tiny_prior, centroids):
    a = decode(tiny_prior, centroids)
    np.testing.assert_array_equal(a, decode(tiny_prior, centroids))
    # Row 1 alone, with its key, equals row 1 of the batch: noise is per row, not per batch.
    alone = decode_centroids(tiny_prior, centroids[1:2], LABELS[1:2], 2.0, 0.6, 5, 0, keys=np.array([1]))
    assert np.abs(alone.astype(int) - a[1:2].astype(int)).max() <= 1
    assert not np.array_equal(a, decode(tiny_prior, centroids, seed=1))


@pytest.mark.parametrize("change", [{"guidance_scale": 6.0}, {"strength": 0.2}, {"strength": 1.0}])
def test_guidance_and_strength_change_the_output(tiny_prior, centroids, change):
    assert not np.array_equal(decode(tiny_prior, centroids), decode(tiny_prior, centroids, **change))


def test_bad_input_is_rejected(tiny_prior, centroids):
    with pytest.raises(ValueError, match="strength"):
        decode(tiny_prior, centroids, strength=0.0)
    with pytest.raises(ValueError, match="labels must lie"):
        decode_centroids(tiny_prior, centroids, np.array([0, 1, 2, 3]), 2.0, 0.5, 5, 0)  # 3 classes: 0..2
    centroids[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        decode(tiny_prior, centroids)


def test_each_ipc_decodes_at_its_own_strength_in_the_rows_order(tiny_prior, centroids):
    """decode.strength_by_ipc: the IPC-1 rows at 0.9, the others at `strength` (0.6), batches of 3 crossing IPCs;
    each row equals its decode alone at its IPC's strength (per-row noise keys), in the input order."""
    from engine.config import DecodeConfig
    from engine.decode import decode_by_ipc

    config = DecodeConfig(strength=0.6, strength_by_ipc={1: 0.9}, num_steps=5, batch_size=3)
    ipcs, keys = np.array([10, 1, 10, 1]), np.arange(4)
    images = decode_by_ipc(tiny_prior, centroids, LABELS, ipcs, keys, config, None)
    for row, ipc in enumerate(ipcs):
        alone = decode_centroids(tiny_prior, centroids[row:row + 1], LABELS[row:row + 1], 2.0,
                                 0.9 if ipc == 1 else 0.6, 5, 0, keys=keys[row:row + 1])
        assert np.abs(alone.astype(int) - images[row:row + 1].astype(int)).max() <= 1
    uniform = decode_by_ipc(tiny_prior, centroids, LABELS, ipcs, keys, DecodeConfig(strength=0.6, num_steps=5), None)
    assert not np.array_equal(images[1], uniform[1]) and np.abs(images[0].astype(int) - uniform[0]).max() <= 1
