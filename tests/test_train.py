import numpy as np
import pytest
import torch

from engine.baselines import select_random
from engine.config import DataConfig, EvaluateConfig
from engine.data import load_split
from engine.students import create_student
from engine.train import TrainSet, augment, evaluate_top1, train_student, train_teacher, weighted_kd_loss

FAST = EvaluateConfig(width=16, teacher_epochs=2, batch_size=64)


def test_convnet_shapes_and_bad_sizes():
    model = create_student("convnet3", 10, 16, width=8)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="too small"):
        create_student("convnet3", 10, 4)
    with pytest.raises(NotImplementedError, match="timm"):
        create_student("resnet18", 10, 32)


def test_weights_change_the_loss_and_uniform_weights_do_not():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 4), torch.randn(6, 4)
    ones = torch.ones(6)
    plain = weighted_kd_loss(student, teacher, ones, 4.0)
    skewed = torch.tensor([3.0, 0.6, 0.6, 0.6, 0.6, 0.6])
    assert not torch.isclose(weighted_kd_loss(student, teacher, skewed, 4.0), plain)
    assert weighted_kd_loss(teacher, teacher, skewed, 4.0).abs() < 1e-6  # identical logits: no loss
    assert plain > 0


def test_augment_keeps_shape_and_is_seeded():
    x = torch.randn(5, 3, 16, 16)
    a = augment(x, torch.Generator().manual_seed(0), flip=True)
    assert a.shape == x.shape
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(0), flip=True))
    assert not torch.equal(a, x)


def test_select_random_takes_ipc_per_class_seeded():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 1)
    chosen = select_random(labels, 2, seed=0)
    assert np.bincount(labels[chosen]).tolist() == [2, 2, 1]
    np.testing.assert_array_equal(chosen, select_random(labels, 2, seed=0))


def test_teacher_learns_digits_and_student_learns_from_it():
    train, test = load_split(DataConfig(), "train"), load_split(DataConfig(), "test")
    teacher = train_teacher(TrainSet(train.images, train.labels, np.ones(len(train))), 10, FAST, seed=0)
    teacher_top1 = evaluate_top1(teacher, test.images, test.labels)
    assert teacher_top1 > 0.5  # chance is 0.1
    chosen = select_random(train.labels, 10, seed=0)
    small = TrainSet(train.images[chosen], train.labels[chosen], np.ones(len(chosen)))
    student = train_student(small, teacher, 10, steps=60, config=FAST, seed=0)
    assert evaluate_top1(student, test.images, test.labels) > 0.3
