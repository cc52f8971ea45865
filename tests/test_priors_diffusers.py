"""sd15 and dit priors built from (scaled-down) real configs with random weights, saved in the diffusers layout,
loaded back through the engine's loader, and run encode -> quantize -> decode. Every weight layout users download
(full precision, fp16 variant, sharded, the DiT hub folder, pickles) either loads or is refused in one sentence, and
the working resolution comes from the denoiser. Full size lives under `slow`."""

import copy
import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import ConfigError, DecodeConfig, PriorConfig, load_config
from engine.decode import decode_latents
from engine.priors import load_prior
from engine.priors.base import Resolution, check_prior_folder, denoiser_resolution
from engine.priors.dit import DIT_XL2_256, SD_VAE_FT_MSE, build_dit_prior, load_dit_prior
from engine.priors.sd15 import SD15_UNET, SD15_VAE, build_sd15_prior, load_sd15_prior, write_byte_tokenizer
from engine.quantize.quantizer import quantize_class
from jobs.convert_weights import convert_folder
from tests.priors_small import (DIT_SMALL, LAYOUTS, SD15_SMALL, edit_config, save_dit_hub_layout, save_in_layout,
                                weighted_modules)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks on shared cores: one torch thread is far faster than two contending."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

NAMES = ("tench", "goldfish", "great white shark")
DECODE = DecodeConfig(guidance_scale=3.0, strength=0.6, num_steps=5, seed=0, negative_prompt="cartoon, anime")


@pytest.fixture(scope="module")
def sd15_built(tmp_path_factory):
    torch.manual_seed(0)
    return build_sd15_prior(NAMES, tmp_path_factory.mktemp("tok"), **SD15_SMALL)


@pytest.fixture(scope="module")
def dit_built():
    torch.manual_seed(0)
    return build_dit_prior(NAMES, **DIT_SMALL)


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory, sd15_built):
    root = tmp_path_factory.mktemp("sd15")
    sd15_built.save(root / "prior")
    return root / "prior"


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory, dit_built):
    root = tmp_path_factory.mktemp("dit")
    dit_built.save(root / "prior")
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
    (folder / "vae" / "config.json").write_text((dit_folder / "vae" / "config.json").read_text())
    for weights in (folder / "vae").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"vae/ holds no weights \(diffusion_pytorch_model.safetensors"):
        load_prior("dit", folder, NAMES)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prior("sd15", tmp_path / "nowhere", NAMES)


def test_a_broken_prior_folder_stops_the_job_in_one_sentence(tmp_path, dit_folder, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    import distill

    folder = tmp_path / "dit"
    shutil.copytree(dit_folder, folder)
    shutil.rmtree(folder / "transformer")
    with pytest.raises(SystemExit) as exit_info:
        distill.main([f"runs_dir={tmp_path / 'runs'}", "prior.kind=dit", f"prior.path={folder}",
                      f"cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.startswith(f"distill: error: prior folder {folder} is missing transformer/")


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


# ---------------------------------------------------------------- weight layouts


def assert_weights_equal(loaded, built, dtype=torch.float32):
    """Every loaded parameter is float32 and equals the built one (rounded through `dtype` where the file held it)."""
    for name, module in weighted_modules(built).items():
        theirs = getattr(loaded, name).state_dict()
        for key, value in module.state_dict().items():
            assert theirs[key].dtype == torch.float32, (name, key)
            torch.testing.assert_close(theirs[key], value.to(dtype).float(), rtol=0, atol=0, msg=f"{name}.{key}")


def one_decode_step(prior):
    latents = np.random.default_rng(0).standard_normal((2, *prior.latent_shape)).astype(np.float32)
    config = dataclasses.replace(DECODE, num_steps=1, strength=1.0)
    images = decode_latents(prior, latents, np.array([0, 2]), config)
    assert images.shape == (2, prior.image_size, prior.image_size, 3) and images.dtype == np.uint8
    return images


# The exact files check_prior_folder finds in each layout (the vae's; every weighted component alike).
VAE_FILES = {"full": ("diffusion_pytorch_model.safetensors",), "fp16": ("diffusion_pytorch_model.fp16.safetensors",)}


@pytest.mark.parametrize("layout", [layout for layout in LAYOUTS if layout != "bin"])
@pytest.mark.parametrize("kind", ["sd15", "dit"])
def test_every_safetensors_layout_loads_and_decodes(tmp_path, sd15_built, dit_built, kind, layout):
    built = sd15_built if kind == "sd15" else dit_built
    folder = save_in_layout(built, tmp_path / layout, layout)
    components = ("vae", "unet", "text_encoder", "tokenizer", "scheduler") if kind == "sd15" else (
        "vae", "transformer", "scheduler")
    checked = check_prior_folder(folder, components)
    vae = next(w for w in checked.weights if w.component == "vae")
    assert vae.variant == ("fp16" if layout == "fp16" else None)
    if layout == "sharded":
        assert vae.files[0] == "diffusion_pytorch_model.safetensors.index.json" and len(vae.files) > 2
    else:
        assert vae.files == VAE_FILES[layout]
    prior = load_prior(kind, folder, NAMES)
    assert_weights_equal(prior, built, torch.float16 if layout == "fp16" else torch.float32)
    one_decode_step(prior)


def test_the_dit_hub_layout_loads(tmp_path, dit_built):
    folder = save_dit_hub_layout(dit_built, tmp_path / "hub")
    assert json.loads((folder / "transformer" / "config.json").read_text())["_class_name"] == "Transformer2DModel"
    prior = load_prior("dit", folder, NAMES)
    assert_weights_equal(prior, dit_built)
    np.testing.assert_array_equal(one_decode_step(prior), one_decode_step(dit_built))


def test_a_transformer2d_that_is_not_a_dit_is_refused(tmp_path, dit_built):
    folder = save_dit_hub_layout(dit_built, tmp_path / "pixart")
    edit_config(folder, "transformer", norm_type="ada_norm_single", num_embeds_ada_norm=None)
    with pytest.raises(ValueError, match=r"transformer/config.json is not a class-conditional DiT"):
        load_prior("dit", folder, NAMES)


def test_prior_variant_chooses_between_full_and_fp16_files(tmp_path, sd15_built):
    folder = save_in_layout(sd15_built, tmp_path / "both", "full")
    for name, module in weighted_modules(sd15_built).items():  # beside the full files, as hub SD folders hold
        copy.deepcopy(module).half().save_pretrained(folder / name, variant="fp16")
    assert_weights_equal(load_sd15_prior(folder, NAMES), sd15_built)  # auto: the full-precision files
    assert_weights_equal(load_sd15_prior(folder, NAMES, variant="none"), sd15_built)
    assert_weights_equal(load_sd15_prior(folder, NAMES, variant="fp16"), sd15_built, torch.float16)
    # A variant some components lack: those load their full-precision files (hub folders: non_ema for the UNet).
    for path in (folder / "text_encoder").glob("*.fp16.*"):
        path.unlink()
    mixed = load_sd15_prior(folder, NAMES, variant="fp16")
    torch.testing.assert_close(mixed.text_encoder.state_dict(), sd15_built.text_encoder.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(mixed.vae.state_dict(), {k: v.half().float() for k, v in
                                                        sd15_built.vae.state_dict().items()}, rtol=0, atol=0)
    # The config key reaches the loader the job and the Ray actors share (engine.priors.load_or_train_prior).
    from engine.config import DataConfig, PriorConfig
    from engine.priors import load_or_train_prior

    data = DataConfig(source="parquet", path=str(tmp_path), classes_file="")
    (tmp_path / "classes.txt").write_text("\n".join(NAMES) + "\n")
    chosen = load_or_train_prior(PriorConfig(kind="sd15", path=str(folder), variant="fp16"), data, tmp_path)
    torch.testing.assert_close(chosen.vae.state_dict(), mixed.vae.state_dict(), rtol=0, atol=0)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"vae/ holds no ema weights \(fp16\): set prior.variant"):
        load_sd15_prior(folder, NAMES, variant="ema")
    with pytest.raises(FileNotFoundError, match=r"vae/ holds no ema weights"):
        load_or_train_prior(PriorConfig(kind="sd15", path=str(folder), variant="ema"), data, tmp_path)


def test_a_variant_only_folder_refuses_what_it_lacks(tmp_path, dit_built):
    folder = save_in_layout(dit_built, tmp_path / "fp16", "fp16")
    with pytest.raises(FileNotFoundError, match=r"vae/ holds no full-precision \(unsuffixed\) weights \(fp16\)"):
        load_dit_prior(folder, NAMES, variant="none")
    # Two variants and no plain files: which to load is the user's choice, not the engine's.
    for path in folder.glob("*/*.fp16.safetensors"):
        shutil.copy(path, path.with_name(path.name.replace(".fp16.", ".non_ema.")))
    with pytest.raises(FileNotFoundError, match=r"vae/ holds several variants \(fp16, non_ema\): set prior.variant"):
        load_dit_prior(folder, NAMES)
    assert load_dit_prior(folder, NAMES, variant="non_ema").image_size == 32


def test_a_missing_shard_is_named(tmp_path, dit_built):
    folder = save_in_layout(dit_built, tmp_path / "sharded", "sharded")
    shard = sorted((folder / "transformer").glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"transformer/diffusion_pytorch_model.safetensors.index.json lists "
                                                rf"{shard.name}, which is missing"):
        check_prior_folder(folder, ("vae", "transformer", "scheduler"))


@pytest.mark.parametrize("kind", ["sd15", "dit"])
def test_a_pickle_only_folder_is_refused_with_the_command_that_converts_it(tmp_path, sd15_built, dit_built, kind):
    built = sd15_built if kind == "sd15" else dit_built
    folder = save_in_layout(built, tmp_path / "with space" / "bin", "bin")
    with pytest.raises(FileNotFoundError, match=r"vae/diffusion_pytorch_model.bin is a pickle") as refused:
        load_prior(kind, folder, NAMES)
    message = str(refused.value)
    assert "\n" not in message and message.count(": ") <= 2
    command = shlex.split(re.search(r"`(.+)`", message).group(1))
    assert command[:2] == ["python", "jobs/convert_weights.py"]
    out = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    prior = load_prior(kind, folder, NAMES)
    assert_weights_equal(prior, built)
    one_decode_step(prior)
    assert convert_folder(folder, log=lambda line: None) == 0  # a rerun converts nothing


def test_a_pickled_text_encoder_beside_safetensors_parts_is_named(tmp_path, sd15_built):
    folder = save_in_layout(sd15_built, tmp_path / "sd15", "full")
    (folder / "text_encoder" / "model.safetensors").unlink()
    torch.save(sd15_built.text_encoder.state_dict(), folder / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"text_encoder/pytorch_model.bin is a pickle.*convert_weights.py"):
        load_prior("sd15", folder, NAMES)


def test_both_tokenizer_layouts_load(tmp_path, sd15_folder, sd15_built):
    """transformers 5 saves tokenizer.json; hub SD folders hold the slow tokenizer's vocab.json + merges.txt."""
    folder = tmp_path / "sd15"
    shutil.copytree(sd15_folder, folder)
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    shutil.rmtree(folder / "tokenizer")
    write_byte_tokenizer(folder / "tokenizer")
    prior = load_prior("sd15", folder, NAMES)
    assert prior.tokenizer(["great white shark"]).input_ids == sd15_built.tokenizer(["great white shark"]).input_ids
    (folder / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing tokenizer/tokenizer.json \(or vocab.json \+ merges.txt\)"):
        load_prior("sd15", folder, NAMES)


def test_a_single_file_checkpoint_is_refused(tmp_path):
    (tmp_path / "v1-5-pruned-emaonly.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"is a file, not a diffusers folder: .*from_single_file"):
        load_prior("sd15", tmp_path / "v1-5-pruned-emaonly.safetensors", NAMES)


def test_prior_variant_is_a_config_key():
    assert PriorConfig().variant == "auto"
    assert load_config(None, ["prior.kind=sd15", "prior.path=/m", "prior.variant=fp16"]).prior.variant == "fp16"
    for bad in ("fp16.safetensors", "../fp16", "", "fp 16"):
        with pytest.raises(ConfigError, match="prior.variant"):
            PriorConfig(variant=bad)


# ---------------------------------------------------------------- resolution from the denoiser


def test_the_published_configs_give_512_and_256():
    """SD v1.5's UNet (64 latents) and DiT-XL/2-256's transformer (32) with the 4-block VAE (factor 8); the
    sd-vae-ft-mse config's own 256 does not move SD off 512."""
    assert denoiser_resolution(SD15_VAE, SD15_UNET, "unet") == Resolution(512, (4, 64, 64))
    assert denoiser_resolution(SD_VAE_FT_MSE, SD15_UNET, "unet") == Resolution(512, (4, 64, 64))
    assert denoiser_resolution(SD_VAE_FT_MSE, DIT_XL2_256, "transformer") == Resolution(256, (4, 32, 32))


def test_the_resolution_comes_from_the_unet_not_the_vae_config(tmp_path, sd15_built):
    """A VAE whose config claims another size (sd-vae-ft-mse says 256 beside SD's 512 UNet) changes nothing: the
    UNet's 16-latent side x the VAE's factor 2 = 32 pixels."""
    folder = save_in_layout(sd15_built, tmp_path / "sd15", "full")
    edit_config(folder, "vae", sample_size=64)
    prior = load_prior("sd15", folder, NAMES)
    assert prior.image_size == 32 and prior.latent_shape == (4, 16, 16)
    latents = prior.encode(np.zeros((1, 20, 20, 3), np.uint8))
    assert latents.shape == (1, 4, 16, 16)


def test_a_dit_at_another_resolution_encodes_at_its_own(dit_built):
    """A DiT trained on 8-latent images (a DiT-512 beside a 256 VAE, scaled down) encodes at 8 x 2 = 16 px, so its
    latents fit the transformer, whatever the VAE's config says."""
    torch.manual_seed(0)
    small = build_dit_prior(NAMES, vae={**DIT_SMALL["vae"], "sample_size": 64},
                            transformer={**DIT_SMALL["transformer"], "sample_size": 8})
    assert small.image_size == 16 and small.latent_shape == (4, 8, 8)
    latents = small.encode(np.zeros((2, 32, 32, 3), np.uint8))
    assert latents.shape == (2, 4, 8, 8)
    images = decode_latents(small, latents, np.array([0, 1]), dataclasses.replace(DECODE, num_steps=2))
    assert images.shape == (2, 16, 16, 3)


@pytest.mark.parametrize("kind, component, change, message", [
    ("sd15", "vae", {"latent_channels": 8}, r"vae/config.json makes 8-channel latents but unet/config.json takes "
                                            r"in_channels 4: use the VAE this unet was trained with"),
    ("dit", "vae", {"latent_channels": 16}, r"makes 16-channel latents but transformer/config.json takes"),
    ("sd15", "text_encoder", {"hidden_size": 64}, r"text_encoder/config.json has hidden_size 64 but "
                                                  r"unet/config.json has cross_attention_dim 32"),
    ("sd15", "unet", {"_class_name": "UNet2DModel"}, r"unet/config.json is a UNet2DModel, not a UNet2DConditionModel"),
    ("dit", "transformer", {"sample_size": [16, 8]}, r"non-square sample_size \[16, 8\]"),
])
def test_parts_that_disagree_are_refused_before_any_weight_is_read(tmp_path, sd15_folder, dit_folder, kind,
                                                                  component, change, message):
    folder = tmp_path / kind
    shutil.copytree(sd15_folder if kind == "sd15" else dit_folder, folder)
    edit_config(folder, component, **change)
    for weights in folder.glob("*/*.safetensors"):
        weights.write_bytes(b"not a safetensors file")  # reading any weight would fail with another error
    with pytest.raises(ValueError, match=message) as refused:
        load_prior(kind, folder, NAMES)
    assert str(folder) in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.ray
def test_sd15_through_the_ray_encode_and_decode_stages(ray_session, tmp_path, sd15_folder, sd15):
    """Parquet shards at 20x20 are read at the prior's 32x32, encoded by the sd15 VAE on Ray Data, and centroids are
    decoded back to PNGs at the data's 20x20: the path `jobs/distill.py` takes with prior.kind=sd15."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from engine.io import store
    from engine.ray.decode import decode_centroids_to_sets
    from engine.ray.encode import encode_to_parquet

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
    assert encode_to_parquet(config, sd15_folder, tmp_path / "latents", sd15.image_size, names).images == 8
    ids, latents = store.read_class_latents(store.class_latent_dirs(tmp_path / "latents")[1])
    assert latents.shape == (4, 4 * 16 * 16)
    from tests.centroid_files import write_centroid_files

    files = write_centroid_files(tmp_path / "quantized", {1: {2: latents[:2]}})
    decoded = decode_centroids_to_sets(config, sd15_folder, files, {(2, "ddoq"): [str(tmp_path / "set")]}, names)
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


@pytest.mark.parametrize("kind", ["sd15", "dit"])
def test_noise_space_round_trip_through_each_prior(kind, request):
    """quantize.space=noise needs every prior's condition/guided_eps (engine/invert.py): invert then sample back at
    the same t with guidance 1 returns the latents; with guidance 3 both branches run and the states decode."""
    from engine.invert import invert_latents, sample_from_states, states_to_images

    prior = request.getfixturevalue(kind)
    latents = np.random.default_rng(0).standard_normal((3, *prior.latent_shape)).astype(np.float32)
    labels = np.array([0, 1, 0])
    errors = []
    for steps in (10, 40):  # the inversion's local approximation: its error shrinks as the steps get finer
        config = DecodeConfig(num_steps=steps, strength=0.3, guidance_scale=1.0, negative_prompt="cartoon")
        states = invert_latents(prior, latents, labels, config)
        back = sample_from_states(prior, states, labels, config).float().numpy()
        errors.append(np.linalg.norm(back - latents) / np.linalg.norm(latents))
    assert errors[1] < 0.5 * errors[0] and errors[1] < 0.05
    images = states_to_images(prior, states, labels, dataclasses.replace(config, guidance_scale=3.0), 16)
    assert images.shape == (3, 16, 16, 3)
