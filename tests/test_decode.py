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
    images = decode_by_ipc(tiny_prior, centroids, LABELS, ipcs, keys, config, None).images
    for row, ipc in enumerate(ipcs):
        alone = decode_centroids(tiny_prior, centroids[row:row + 1], LABELS[row:row + 1], 2.0,
                                 0.9 if ipc == 1 else 0.6, 5, 0, keys=keys[row:row + 1])
        assert np.abs(alone.astype(int) - images[row:row + 1].astype(int)).max() <= 1
    uniform = decode_by_ipc(tiny_prior, centroids, LABELS, ipcs, keys, DecodeConfig(strength=0.6, num_steps=5),
                            None).images
    assert not np.array_equal(images[1], uniform[1]) and np.abs(images[0].astype(int) - uniform[0]).max() <= 1


def _class_rows(classes: int, ipcs: tuple[int, ...]):
    """The rows a decode actor builds from class files: class by class, each class's IPCs in order."""
    labels, ipc_of, index = [], [], []
    for label in range(classes):
        for ipc in ipcs:
            labels += [label] * ipc
            ipc_of += [ipc] * ipc
            index += list(range(ipc))
    labels, ipc_of, index = np.array(labels), np.array(ipc_of), np.array(index)
    return labels, ipc_of, ipc_of * 1_000_000 + labels * 1_000 + index


def test_centroids_of_several_classes_and_ipcs_fill_whole_batches(tiny_prior):
    """IPCs 1 and 3 at one strength, IPC 2 at another, batches of 4: the denoiser sees 4 rows every time but the
    last of each strength, and every image is the one the old path made decoding each class's IPC alone."""
    from engine.config import DecodeConfig
    from engine.decode import decode_by_ipc

    labels, ipcs, keys = _class_rows(3, (1, 2, 3))
    latents = np.random.default_rng(1).standard_normal((len(labels), 4, 8, 8)).astype(np.float32)
    config = DecodeConfig(strength=0.6, strength_by_ipc={2: 0.9}, num_steps=4, batch_size=4)
    decoded = decode_by_ipc(tiny_prior, latents, labels, ipcs, keys, config, None)
    sizes = [len(rows) for rows in decoded.batches]
    assert sizes == [4, 4, 4, 4, 2]  # 12 rows at 0.6 (IPCs 1 and 3), then 6 at 0.9 (IPC 2)
    assert sorted(np.concatenate(decoded.batches).tolist()) == list(range(len(labels)))  # each row once
    assert decoded.batch_size_of_rows()[ipcs == 2].tolist() == [4, 4, 4, 4, 2, 2]
    for label in range(3):
        for ipc in (1, 2, 3):
            rows = np.flatnonzero((labels == label) & (ipcs == ipc))  # the old path: one class's IPC at a time
            alone = decode_centroids(tiny_prior, latents[rows], labels[rows], 2.0, config.strength_at(ipc), 4, 0,
                                     keys=keys[rows])
            assert np.abs(alone.astype(int) - decoded.images[rows].astype(int)).max() <= 1


def test_classes_per_batch_fills_whole_batches_and_feeds_every_actor():
    from engine.config import DecodeConfig
    from engine.ray.decode import classes_per_batch

    d4m = DecodeConfig(batch_size=32)
    # IPC 1 + 10 + 50 = 61 centroids a class: 32 classes make 61 full batches of 32 (one class made 1, 10, 32, 18).
    assert classes_per_batch(d4m, (1, 10, 50), 1000, 4) == 32
    assert classes_per_batch(d4m, (1, 10, 50), 1000, 64) == 16  # every one of 64 actors gets classes
    assert classes_per_batch(DecodeConfig(batch_size=32), (8, 16), 1000, 4) == 4  # 24 a class: 4 x 24 = 3 x 32
    # Each strength fills its own batches: IPC 1 alone at 0.9 needs 32 classes, IPC 10 at 0.5 needs 16.
    assert classes_per_batch(DecodeConfig(batch_size=32, strength_by_ipc={1: 0.9}), (1, 10), 1000, 1) == 32
    assert classes_per_batch(DecodeConfig(batch_size=32, strength_by_ipc={2: 0.9}), (2, 10), 1000, 1) == 16


def test_a_batch_that_would_reach_two_to_the_31_elements_in_the_vae_decoder_is_split(tiny_prior):
    """The tiny VAE at 16 px peaks at 8 x 16^2 elements an image (its mid-block attention at 8^4): with the limit
    lowered to 5 images' worth, batches of 8 become batches of 4 and the images do not change."""
    import engine.encode
    from engine.config import DecodeConfig
    from engine.decode import decode_by_ipc, denoiser_batch_size
    from engine.encode import vae_peak_elements

    labels, ipcs, keys = _class_rows(3, (3,))
    latents = np.random.default_rng(2).standard_normal((len(labels), 4, 8, 8)).astype(np.float32)
    config = DecodeConfig(strength=0.6, num_steps=3, batch_size=8)
    whole = decode_by_ipc(tiny_prior, latents, labels, ipcs, keys, config, None)
    assert [len(rows) for rows in whole.batches] == [8, 1]
    peak = vae_peak_elements(tiny_prior.vae.config, 16, "decoder")
    original = engine.encode.ELEMENT_LIMIT
    try:
        engine.encode.ELEMENT_LIMIT = 5 * peak
        assert denoiser_batch_size(tiny_prior, config) == 4
        split = decode_by_ipc(tiny_prior, latents, labels, ipcs, keys, config, None)
    finally:
        engine.encode.ELEMENT_LIMIT = original
    assert [len(rows) for rows in split.batches] == [4, 4, 1]
    assert np.abs(split.images.astype(int) - whole.images.astype(int)).max() <= 1
