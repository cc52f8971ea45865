import numpy as np
import pytest

from engine.config import QuantizeConfig
from engine.quantize.quantizer import quantize_class, weights_from_counts
from engine.quantize.transport import distortion, squared_distances, w2_distance


@pytest.fixture
def skewed():
    # Unequal clusters: the case where mass weights should matter.
    rng = np.random.default_rng(0)
    big = rng.normal(0, 1, (150, 6))
    small = rng.normal(6, 1, (20, 6))
    return np.concatenate([big, small]).astype(np.float32)


def test_mass_weights_give_w2_squared_equal_to_distortion(skewed):
    q = quantize_class(skewed, 6, QuantizeConfig(seed=0))
    w2 = w2_distance(skewed, q.centroids, weights_from_counts(q.counts, "mass"))
    assert w2**2 == pytest.approx(q.distortion, rel=1e-4)


def test_uniform_weights_are_never_closer_than_mass(skewed):
    for k in (2, 5, 10):
        q = quantize_class(skewed, k, QuantizeConfig(seed=1))
        uniform = w2_distance(skewed, q.centroids, weights_from_counts(q.counts, "uniform"))
        mass = w2_distance(skewed, q.centroids, weights_from_counts(q.counts, "mass"))
        assert mass <= uniform + 1e-9
    assert mass < uniform  # and strictly closer on skewed data


def test_w2_is_zero_between_a_measure_and_itself():
    points = np.random.default_rng(0).standard_normal((12, 3))
    assert w2_distance(points, points, np.ones(12)) == pytest.approx(0.0, abs=1e-6)


def test_w2_of_a_shift_is_the_shift_length():
    points = np.random.default_rng(0).standard_normal((10, 3))
    assert w2_distance(points, points + np.array([3.0, 4.0, 0.0]), np.ones(10)) == pytest.approx(5.0, rel=1e-6)


def test_squared_distances_and_distortion():
    points = np.array([[0.0, 0.0], [2.0, 0.0]])
    centroids = np.array([[0.0, 0.0]])
    np.testing.assert_allclose(squared_distances(points, centroids), [[0.0], [4.0]])
    assert distortion(points, centroids) == pytest.approx(2.0)


def test_negative_weights_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        w2_distance(np.zeros((2, 2)), np.zeros((2, 2)), np.array([1.0, -1.0]))
