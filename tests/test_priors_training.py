"""Training the tiny prior with checkpoints: a killed run resumes to the same weights; jobs/train_prior.py writes the
folder the distill job loads, plus quality.json and samples.png."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from engine.config import DataConfig, load_config
from engine.data import load_split
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
    from engine.pipeline import teacher_cache_path
    from engine.train import TrainSet, train_teacher
    from jobs.train_prior import main

    overrides = [f"cache_dir={tmp_path}", "prior.vae_steps=3", "prior.unet_steps=3", "prior.vae_channels=[8,16]",
                 "prior.unet_channels=[16,32]", "decode.num_steps=3", "evaluate.width=8"]
    config = load_config("configs/digits.yaml", overrides)
    # The engine's cached teacher, trained here in-process (the job would train it through Ray Train).
    train = load_split(config.data, "train")
    teacher = train_teacher(TrainSet(train.images, train.labels, np.ones(len(train))), 10, "convnet3",
                            EvaluateConfig(width=8, teacher_epochs=2, batch_size=64), seed=0)
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
