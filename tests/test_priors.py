import json

import numpy as np
import pytest
import torch

from engine.config import DataConfig
from engine.encode import encode_images
from engine.priors import load_or_train_prior, prior_cache_folder
from engine.priors.tiny import load_tiny_prior
from engine.priors.train_tiny import train_tiny_prior
from tests.conftest import CLASS_NAMES, TINY_PRIOR


def test_latent_shape_and_null_class(tiny_prior):
    assert tiny_prior.latent_shape == (4, 8, 8)
    assert tiny_prior.null_class == len(CLASS_NAMES)
    assert tiny_prior.unet.config.num_class_embeds == len(CLASS_NAMES) + 1


def test_save_load_round_trip_gives_identical_outputs(saved_prior, tiny_prior, images_u8):
    loaded = load_tiny_prior(saved_prior)
    assert loaded.class_names == CLASS_NAMES
    np.testing.assert_array_equal(encode_images(loaded.vae, images_u8), encode_images(tiny_prior.vae, images_u8))
    assert (saved_prior / "vae" / "diffusion_pytorch_model.safetensors").exists()  # no pickle on disk


def test_missing_parts_are_named(saved_prior):
    import shutil

    shutil.rmtree(saved_prior / "unet")
    with pytest.raises(FileNotFoundError, match="unet"):
        load_tiny_prior(saved_prior)


def test_wrong_kind_is_rejected(saved_prior):
    (saved_prior / "prior.json").write_text(json.dumps({"kind": "sd15", "image_size": 16, "class_names": []}))
    with pytest.raises(ValueError, match="not 'tiny'"):
        load_tiny_prior(saved_prior)


def test_training_sets_unit_scale_latents_and_is_seeded():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(16) % 3
    quiet = lambda *_: None  # noqa: E731
    a = train_tiny_prior(TINY_PRIOR, images, labels, CLASS_NAMES, log=quiet)
    b = train_tiny_prior(TINY_PRIOR, images, labels, CLASS_NAMES, log=quiet)
    latents = encode_images(a.vae, images)
    assert latents.std() == pytest.approx(1.0, rel=1e-3)  # scaling factor = 1 / std of training latents
    for p, q in zip(a.unet.parameters(), b.unet.parameters()):
        assert torch.equal(p, q)


def test_prior_is_trained_once_then_loaded_from_cache(tmp_path, monkeypatch):
    import dataclasses

    config = dataclasses.replace(TINY_PRIOR, vae_steps=1, unet_steps=1)
    data = DataConfig()
    calls = []
    prior = load_or_train_prior(config, data, tmp_path, log=calls.append)
    folder = prior_cache_folder(config, data, tmp_path)
    assert folder.exists() and not folder.with_name(folder.name + ".partial").exists()
    assert prior.class_names == tuple(str(i) for i in range(10))
    calls.clear()
    load_or_train_prior(config, data, tmp_path, log=calls.append)
    assert calls == []  # cached: nothing trained the second time
