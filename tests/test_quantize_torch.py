"""The torch quantizer (engine/quantize/lloyd_torch.py), run on the CPU here: the same algorithm as the faiss path, so the
same objective, and the device selection that keeps a quantize actor given a GPU off the CPU."""

from functools import partial

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

import engine.quantize.lloyd_torch
from engine.config import QuantizeConfig
from engine.quantize.lloyd_torch import lloyd_torch
from engine.quantize.quantizer import quantize_class, quantize_device
from engine.quantize.transport import distortion, squared_distances

quantize_with_torch = partial(quantize_class, backend="torch")


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny ops on 2 shared cores run far slower with 2 threads (measured: 5x here); restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def blobs():
    points, truth = make_blobs(n_samples=400, centers=5, n_features=16, cluster_std=1.0, random_state=0)
    return points.astype(np.float32), truth


@pytest.fixture
def overlapping():
    """Harder than well-separated blobs: 8 overlapping clusters in 32-d, K below and above 8."""
    points, _ = make_blobs(n_samples=600, centers=8, n_features=32, cluster_std=4.0, random_state=1)
    return points.astype(np.float32)


@pytest.mark.parametrize("k", [1, 3, 8, 20])
@pytest.mark.parametrize("seed", [0, 1])
def test_objective_matches_the_faiss_path(overlapping, k, seed):
    config = QuantizeConfig(seed=seed)
    mine, faiss_q = quantize_with_torch(overlapping, k, config, "cpu"), quantize_class(overlapping, k, config)
    assert mine.distortion == pytest.approx(faiss_q.distortion, rel=0.01)
    # The same numpy draws seed both: the k-means++ starts agree to float rounding.
    assert mine.initial_distortion == pytest.approx(faiss_q.initial_distortion, rel=1e-4)


def test_recovers_blobs(blobs):
    points, truth = blobs
    q = quantize_with_torch(points, 5, QuantizeConfig(seed=0), "cpu")
    assert adjusted_rand_score(truth, squared_distances(points, q.centroids).argmin(1)) > 0.99
    assert q.distortion == pytest.approx(distortion(points, q.centroids), rel=1e-4)


def test_objective_never_increases(overlapping):
    points = torch.as_tensor(overlapping)
    for init in ("kmeans++", "random"):
        q = quantize_with_torch(points, 8, QuantizeConfig(init=init, seed=3), "cpu")
        assert q.distortion <= q.initial_distortion * (1 + 1e-6)
    start = points[np.random.default_rng(0).choice(len(points), 8, replace=False)]
    # Objective after 1, 2, ... Lloyd iterations from one start (tol=-1: never stop early).
    values = [distortion(overlapping, lloyd_torch(points, start, i, tol=-1.0).numpy()) for i in range(1, 12)]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(values, values[1:]))


def test_an_empty_cell_is_moved_not_lost(blobs):
    points = torch.as_tensor(blobs[0])
    start = torch.cat([points[:4], torch.full((1, points.shape[1]), 1e3)])  # the last centroid wins no point
    centroids = lloyd_torch(points, start, 10, tol=0.0)
    assert torch.isfinite(centroids).all()
    counts = torch.bincount(torch.cdist(points, centroids).argmin(1), minlength=5)
    assert (counts > 0).all()


def test_counts_cover_every_point():
    points = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    q = quantize_with_torch(points, 1, device="cpu")
    assert q.counts.tolist() == [300] and q.counts.dtype == np.int64
    np.testing.assert_allclose(q.centroids[0], points.mean(0), atol=1e-4)
    q = quantize_with_torch(points, 7, device="cpu")
    assert q.counts.sum() == 300 and q.centroids.shape == (7, 8) and q.centroids.dtype == np.float32


def test_fewer_points_than_k_behaves_like_the_faiss_path():
    points = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    with pytest.warns(UserWarning, match="K=10"):
        q = quantize_with_torch(points, 10, device="cpu")
    assert q.k == 4 and q.requested_k == 10 and q.distortion == pytest.approx(0.0, abs=1e-6)
    assert q.counts.tolist() == [1, 1, 1, 1]


def test_seeded_and_tensor_input():
    points = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    for config in (QuantizeConfig(seed=5), QuantizeConfig(seed=5, init="random"), QuantizeConfig(init="faiss")):
        a = quantize_with_torch(points, 7, config, "cpu")
        b = quantize_with_torch(torch.as_tensor(points).reshape(200, 2, 4), 7, config, "cpu")  # (n, ...) latents
        np.testing.assert_array_equal(a.centroids, b.centroids)
        np.testing.assert_array_equal(a.counts, b.counts)


def test_duplicate_points():
    points = np.repeat(np.eye(3, dtype=np.float32), 20, axis=0)  # 3 distinct points, 20 copies each
    q = quantize_with_torch(points, 5, device="cpu")
    assert q.counts.sum() == 60 and q.distortion == pytest.approx(0.0, abs=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_with_torch(np.full((10, 4), np.nan, np.float32), 2, device="cpu")
    with pytest.raises(ValueError, match="k must be"):
        quantize_with_torch(np.zeros((5, 2), np.float32), 0, device="cpu")
    with pytest.raises(ValueError, match="empty"):
        quantize_with_torch(np.zeros((0, 2), np.float32), 1, device="cpu")
    with pytest.raises(ValueError, match="Lloyd only"):
        quantize_with_torch(np.zeros((5, 2), np.float32), 1, QuantizeConfig(algorithm="clvq"), device="cpu")


def test_quantize_device(monkeypatch):
    assert quantize_device(0.0) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"quantize_gpus_per_actor=0.5 but no CUDA device is visible"):
        quantize_device(0.5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert quantize_device(1.0) == "cuda"


def test_cuda_without_faiss_gpu_takes_the_torch_path(monkeypatch, blobs):
    calls = []
    monkeypatch.setattr("engine.quantize.quantizer.faiss_sees_gpu", lambda: False)
    on_cpu = engine.quantize.lloyd_torch.TorchLloyd
    monkeypatch.setattr(engine.quantize.lloyd_torch, "TorchLloyd",
                        lambda latents, k, config, device: calls.append((k, device)) or on_cpu(latents, k, config, "cpu"))
    assert quantize_class(blobs[0], 3, device="cuda").k == 3 and calls == [(3, "cuda")]
    with pytest.raises(ValueError, match="runs on the CPU only"):  # never a silent CPU run on a GPU actor
        quantize_class(blobs[0], 3, QuantizeConfig(algorithm="clvq"), device="cuda")
    with pytest.raises(ValueError, match="unknown quantize device"):
        quantize_class(blobs[0], 3, device="gpu")
