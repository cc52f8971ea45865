"""sd15 and dit priors built from (scaled-down) real configs with random weights, saved in the diffusers layout,
loaded back through the engine's loader, and run encode -> quantize -> decode. Full size lives under `slow`."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from engine.config import ConfigError, DecodeConfig, PriorConfig, load_config
from engine.decode import decode_latents
from engine.priors import load_prior
from engine.priors.dit import build_dit_prior
from engine.priors.sd15 import build_sd15_prior
from engine.quantize import quantize_class
from tests.priors_small import DIT_SMALL, SD15_SMALL

NAMES = ("tench", "goldfish", "great white shark")
DECODE = DecodeConfig(guidance_scale=3.0, strength=0.6, num_steps=5, seed=0, negative_prompt="cartoon, anime")


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd15")
    torch.manual_seed(0)
    build_sd15_prior(NAMES, root / "tok", **SD15_SMALL).save(root / "prior")
    return root / "prior"


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    torch.manual_seed(0)
    build_dit_prior(NAMES, **DIT_SMALL).save(root / "prior")
    return root / "prior"


@pytest.fixture(scope="module")
def sd15(sd15_folder):
    return load_prior("sd15", sd15_folder, NAMES)


@pytest.fixture(scope="module")
def dit(dit_folder):
    return load_prior("dit", dit_folder, NAMES)


@pytest.fixture(scope="module")
def centroids(sd15):
    """encode -> quantize per class: 2 centroids for each of 2 classes, from 12 images of 20x20 (resized to 32)."""
    images = np.random.default_rng(0).integers(0, 256, (12, 20, 20, 3), dtype=np.uint8)
    latents = sd15.encode(images, batch_size=5)
    assert latents.shape == (12, *sd15.latent_shape) == (12, 4, 16, 16) and np.isfinite(latents).all()
    rows, labels = [], []
    for label, part in ((0, latents[:6]), (2, latents[6:])):
        rows.append(quantize_class(part, 2).centroids.reshape(-1, *sd15.latent_shape))
        labels += [label, label]
    return np.concatenate(rows), np.array(labels)


def decode(prior, centroids, **change):
    latents, labels = centroids
    return decode_latents(prior, latents, labels, dataclasses.replace(DECODE, **change), size=20)


def differs(a, b):
    return np.abs(a.astype(int) - b.astype(int)).max() > 0


def test_sd15_encode_quantize_decode_is_seeded(sd15, centroids):
    images = decode(sd15, centroids)
    assert images.shape == (4, 20, 20, 3) and images.dtype == np.uint8  # resized to the evaluation resolution
    np.testing.assert_array_equal(images, decode(sd15, centroids))
    assert differs(images, decode(sd15, centroids, seed=1))


@pytest.mark.parametrize("change", [{"guidance_scale": 8.0}, {"strength": 0.2}, {"negative_prompt": "painting"}])
def test_sd15_guidance_strength_and_negative_prompt_change_the_output(sd15, centroids, change):
    assert differs(decode(sd15, centroids), decode(sd15, centroids, **change))


def test_sd15_prompt_is_the_class_name(sd15, centroids):
    latents, labels = centroids
    relabelled = decode_latents(sd15, latents, np.array([1, 1, 1, 1]), DECODE, size=20)
    assert differs(decode(sd15, centroids), relabelled)


def test_sd15_image_does_not_depend_on_its_batch(sd15, centroids):
    latents, labels = centroids
    whole = decode_latents(sd15, latents, labels, DECODE, keys=np.arange(4))
    alone = decode_latents(sd15, latents[2:3], labels[2:3], DECODE, keys=np.array([2]))
    assert np.abs(whole[2:3].astype(int) - alone.astype(int)).max() <= 1
    assert whole.shape[1:] == (32, 32, 3)  # no size: the prior's own resolution


def test_dit_encode_quantize_decode(dit, centroids):
    images = decode(dit, centroids)
    assert images.shape == (4, 20, 20, 3)
    np.testing.assert_array_equal(images, decode(dit, centroids))
    for change in ({"guidance_scale": 1.0}, {"strength": 0.3}, {"seed": 1}):
        assert differs(images, decode(dit, centroids, **change)), change


def test_dit_strength_one_is_plain_dit_from_noise(dit, centroids):
    latents, labels = centroids
    shifted = (latents + 3.0, labels)
    full = {"strength": 1.0}
    np.testing.assert_array_equal(decode(dit, centroids, **full), decode(dit, shifted, **full))
    assert differs(decode(dit, centroids), decode(dit, shifted))  # below 1.0 the centroid is the start


def test_dit_class_ids_map_labels_onto_the_model_classes(dit, centroids):
    mapped = decode(dit, centroids, class_ids=(7, 500, 999))
    assert differs(decode(dit, centroids), mapped)
    with pytest.raises(ValueError, match="class_ids"):
        decode(dit, centroids, class_ids=(1, 2))
    with pytest.raises(ValueError, match="class ids must lie"):
        decode(dit, centroids, class_ids=(0, 1, 1000))


@pytest.mark.parametrize("kind, part", [("sd15", "tokenizer"), ("sd15", "unet"), ("dit", "transformer")])
def test_missing_parts_are_named(tmp_path, sd15_folder, dit_folder, kind, part):
    folder = tmp_path / kind
    shutil.copytree(sd15_folder if kind == "sd15" else dit_folder, folder)
    shutil.rmtree(folder / part)
    with pytest.raises(FileNotFoundError, match=f"{part}/"):
        load_prior(kind, folder, NAMES)


def test_missing_weights_and_malformed_config_are_named(tmp_path, dit_folder):
    folder = tmp_path / "dit"
    shutil.copytree(dit_folder, folder)
    (folder / "vae" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="vae/config.json is not valid JSON"):
        load_prior("dit", folder, NAMES)
    for weights in (folder / "vae").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"vae/\*.safetensors"):
        load_prior("dit", folder, NAMES)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prior("sd15", tmp_path / "nowhere", NAMES)


def test_sd15_and_dit_need_a_folder():
    with pytest.raises(ConfigError, match="prior.path"):
        load_config(None, ["prior.kind=sd15"])
    with pytest.raises(ConfigError, match="prior.path"):
        PriorConfig(kind="dit")
    assert load_config(None, ["prior.kind=dit", "prior.path=/models/dit"]).prior.kind == "dit"


def test_saved_folders_hold_no_pickles(sd15_folder, dit_folder):
    for folder in (sd15_folder, dit_folder):
        assert not [p for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
        assert json.loads((folder / "model_index.json").read_text())["_class_name"].endswith("Pipeline")


@pytest.mark.ray
def test_sd15_through_the_ray_encode_and_decode_stages(ray_session, tmp_path, sd15_folder, sd15):
    """Parquet shards at 20x20 are read at the prior's 32x32, encoded by the sd15 VAE on Ray Data, and centroids are
    decoded back to PNGs at the data's 20x20: the path `jobs/distill.py` takes with prior.kind=sd15."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from engine.ray.encode import encode_to_parquet
    from engine.ray.decode import decode_centroids_to_sets
    from engine import store

    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buffer, format="PNG")
        rows.append({"bytes": buffer.getvalue(), "path": f"train/{i:06d}.png"})
    table = pa.table({"image": pa.array(rows), "label": pa.array([i % 2 for i in range(8)], pa.int64())})
    pq.write_table(table, tmp_path / "train-00000-of-00001.parquet")
    (tmp_path / "classes.txt").write_text("tench\ngoldfish\n")
    config = load_config(None, [f"runs_dir={tmp_path}", "data.source=parquet", f"data.path={tmp_path}",
                                "data.name=toy", "data.image_size=20", "prior.kind=sd15", f"prior.path={sd15_folder}",
                                "decode.num_steps=3", "decode.negative_prompt=cartoon",
                                "data.val_fraction=0"])  # all 8 rows are train rows
    names = ("tench", "goldfish")
    assert encode_to_parquet(config, sd15_folder, tmp_path / "latents", sd15.image_size, names)[0] == 8
    ids, latents = store.read_class_latents(store.class_latent_dirs(tmp_path / "latents")[1])
    assert latents.shape == (4, 4 * 16 * 16)
    from tests.centroid_files import write_centroid_files

    files = write_centroid_files(tmp_path / "quantized", {1: {2: latents[:2]}})
    decoded = decode_centroids_to_sets(config, sd15_folder, files, {2: [str(tmp_path / "set")]}, names)
    assert decoded.num_rows == 2
    pngs = sorted((tmp_path / "set").glob("*/*.png"))
    assert len(pngs) == 2 and all(Image.open(p).size == (20, 20) for p in pngs)


# Parameter counts of the published models, in millions (SD v1.5: UNet 859.5, VAE 83.7, CLIP text 123.1;
# DiT-XL/2: 675, which diffusers' DiTTransformer2DModel holds as 749.8 because each of its 28 blocks keeps its
# own copy of the timestep + class embedding, 2.78 M each): the configs in the code are the real architectures.
FULL_SIZE = {"sd15": ({"unet": 860, "vae": 84, "text_encoder": 123}, (4, 64, 64), 512),
             "dit": ({"transformer": 750, "vae": 84}, (4, 32, 32), 256)}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd15", "dit"])
def test_full_size_prior_saves_loads_encodes_quantizes_decodes(tmp_path, kind):
    millions, latent_shape, resolution = FULL_SIZE[kind]
    torch.manual_seed(0)
    built = build_sd15_prior(NAMES, tmp_path / "tok") if kind == "sd15" else build_dit_prior(NAMES)
    for name, count in millions.items():
        assert round(sum(p.numel() for p in getattr(built, name).parameters()) / 1e6) == count, name
    built.save(tmp_path / "prior")
    del built
    prior = load_prior(kind, tmp_path / "prior", NAMES)
    assert prior.latent_shape == latent_shape and prior.image_size == resolution
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    latents = prior.encode(images, batch_size=3)
    centroids = quantize_class(latents, 2).centroids.reshape(-1, *latent_shape)
    config = DecodeConfig(guidance_scale=4.0, strength=0.5, num_steps=2, negative_prompt="cartoon")
    out = decode_latents(prior, centroids, np.array([0, 2]), config, size=32)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
