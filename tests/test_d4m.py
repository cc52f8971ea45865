"""D4M's quantizer as its code runs it (engine/quantize/d4m.py): the same centroids as D4M's loop over sklearn's
MiniBatchKMeans, transcribed here from distillation/gen_prototype.py of suduo94/D4M, on a fixed seed."""

import numpy as np
import pytest
from sklearn.cluster import MiniBatchKMeans

from engine.config import QuantizeConfig
from engine.quantize.d4m import d4m_batches, d4m_quantize
from engine.quantize.quantizer import quantize_class
from engine.quantize.transport import distortion


def blobs(n: int = 600, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((8, dim)) * 4
    return (centers[rng.integers(0, 8, n)] + rng.standard_normal((n, dim))).astype(np.float32)


def d4m_reference(stream: np.ndarray, ipc: int, km_expand: int) -> np.ndarray:
    """gen_prototype.py's initialize_km_models + prototype_kmeans for one class whose latents arrive in `stream`
    order: partial_fit whenever km_expand * ipc latents have gathered, then the leftover when it holds >= ipc."""
    model = MiniBatchKMeans(n_clusters=ipc, random_state=0, batch_size=km_expand * ipc, n_init="auto")
    gathered = []
    for latent in stream:
        gathered.append(latent.reshape(1, -1))
        if len(gathered) == km_expand * ipc:
            model.partial_fit(np.vstack(gathered))
            gathered = []
    if len(gathered) >= ipc:
        model.partial_fit(np.vstack(gathered))
    return model.cluster_centers_


@pytest.mark.parametrize("ipc,km_expand", [(10, 1), (10, 10), (7, 3), (50, 1)])
def test_d4m_matches_its_code_on_a_fixed_seed(ipc, km_expand):
    points = blobs()
    stream = points[np.random.default_rng(0).permutation(len(points))]  # the shuffled loader's order
    expected = d4m_reference(stream, ipc, km_expand)
    got = d4m_quantize(points, ipc, km_expand, seed=0)
    np.testing.assert_allclose(got.centroids, expected, rtol=1e-5, atol=1e-5)
    assert got.distortion == pytest.approx(distortion(points, expected), rel=1e-5)  # sklearn's objective, per point
    assert got.counts.sum() == len(points) and got.k == ipc


def test_the_single_pass_sees_each_latent_at_most_once():
    batches = d4m_batches(105, 10, 1, seed=3)
    seen = np.concatenate(batches)
    assert len(seen) == len(set(seen)) == 100  # a leftover of 5 < K is dropped, as D4M does
    assert [len(b) for b in batches] == [10] * 10
    assert [len(b) for b in d4m_batches(25, 10, 2, seed=3)] == [20]
    assert [len(b) for b in d4m_batches(35, 10, 2, seed=3)] == [20, 15]  # a leftover of >= K is fitted
    assert [len(b) for b in d4m_batches(7, 5, 2, seed=3)] == [7]  # fewer than one batch: one partial_fit


def test_the_engines_quantizer_beats_d4ms_single_pass():
    """The claim the d4m baseline exists to test, on blobs: more Lloyd passes and k-means++ restarts give a lower
    k-means objective than one pass of mini-batches."""
    points = blobs(n=1300, dim=32, seed=1)
    for ipc in (10, 50):
        engine = quantize_class(points, ipc, QuantizeConfig())
        assert engine.distortion < d4m_quantize(points, ipc).distortion


def test_a_class_smaller_than_k_keeps_every_point():
    points = blobs(n=4)
    q = d4m_quantize(points, 10)
    assert q.k == 4 and q.requested_k == 10 and q.distortion == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(ValueError, match="empty"):
        d4m_quantize(points[:0], 3)
