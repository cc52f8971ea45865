"""Training the tiny prior with checkpoints: a killed run resumes to the same weights; jobs/train_prior.py writes the
folder the distill job loads, plus quality.json and samples.png."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from engine.config import DataConfig, DecodeConfig, load_config
from engine.data.images import load_split
from engine.priors import load_or_train_prior, prior_cache_folder
from engine.priors.checkpoint import Checkpointer
from engine.priors.train_tiny import one_cycle, train_tiny_prior
from tests.conftest import CLASS_NAMES, TINY_PRIOR

CONFIG = dataclasses.replace(TINY_PRIOR, vae_steps=4, unet_steps=4)


class Killed(Exception):
    pass


class KilledAfter(Checkpointer):
    """Dies right after its n-th checkpoint, as a killed process would (the checkpoint is on disk, nothing after)."""

    def __init__(self, folder, saves: int):
        super().__init__(folder, every=1)
        self.saves = saves

    def save(self, *args):
        super().save(*args)
        self.saves -= 1
        if self.saves == 0:
            raise Killed


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8), np.arange(12) % 3


@pytest.fixture(scope="module")
def uninterrupted(data):
    return train_tiny_prior(CONFIG, *data, CLASS_NAMES, log=quiet)


# 2 saves: killed inside the VAE phase; 6 saves: 4 VAE + the finished-VAE one + 1 UNet step.
@pytest.mark.parametrize("saves", [2, 6])
def test_a_killed_run_resumes_to_the_same_weights(tmp_path, data, uninterrupted, saves):
    with pytest.raises(Killed):
        train_tiny_prior(CONFIG, *data, CLASS_NAMES, log=quiet, checkpoint=KilledAfter(tmp_path, saves))
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["phase"] == ("vae" if saves == 2 else "unet") and state["step"] in (2, 1)
    lines = []
    resumed = train_tiny_prior(CONFIG, *data, CLASS_NAMES, log=lines.append, checkpoint=Checkpointer(tmp_path, 1))
    assert any("resuming" in line for line in lines)
    for model in ("vae", "unet"):
        for p, q in zip(getattr(resumed, model).parameters(), getattr(uninterrupted, model).parameters()):
            assert torch.equal(p, q)
    assert resumed.vae.config.scaling_factor == uninterrupted.vae.config.scaling_factor
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pkl"))  # safetensors + weights_only


def test_train_prior_job_writes_the_folder_distill_loads(tmp_path):
    from safetensors.torch import save_file

    from engine.config import EvaluateConfig
    from engine.evaluate.train import TrainSet
    from engine.pipeline import resolve_channels, teacher_cache_path
    from tests.training import train_teacher
    from jobs.train_prior import main

    overrides = [f"cache_dir={tmp_path}", f"runs_dir={tmp_path / 'runs'}", "prior.vae_steps=3", "prior.unet_steps=3", "prior.vae_channels=[8,16]",
                 "prior.unet_channels=[16,32]", "decode.num_steps=3", "evaluate.width=8"]
    config = load_config("configs/digits.yaml", overrides)
    # The engine's cached teacher, trained here in-process (the job would train it through Ray Train); the digits
    # are grey, so it reads one channel, as the job decides.
    config = resolve_channels(config, grey=True)
    train = load_split(config.data, "train")
    teacher = train_teacher(TrainSet(train.images, train.labels, np.ones(len(train))), 10, "convnet3",
                            EvaluateConfig(width=8, teacher_epochs=2, batch_size=64, channels=1), seed=0)
    teacher_cache_path(config).parent.mkdir(parents=True)
    save_file(teacher.state_dict(), teacher_cache_path(config))
    folder = main(["--config", "configs/digits.yaml", "--samples-per-class", "2", "--quality-samples", "10",
                   *overrides])
    assert folder == prior_cache_folder(config.prior, DataConfig(), tmp_path)
    assert not folder.with_name(folder.name + ".checkpoints").exists()
    quality = json.loads((folder / "quality.json").read_text())
    val = load_split(config.data, "val")  # scored on validation images, never on test
    assert quality["val"]["images"] == len(val) and quality["val"]["mse"] > 0 and quality["train_seconds_this_run"] > 0
    samples, real = quality["samples"], quality["real"]
    assert samples["images"] == 100 and real["images"] == len(val) - len(val) // 2
    # A 3-step prior draws noise, the real half of val is digits: the teacher tells them apart.
    assert real["class_agreement"] > samples["class_agreement"] and real["frechet_distance"] < samples["frechet_distance"]
    from PIL import Image

    assert Image.open(folder / "samples.png").size == (16 * 4, 16 * 10)  # real, reconstruction, 2 samples x 10 classes
    calls = []
    load_or_train_prior(config.prior, config.data, tmp_path, log=calls.append)
    assert calls == []  # the distill job's loader finds it: nothing trained


def test_the_unet_schedule_runs_for_any_step_count():
    """OneCycleLR divided by zero at 20 steps (a 5% warm-up of exactly one step)."""
    for steps in (1, 2, 3, 4, 19, 20, 21, 40, 1500):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        schedule = one_cycle(optimizer, 1e-3, steps)
        for _ in range(steps - 1):
            optimizer.step()
            schedule.step()
    assert one_cycle(optimizer, 1e-3, 1500).total_steps == 1500


def test_ema_weights_are_what_sampling_uses(tmp_path, data, uninterrupted, monkeypatch):
    """With prior.ema_decay the UNet the prior samples with (and saves) is the moving average of the weights
    after every step, warmed up; the raw trajectory is unchanged (same seed, same batches as without EMA)."""
    from engine.priors import save_prior_atomically
    from engine.priors.ema import EmaWeights
    from engine.priors.tiny import load_tiny_prior

    seen = []
    update = EmaWeights.update
    monkeypatch.setattr(EmaWeights, "update", lambda self, module: (
        seen.append({k: v.detach().clone() for k, v in module.state_dict().items()}), update(self, module))[1])
    config = dataclasses.replace(CONFIG, ema_decay=0.5)
    averaged = train_tiny_prior(config, *data, CLASS_NAMES, log=quiet)
    assert len(seen) == CONFIG.unet_steps
    for name, raw in uninterrupted.unet.state_dict().items():  # the last step's weights are the EMA-free run's
        assert torch.equal(seen[-1][name], raw)
    first = build_initial_unet_state(config)
    for name, value in averaged.unet.state_dict().items():
        if not value.is_floating_point():
            continue
        expected = first[name].clone()
        for step, weights in enumerate(seen, 1):
            decay = min(0.5, 1 - 1 / (10 + step))
            expected = decay * expected + (1 - decay) * weights[name]
        assert torch.allclose(value, expected, atol=1e-6), name
    assert any(not torch.equal(a, b) for a, b in zip(averaged.unet.parameters(), uninterrupted.unet.parameters()))
    save_prior_atomically(averaged, tmp_path / "prior")
    loaded = load_tiny_prior(tmp_path / "prior")
    assert all(torch.equal(a, b) for a, b in zip(loaded.unet.parameters(), averaged.unet.parameters()))


def build_initial_unet_state(config):
    """The UNet's weights before its first step: the same seeded build as train_tiny_prior's."""
    from engine.priors.tiny import build_tiny_prior

    torch.manual_seed(config.seed)
    return build_tiny_prior(config, 16, CLASS_NAMES).unet.state_dict()


def test_a_killed_ema_run_resumes_to_the_same_average(tmp_path, data):
    config = dataclasses.replace(CONFIG, ema_decay=0.5)
    whole = train_tiny_prior(config, *data, CLASS_NAMES, log=quiet)
    with pytest.raises(Killed):  # 4 VAE saves + the finished VAE + 2 UNet steps
        train_tiny_prior(config, *data, CLASS_NAMES, log=quiet, checkpoint=KilledAfter(tmp_path, 7))
    resumed = train_tiny_prior(config, *data, CLASS_NAMES, log=quiet, checkpoint=Checkpointer(tmp_path, 1))
    assert all(torch.equal(a, b) for a, b in zip(resumed.unet.parameters(), whole.unet.parameters()))


def test_v_prediction_and_min_snr_weighting():
    from engine.priors.tiny import build_tiny_prior
    from engine.priors.train_tiny import denoising_loss

    config = dataclasses.replace(CONFIG, prediction="v_prediction", min_snr_gamma=5.0)
    prior = build_tiny_prior(config, 16, CLASS_NAMES)
    assert prior.scheduler.config.prediction_type == "v_prediction"  # saved with it: sampling reads v
    z0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    alpha_bar = prior.scheduler.alphas_cumprod[t]
    v = alpha_bar.sqrt()[:, None, None, None] * noise - (1 - alpha_bar).sqrt()[:, None, None, None] * z0
    output = torch.zeros_like(z0)
    snr = alpha_bar / (1 - alpha_bar)
    expected = ((v**2).flatten(1).mean(1) * snr.clamp(max=5.0) / (snr + 1)).mean()
    assert torch.allclose(denoising_loss(prior, z0, noise, t, output, config), expected, rtol=1e-5)
    plain = dataclasses.replace(CONFIG, min_snr_gamma=0.0)
    eps_prior = build_tiny_prior(plain, 16, CLASS_NAMES)
    assert torch.allclose(denoising_loss(eps_prior, z0, noise, t, output, plain), (noise**2).mean())
    images = eps_prior.decode(np.zeros((2, 4, 8, 8), np.float32), np.array([0, 1]), DecodeConfig(num_steps=2),
                              np.arange(2))
    v_images = prior.decode(np.zeros((2, 4, 8, 8), np.float32), np.array([0, 1]), DecodeConfig(num_steps=2),
                            np.arange(2))
    assert images.shape == v_images.shape == (2, 16, 16, 3)
