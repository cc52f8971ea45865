import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from engine.config import QuantizeConfig
from engine.quantize.lloyd_torch import kmeans_plus_plus
from engine.quantize.quantizer import quantize_and_measure, quantize_class, weights_from_counts
from engine.quantize.transport import distortion, squared_distances


@pytest.fixture
def blobs():
    points, truth = make_blobs(n_samples=400, centers=5, n_features=16, cluster_std=1.0, random_state=0)
    return points.astype(np.float32), truth


def test_recovers_blobs(blobs):
    points, truth = blobs
    q = quantize_class(points, 5, QuantizeConfig(seed=0))
    assigned = squared_distances(points, q.centroids).argmin(1)
    assert adjusted_rand_score(truth, assigned) > 0.99


def test_objective_never_exceeds_its_initial_centroids(blobs):
    points, _ = blobs
    for init in ("kmeans++", "random"):
        for seed in range(4):
            q = quantize_class(points, 8, QuantizeConfig(init=init, seed=seed))
            assert q.distortion <= q.initial_distortion * (1 + 1e-5)
            assert q.distortion <= quantize_class(points, 8, QuantizeConfig(init=init, seed=seed, niter=1)).distortion
            assert q.distortion == pytest.approx(distortion(points, q.centroids), rel=1e-4)


def test_default_objective_beats_k_random_points(blobs):
    # (Random init alone can merge two blobs and lose to a lucky draw: that is why k-means++ is the default.)
    points, _ = blobs
    rng = np.random.default_rng(1)
    for seed in range(4):
        q = quantize_class(points, 8, QuantizeConfig(seed=seed))
        for _ in range(5):
            assert q.distortion < distortion(points, points[rng.choice(len(points), 8, replace=False)])


def test_more_centroids_never_worse(blobs):
    points, _ = blobs
    values = [quantize_class(points, k, QuantizeConfig(seed=0)).distortion for k in (1, 2, 5, 10, 20)]
    assert all(b <= a * (1 + 1e-5) for a, b in zip(values, values[1:]))


def test_counts_cover_all_points_not_a_subsample():
    # 300 points, K=1: faiss would train on at most 256 per centroid; counts must still see all 300.
    points = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    q = quantize_class(points, 1)
    assert q.counts.tolist() == [300]
    np.testing.assert_allclose(q.centroids[0], points.mean(0), atol=1e-4)


def test_seeded():
    points = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    for config in (QuantizeConfig(seed=5), QuantizeConfig(seed=5, algorithm="clvq"), QuantizeConfig(init="faiss")):
        np.testing.assert_array_equal(quantize_class(points, 7, config).centroids, quantize_class(points, 7, config).centroids)


@pytest.mark.parametrize("mode", ["uniform", "mass", "sqrt"])
def test_weights_average_one(mode):
    counts = np.array([10, 0, 3, 7])
    weights = weights_from_counts(counts, mode)
    assert weights.mean() == pytest.approx(1.0)
    assert (weights >= 0).all()


def test_mass_weights_reproduce_cell_counts():
    counts = np.array([50, 25, 25])
    np.testing.assert_allclose(weights_from_counts(counts, "mass") / 3, counts / counts.sum())
    np.testing.assert_allclose(weights_from_counts(counts, "sqrt"), np.sqrt(counts) * 3 / np.sqrt(counts).sum())


def test_fewer_points_than_k_uses_every_point():
    points = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    with pytest.warns(UserWarning, match="K=10"):
        q = quantize_class(points, 10)
    assert q.k == 4 and q.requested_k == 10 and q.distortion == pytest.approx(0.0, abs=1e-6)


def test_duplicate_points_do_not_break_seeding_or_weights():
    points = np.repeat(np.eye(3, dtype=np.float32), 20, axis=0)  # 3 distinct points, 20 copies each
    q = quantize_class(points, 5)
    assert q.counts.sum() == 60
    assert weights_from_counts(q.counts, "mass").mean() == pytest.approx(1.0)
    assert len(kmeans_plus_plus(points, 5, np.random.default_rng(0))) == 5


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_latents_are_rejected(bad):
    points = np.zeros((10, 4), np.float32)
    points[3, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_class(points, 2)


def test_bad_k_and_empty_class():
    with pytest.raises(ValueError, match="k must be"):
        quantize_class(np.zeros((5, 2), np.float32), 0)
    with pytest.raises(ValueError, match="empty"):
        quantize_class(np.zeros((0, 2), np.float32), 1)


def test_report_has_every_weighting(blobs):
    report = quantize_and_measure(blobs[0][:100], 4, QuantizeConfig(niter=20))
    assert set(report.weights) == set(report.w2) == {"uniform", "mass", "sqrt"}
    assert report.n == 100


def test_clvq_converges_toward_lloyd_on_blobs(blobs):
    points, truth = blobs
    lloyd = quantize_class(points, 5, QuantizeConfig(seed=0))
    clvq = quantize_class(points, 5, QuantizeConfig(seed=0, algorithm="clvq", clvq_epochs=20))
    assert clvq.distortion <= lloyd.distortion * 1.05
    assigned = squared_distances(points, clvq.centroids).argmin(1)
    assert adjusted_rand_score(truth, assigned) > 0.95
    # More passes bring it closer.
    short = quantize_class(points, 5, QuantizeConfig(seed=0, algorithm="clvq", clvq_epochs=1))
    assert clvq.distortion <= short.distortion * (1 + 1e-6)


def test_nredo_keeps_the_best_run(blobs):
    points, _ = blobs
    single = [quantize_class(points, 8, QuantizeConfig(init="random", seed=s)).distortion for s in range(4)]
    best = quantize_class(points, 8, QuantizeConfig(init="random", seed=0, nredo=4)).distortion
    assert best == pytest.approx(min(single), rel=1e-6)


def test_faiss_init_runs_and_reports_no_initial_objective(blobs):
    q = quantize_class(blobs[0], 5, QuantizeConfig(init="faiss"))
    assert q.k == 5 and np.isnan(q.initial_distortion)


def test_k_of_200_on_a_class_of_300():
    points = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    q = quantize_class(points, 200, QuantizeConfig(nredo=1))
    assert q.k == 200 and q.counts.sum() == 300 and q.distortion < quantize_class(points, 50).distortion
