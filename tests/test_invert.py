"""The noise space (engine/invert.py): DDIM inversion and the deterministic reverse process on a tiny prior, the
v-prediction conversion, norm matching, and noise-space quantization of one class."""

import dataclasses

import numpy as np
import pytest
import torch

from engine.config import ConfigError, DecodeConfig, QuantizeConfig, load_config
from engine.invert import (epsilon_of, invert_latents, match_norms, noise_timesteps, sample_from_states,
                           states_to_images)


def latents_and_labels(n: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 4, 8, 8)).astype(np.float32), np.arange(n) % 3


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_inverting_then_sampling_back_at_the_same_t_returns_the_latent(tiny_prior, prediction):
    """Guidance 1 both ways, 50 steps: the round trip's relative error stays under 2 % up to strength 0.7 (it
    grows with t, as the inversion's local approximation accumulates; at t near T it is not a round trip)."""
    tiny_prior.scheduler = type(tiny_prior.scheduler).from_config(tiny_prior.scheduler.config,
                                                                  prediction_type=prediction)
    latents, labels = latents_and_labels()
    for strength, tolerance in ((0.3, 0.005), (0.7, 0.02)):
        config = DecodeConfig(num_steps=50, strength=strength, guidance_scale=1.0)
        states = invert_latents(tiny_prior, latents, labels, config)
        assert states.shape == latents.shape and np.isfinite(states).all()
        assert np.linalg.norm(states - latents) > 0.1 * np.linalg.norm(latents)  # the climb moved them
        back = sample_from_states(tiny_prior, states, labels, config).numpy()
        assert np.linalg.norm(back - latents) / np.linalg.norm(latents) < tolerance


def test_guidance_one_is_the_conditional_branch_alone(tiny_prior):
    """guided_eps at guidance 1 skips the null branch; it equals the guided formula's value at 1."""
    x = torch.randn(4, 4, 8, 8)
    condition = tiny_prior.condition(np.array([0, 1, 2, 0]), DecodeConfig())
    alone = tiny_prior.guided_eps(x, 500, condition, 1.0, DecodeConfig())
    with torch.no_grad():
        both = tiny_prior.unet(torch.cat([x, x]), 500, class_labels=condition).sample[:4]
    torch.testing.assert_close(alone, both, atol=1e-5, rtol=1e-5)


def test_v_prediction_converts_to_the_noise_it_implies(tiny_prior):
    scheduler = type(tiny_prior.scheduler).from_config(tiny_prior.scheduler.config, prediction_type="v_prediction")
    t = 400
    a = float(scheduler.alphas_cumprod[t])
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x = a ** 0.5 * x0 + (1 - a) ** 0.5 * eps
    v = a ** 0.5 * eps - (1 - a) ** 0.5 * x0
    torch.testing.assert_close(epsilon_of(scheduler, v, x, t), eps, atol=1e-5, rtol=1e-5)
    sample = type(scheduler).from_config(scheduler.config, prediction_type="sample")
    torch.testing.assert_close(epsilon_of(sample, x0, x, t), eps, atol=1e-4, rtol=1e-4)


def test_the_schedule_is_the_last_strength_fraction_of_evenly_spaced_steps(tiny_prior):
    steps = noise_timesteps(tiny_prior.scheduler, 10, 0.3)
    assert steps == [200, 100, 0]  # 1000 training steps, 10 decode steps: every 100th, the last 3
    assert noise_timesteps(tiny_prior.scheduler, 10, 1.0)[0] == 900


def test_states_decode_to_images_of_the_evaluation_size(tiny_prior):
    latents, labels = latents_and_labels(3)
    config = DecodeConfig(num_steps=4, strength=0.5)
    images = states_to_images(tiny_prior, invert_latents(tiny_prior, latents, labels, config), labels, config, 12)
    assert images.shape == (3, 12, 12, 3) and images.dtype == np.uint8


def test_match_norms_keeps_directions_and_restores_the_members_norm():
    """Averaging noise-like states shrinks the norm ~1/sqrt(n); each centroid is scaled back to its cell's mean."""
    rng = np.random.default_rng(0)
    points = rng.standard_normal((400, 256)).astype(np.float32)
    points[200:] += 3.0  # two cells
    centroids = np.stack([points[:200].mean(0), points[200:].mean(0)])
    scaled, factors = match_norms(centroids, points)
    for k, members in enumerate((points[:200], points[200:])):
        assert np.linalg.norm(scaled[k]) == pytest.approx(np.linalg.norm(members, axis=1).mean(), rel=1e-5)
        cosine = scaled[k] @ centroids[k] / np.linalg.norm(scaled[k]) / np.linalg.norm(centroids[k])
        assert cosine == pytest.approx(1.0, abs=1e-6)
    assert factors[0] > 10  # pure noise: the mean of 200 has ~1/14 of a member's norm


def test_noise_space_quantizes_states_and_writes_centroids_at_their_cells_norm(tmp_path):
    """Blobs of noise-like states: the quantizer runs unchanged on them; the written centroids carry the norm of
    their members and the stats name the factor, while W2 is that of the quantized (unscaled) centroids."""
    from engine.io import store
    from engine.quantize.class_task import class_result_paths, quantize_class_folder

    rng = np.random.default_rng(1)
    centers = rng.standard_normal((3, 64)) * 0.5
    states = (centers[rng.integers(0, 3, 300)] + rng.standard_normal((300, 64))).astype(np.float32)
    folder = tmp_path / "latents" / "label=0"
    store.atomic_write_table(folder / "part-00000.parquet", store.latents_to_table(
        np.array([f"0/{i:04d}" for i in range(300)]), np.zeros(300, int), states))
    out = {}
    for space in ("latent", "noise"):
        quantize_class_folder(0, str(folder), QuantizeConfig(ipc=(3,), space=space), str(tmp_path / space))
        centroids_path, stats_path = class_result_paths(tmp_path / space, 0)
        out[space] = (store.read_table(centroids_path).to_pandas(), store.read_table(stats_path).to_pandas())
    latent_rows, noise_rows = out["latent"][0], out["noise"][0]
    member_norm = np.linalg.norm(states, axis=1).mean()
    noise_ddoq = np.stack(noise_rows[noise_rows.quantizer == "ddoq"].latent)
    assert np.linalg.norm(noise_ddoq, axis=1) == pytest.approx(np.full(3, member_norm), rel=0.1)
    latent_ddoq = np.stack(latent_rows[latent_rows.quantizer == "ddoq"].latent)
    assert np.linalg.norm(latent_ddoq, axis=1).max() < 0.8 * member_norm  # the averages a sampler would not expect
    assert out["noise"][1].norm_scale.iloc[0] > 1.2 and out["latent"][1].norm_scale.iloc[0] == 1.0
    assert out["noise"][1].w2_mass.iloc[0] == pytest.approx(out["latent"][1].w2_mass.iloc[0])


def test_one_strength_serves_every_ipc_in_the_noise_space():
    with pytest.raises(ConfigError, match="decode.strength_by_ipc"):
        load_config(None, ["quantize.space=noise", "decode.strength_by_ipc={1: 0.7}"])
    config = load_config(None, ["quantize.space=noise", "decode.strength=0.6"])
    assert config.quantize.space == "noise" and dataclasses.asdict(config.decode)["inversion_guidance"] == 1.0
