"""Shared fixtures: tiny priors built from config (random weights, seeded) and one Ray instance per session."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from engine.config import PriorConfig

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(2)

TINY_PRIOR = PriorConfig(vae_channels=(8, 16), unet_channels=(16, 32), vae_steps=2, unet_steps=2, batch_size=8)
CLASS_NAMES = tuple(str(i) for i in range(3))


@pytest.fixture
def tiny_prior():
    """A random-weight tiny prior for 16x16 images and 3 classes (latents 4x8x8)."""
    from engine.priors.tiny import build_tiny_prior

    torch.manual_seed(0)
    return build_tiny_prior(TINY_PRIOR, 16, CLASS_NAMES).eval()


@pytest.fixture
def saved_prior(tmp_path, tiny_prior):
    folder = tmp_path / "prior"
    tiny_prior.save(folder)
    return folder


@pytest.fixture
def images_u8():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)


_ray_node_started_here = None  # by ray_session, after s3_env: its workers carry the endpoint's variables


@pytest.fixture
def ray_session(s3_env):
    """One local Ray for the whole session (started on first use: ~5 s), re-started if a test shut it down or
    started its own. Started after the test S3 endpoint, so its workers reach s3:// run folders as a cluster's
    nodes would."""
    global _ray_node_started_here
    import ray

    if ray.is_initialized() and ray.get_runtime_context().get_node_id() != _ray_node_started_here:
        ray.shutdown()
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        _ray_node_started_here = ray.get_runtime_context().get_node_id()
    return ray


@pytest.fixture(scope="session")
def s3_env():
    """A local S3 endpoint (moto) for the session: {AWS_* variables, "bucket"}; tests use their own prefixes."""
    from tests.object_store import s3_endpoint

    with s3_endpoint() as env:
        yield env
