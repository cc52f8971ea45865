"""engine/evaluate/quality.py on known cases: identical sets, shifted and disjoint clusters, and a real teacher."""

import numpy as np
import pytest
import torch

from engine.evaluate.quality import frechet_distance, knn_radii, precision_recall, set_quality, teacher_outputs


def gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_frechet_distance_of_identical_and_shifted_sets():
    a = gaussian(500, 8, 0)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # Same covariance, means 3 apart in each of 8 dimensions: the distance is ||mu_a - mu_b||^2 = 72.
    assert frechet_distance(a, a + 3.0) == pytest.approx(72.0, rel=1e-6)
    # Two independent samples of one Gaussian: small against the shift, and symmetric.
    b = gaussian(500, 8, 1)
    assert frechet_distance(a, b) < 0.5 and frechet_distance(a, b) == pytest.approx(frechet_distance(b, a))
    # a against 2a: means m and 2m, covariances S and 4S: ||m||^2 + tr(S + 4S - 2 * 2S) = ||m||^2 + tr(S).
    mean, cov = a.mean(0), np.cov(a, rowvar=False)
    assert frechet_distance(a, 2 * a) == pytest.approx(mean @ mean + np.trace(cov), rel=1e-9)
    with pytest.raises(ValueError, match="one dimension"):
        frechet_distance(a, gaussian(10, 4, 0))


def test_frechet_distance_with_fewer_points_than_dimensions_is_finite():
    assert np.isfinite(frechet_distance(gaussian(5, 64, 0), gaussian(300, 64, 1)))


def test_precision_and_recall_on_identical_overlapping_and_disjoint_sets():
    real = gaussian(400, 4, 0)
    assert precision_recall(real, real) == (1.0, 1.0)
    far = gaussian(400, 4, 1, shift=50.0)
    assert precision_recall(real, far) == (0.0, 0.0)
    # A generator covering only half of the real modes: realistic (precision ~1), but recall ~1/2.
    modes = np.concatenate([gaussian(200, 4, 2, shift=0.0), gaussian(200, 4, 3, shift=30.0)])
    collapsed = gaussian(200, 4, 4, shift=0.0)
    precision, recall = precision_recall(modes, collapsed)
    assert precision > 0.9 and 0.4 < recall < 0.6


def test_knn_radii_exclude_the_point_itself_and_work_in_chunks():
    points = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(points, k=1).tolist() == [1.0, 1.0, 2.0, 4.0]
    many = torch.as_tensor(gaussian(300, 3, 0), dtype=torch.float32)
    assert torch.allclose(knn_radii(many, 3, chunk=7), knn_radii(many, 3, chunk=1000))
    with pytest.raises(ValueError, match="more than 3 points"):
        knn_radii(points[:3], k=3)


def test_set_quality_with_a_trained_teacher_tells_real_digits_from_noise():
    from engine.config import DataConfig, EvaluateConfig
    from engine.data.images import load_split
    from engine.evaluate.train import TrainSet
    from tests.training import train_teacher

    data = DataConfig()
    train, val = load_split(data, "train"), load_split(data, "val")
    teacher = train_teacher(TrainSet(train.images, train.labels, np.ones(len(train))), 10, "convnet3",
                            EvaluateConfig(width=16, teacher_epochs=8, batch_size=64), seed=0)
    real_features, _ = teacher_outputs(teacher, val.images)
    real = set_quality(teacher, train.images[:300], train.labels[:300], real_features)
    noise = np.random.default_rng(0).integers(0, 256, (300, 16, 16, 3), dtype=np.uint8)
    fake = set_quality(teacher, noise, train.labels[:300], real_features)
    assert real["class_agreement"] > 0.8 and fake["class_agreement"] < 0.3
    assert real["frechet_distance"] < fake["frechet_distance"] / 3
    assert real["precision"] > 0.7 and fake["precision"] < 0.1 and real["recall"] > fake["recall"]
    tiny = set_quality(teacher, train.images[:2], train.labels[:2], real_features)
    assert tiny["precision"] is None and tiny["frechet_distance"] is not None


def test_a_validation_split_of_one_image_gives_no_distances_instead_of_failing():
    from engine.evaluate.quality import quality_of_features

    rng = np.random.default_rng(0)
    quality = quality_of_features(rng.normal(size=(6, 4)), np.zeros(6, int), np.zeros(6, int), rng.normal(size=(1, 4)))
    assert quality["frechet_distance"] is None and quality["precision"] is None and quality["class_agreement"] == 1.0


@pytest.mark.parametrize("name", ["convnet3", "resnet18"])
def test_features_are_taken_at_the_networks_input_scale_and_channels(name):
    """The penultimate features enter the network past its forward hook, so they must see the batch as the
    forward does: rescaled, and one channel for a one-channel network (a grey source's teacher)."""
    from engine.evaluate.protocols import IMAGENET, attach_input_norm, for_channels
    from engine.evaluate.quality import penultimate
    from engine.evaluate.students import create_student

    torch.manual_seed(0)
    model = attach_input_norm(create_student(name, 10, 16, width=8, channels=1), for_channels(IMAGENET, 1)).eval()
    grey = torch.rand(3, 1, 16, 16).repeat(1, 3, 1, 1) * 2 - 1
    with torch.no_grad():
        features = penultimate(model, grey)
        head = model.classifier if name == "convnet3" else model.get_classifier()
        torch.testing.assert_close(head(features), model(grey))  # the same features the forward classifies
