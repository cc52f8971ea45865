import dataclasses

import numpy as np
import pytest
import torch

from engine.config import DataConfig, EvaluateConfig
from engine.data.images import load_split
from engine.evaluate import augment
from engine.evaluate.protocols import (IMAGENET, SYMMETRIC, EpochOrder, InputNorm, apply_plan, attach_input_norm,
                                       dataset_norm, get_protocol, input_norm_of, network_norm, plan_batch,
                                       student_norm, teacher_norm, weighted_ce_loss, weighted_kd_loss)
from engine.evaluate.students import create_student
from engine.evaluate.train import Targets, TrainSet, generate_soft_labels, student_recipe, train_student
from tests.training import to_float


@pytest.fixture(scope="module")
def small_set():
    train = load_split(DataConfig(), "train")
    chosen = np.concatenate([np.flatnonzero(train.labels == c)[:3] for c in range(10)])
    return TrainSet(train.images[chosen], train.labels[chosen], np.linspace(0.5, 1.5, len(chosen)))


def test_weights_change_every_protocols_loss_and_uniform_weights_do_not():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(6, 4), torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    ones, skewed = torch.ones(6), torch.tensor([3.0, 0.6, 0.6, 0.6, 0.6, 0.6])
    for loss in (lambda w: weighted_kd_loss(student, teacher, w, 4.0), lambda w: weighted_ce_loss(student, labels, w)):
        assert not torch.isclose(loss(skewed), loss(ones))
    assert torch.isclose(weighted_ce_loss(student, labels, ones), torch.nn.functional.cross_entropy(student, labels))
    assert weighted_kd_loss(teacher, teacher, skewed, 4.0).abs() < 1e-6  # identical logits: no loss


def test_weights_change_what_a_student_learns(small_set):
    config = EvaluateConfig(width=8, batch_size=16, protocol="hard")
    uniform = TrainSet(small_set.images, small_set.labels, np.ones(len(small_set.labels)))
    a = train_student(uniform, Targets(), 10, "convnet3", 3, student_recipe(config, seed=0))
    b = train_student(small_set, Targets(), 10, "convnet3", 3, student_recipe(config, seed=0))
    assert not torch.allclose(a.classifier.weight, b.classifier.weight)


def test_cutmix_mixes_pixels_and_weights_with_the_same_lambda():
    x = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(4)])
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    generator = torch.Generator().manual_seed(3)
    plan = plan_batch(get_protocol("rded"), generator, torch.tensor([2, 0, 3, 1]), 8, flip=False, cutmix=True)
    plan["affine"] = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]]).repeat(4, 1)  # identity crop: isolate CutMix
    mixed, w = apply_plan(x, weights, plan)
    lam = augment.cutmix_lambda(plan["box"], 8)
    source = plan["index"]
    for i in range(4):
        own = (mixed[i] == x[source[i], 0, 0, 0]).float().mean()
        assert torch.isclose(own, torch.tensor(lam)) or source[i] == source[plan["perm"][i]]
        expected = lam * weights[source[i]] + (1 - lam) * weights[source[plan["perm"][i]]]
        assert torch.isclose(w[i], expected)


def test_fkd_replay_gives_the_generated_crops_and_logits(small_set, tmp_path, monkeypatch):
    import engine.evaluate.train

    # 4 steps: two chunk files, read one at a time
    monkeypatch.setattr(engine.evaluate.train, "SOFT_LABEL_CHUNK_STEPS", 3)
    config = EvaluateConfig(width=8, batch_size=16, protocol="fkd", flip=True)
    teacher = create_student("convnet3", 10, 16, 8).eval()
    stored = generate_soft_labels(small_set, teacher, 2, config, seed=5, folder=tmp_path / "labels")
    assert stored.steps == 2 * 2  # 30 images, batch 16: 2 steps per epoch
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == [
        "chunk-00000.safetensors", "chunk-00001.safetensors", "steps.json"]
    assert stored.logits(0).dtype == torch.float16  # half the bytes: FKD's own storage trick
    images, weights = to_float(small_set.images), torch.as_tensor(small_set.weights, dtype=torch.float32)
    seen = []

    def replayed_batches(logits, x, y, w, step, mine):
        seen.append((step, x.detach()))
        return weighted_kd_loss(logits, stored.logits(step)[mine].float(), w, config.temperature)

    from engine.evaluate.train import Recipe, fit

    fit(create_student("convnet3", 10, 16, 8), small_set, stored.steps, Recipe(get_protocol("fkd"), config, 5),
        replayed_batches)
    generator = torch.Generator().manual_seed(5)  # the student redraws the plans the labels were made on
    order = EpochOrder(5, len(images), 16)
    for step, x in seen:
        plan = plan_batch(get_protocol("fkd"), generator, order.rows(step), 16, True, True)
        torch.testing.assert_close(plan["index"], stored.index(step))
        crops, _ = apply_plan(images, weights, plan)
        torch.testing.assert_close(x, crops)  # the student trained on exactly the labelled crops ...
        with torch.no_grad():  # ... whose stored logits are the teacher's (to fp16 precision)
            torch.testing.assert_close(teacher(x).half(), stored.logits(step), atol=2e-3, rtol=2e-3)
    # and the student run itself needs no teacher
    train_student(small_set, Targets(soft_labels=stored), 10, "convnet3", 2, student_recipe(config, seed=5))
    with pytest.raises(ValueError, match="stored soft labels"):
        train_student(small_set, Targets(), 10, "convnet3", 2, student_recipe(config, seed=5))


def test_a_workers_own_rows_augment_as_the_whole_batch_does():
    """Data parallelism: rank r augments only rows r::world (and the rows its CutMix pastes from), and gets exactly
    those rows of the whole batch augmented at once; uint8 sets give the same batch as their float version."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)
    weights = torch.linspace(0.5, 1.5, 12)
    index = torch.tensor([3, 11, 0, 7, 7, 5, 2, 9])
    for name, norm in (("rded", None), ("hard", None), ("hard", KNOWN)):
        for seed in range(8):  # hard: several of DSA's groups
            plan = plan_batch(get_protocol(name), torch.Generator().manual_seed(seed), index, 8, True, True)
            whole, w_whole = apply_plan(images, weights, plan, norm=norm)
            as_float, _ = apply_plan(images.float() / 127.5 - 1.0, weights, plan, norm=norm)
            torch.testing.assert_close(whole, as_float)
            for rank in range(3):
                mine = slice(rank, None, 3)
                part, w_part = apply_plan(images, weights, plan, rows=mine, norm=norm)
                torch.testing.assert_close(part, whole[mine])
                torch.testing.assert_close(w_part, w_whole[mine])


def test_hard_label_protocol_ignores_the_teacher(small_set):
    config = EvaluateConfig(width=8, batch_size=16, protocol="hard")
    without = train_student(small_set, Targets(), 10, "convnet3", 2, student_recipe(config, seed=0))
    teacher = create_student("convnet3", 10, 16, 8)
    with_teacher = train_student(small_set, Targets(teacher), 10, "convnet3", 2, student_recipe(config, seed=0))
    for a, b in zip(without.state_dict().values(), with_teacher.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="needs a teacher"):
        train_student(small_set, Targets(), 10, "convnet3", 1, student_recipe(EvaluateConfig(width=8, protocol="rded"),
                                                                            seed=0))


def test_dsa_and_crop_plans_are_seeded_and_change_images():
    x = torch.randn(6, 3, 16, 16)
    for name in ("rded", "hard"):
        plans = [plan_batch(get_protocol(name), torch.Generator().manual_seed(0), torch.arange(6), 16, True, True)
                 for _ in range(2)]
        a, _ = apply_plan(x, torch.ones(6), plans[0])
        b, _ = apply_plan(x, torch.ones(6), plans[1])
        torch.testing.assert_close(a, b)
        assert a.shape == x.shape and not torch.allclose(a, x[plans[0]["index"]])


KNOWN = InputNorm((0.1, 0.3, 0.7), (0.2, 0.4, 0.3))  # no real model's: an input at any other scale shows


def _first_conv_input(model: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    """What the first convolution of `model` receives when it is fed `images` as every caller feeds it."""
    from engine.evaluate.train import model_input

    seen = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    hook = conv.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        model.eval()(model_input(images, "cpu"))
    hook.remove()
    return seen[0]


def _normalized(images: np.ndarray, norm: InputNorm) -> torch.Tensor:
    x = torch.tensor(images, dtype=torch.float64).permute(0, 3, 1, 2) / 255
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (norm.mean, norm.std))
    return ((x - mean) / std).float()


@pytest.fixture(scope="module")
def pictures():
    return np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)


def test_a_timm_resnet18_with_a_known_pretrained_cfg_receives_inputs_at_its_scale(tmp_path, pictures):
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=10,
                              pretrained_cfg_overlay={"mean": KNOWN.mean, "std": KNOWN.std})
    config = EvaluateConfig(teacher="resnet18", teacher_path=str(tmp_path / "resnet18.safetensors"),
                            input_norm="symmetric")
    assert teacher_norm(config, 64, model) == KNOWN
    bare = set(model.state_dict())
    attach_input_norm(model, teacher_norm(config, 64, model))
    torch.testing.assert_close(_first_conv_input(model, pictures), _normalized(pictures, KNOWN), atol=1e-5, rtol=0)
    assert set(model.state_dict()) == bare  # checkpoints and saved teachers hold the architecture alone
    with pytest.raises(ValueError, match="already has an input scale"):
        attach_input_norm(model, IMAGENET)


def test_load_teacher_scales_a_given_timm_teacher_as_its_weights_were_trained(tmp_path, pictures):
    """The same saved ResNet-18 weights: given as evaluate.teacher_path they read timm's ImageNet mean/std; with
    teacher_mean/std those; trained by the engine (no teacher_path) the students' scale, here [-1, 1]."""
    from safetensors.torch import save_file

    from engine.evaluate.train import load_teacher

    path = tmp_path / "resnet18.safetensors"
    save_file(create_student("resnet18", 10, 64).state_dict(), str(path))
    students = EvaluateConfig(teacher="resnet18", input_norm="symmetric")
    cases = {"given": (dataclasses.replace(students, teacher_path=str(path)), IMAGENET),
             "given with mean/std": (dataclasses.replace(students, teacher_path=str(path), teacher_mean=KNOWN.mean,
                                                         teacher_std=KNOWN.std), KNOWN),
             "trained here": (students, SYMMETRIC)}
    for name, (config, expected) in cases.items():
        teacher = load_teacher(path, "resnet18", 10, 64, 8, "cpu", config)
        assert input_norm_of(teacher) == expected, name
        torch.testing.assert_close(_first_conv_input(teacher, pictures), _normalized(pictures, expected),
                                   atol=1e-5, rtol=0, msg=name)


def test_students_take_their_protocols_reference_scale_and_a_trained_teacher_keeps_the_small_sets(pictures):
    """auto: hard students read the data's own mean/std (DC/DSA), rded and fkd students ImageNet's at every size
    (RDED, SRe2L); a teacher the engine trains keeps [-1, 1] below 64 px and ImageNet's above."""
    from engine.evaluate.train import Worker, new_model

    data = dataset_norm(pictures)
    for protocol in ("rded", "fkd"):
        assert student_norm(EvaluateConfig(protocol=protocol), 16) == IMAGENET
    assert student_norm(EvaluateConfig(protocol="hard"), 16, data) == data
    with pytest.raises(ValueError, match="data's mean/std"):
        student_norm(EvaluateConfig(protocol="hard"), 16)
    assert student_norm(EvaluateConfig(input_norm="symmetric", protocol="hard"), 224, data) == SYMMETRIC
    assert student_norm(EvaluateConfig(input_norm="dataset"), 224, data) == data
    auto = EvaluateConfig()
    assert network_norm(auto, 16) == SYMMETRIC and network_norm(auto, 28) == SYMMETRIC
    assert network_norm(auto, 224) == IMAGENET and network_norm(auto, 64) == IMAGENET
    small = new_model("convnet3", 10, 16, 8, Worker(), network_norm(auto, 16))
    assert not hasattr(small, "input_rescale")  # a small teacher is exactly as before: nothing added
    student = new_model("convnet3", 10, 64, 8, Worker(), student_norm(EvaluateConfig(protocol="hard"), 64, data))
    torch.testing.assert_close(_first_conv_input(student, pictures), _normalized(pictures, data), atol=1e-4, rtol=0)
    pixels = pictures.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(data.mean, pixels.mean(0)) and np.testing.assert_allclose(data.std, pixels.std(0))


def test_one_augmented_batch_reaches_student_and_online_teacher_each_at_its_scale(small_set):
    """rded: the teacher labels the very batch the student trains on; each network rescales it itself."""
    from engine.evaluate.train import student_loss

    teacher = attach_input_norm(create_student("convnet3", 10, 16, 8), KNOWN).eval()
    seen = []
    teacher.features[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    config = EvaluateConfig(width=8, batch_size=8)
    loss_fn = student_loss(get_protocol("rded"), teacher, config)
    x = to_float(small_set.images[:4])  # [-1, 1], as apply_plan gives it
    loss_fn(torch.zeros(4, 10), x, torch.zeros(4, dtype=torch.int64), torch.ones(4), 0, slice(None))
    torch.testing.assert_close(seen[0], _normalized(small_set.images[:4], KNOWN), atol=1e-5, rtol=0)


def test_epochs_are_passes_over_a_fresh_permutation_with_the_remainder_last():
    from engine.evaluate.protocols import LAST_BATCH_MIN, pass_bounds

    order = EpochOrder(seed=3, n=30, batch=16)
    assert order.steps_per_epoch == 2
    for epoch in range(3):
        rows = [order.rows(epoch * 2 + position) for position in range(2)]
        assert [len(r) for r in rows] == [16, 14]
        assert sorted(torch.cat(rows).tolist()) == list(range(30))  # each row once per epoch
    assert not torch.equal(order.rows(0), EpochOrder(seed=3, n=30, batch=16).rows(2))  # a new order each epoch
    assert torch.equal(order.rows(5), EpochOrder(seed=3, n=30, batch=16).rows(5))  # stateless: a resume agrees
    assert pass_bounds(100, 256) == [0, 100]  # DC's IPC 10 x 10 classes: the whole set, one batch per epoch
    assert pass_bounds(20 + LAST_BATCH_MIN - 1, 10) == [0, 10, 20 + LAST_BATCH_MIN - 1]  # a tiny tail joins
    assert pass_bounds(20 + LAST_BATCH_MIN, 10) == [0, 10, 20, 20 + LAST_BATCH_MIN]


def test_student_batches_are_the_references_unless_the_config_says_otherwise():
    from engine.evaluate.protocols import student_batch_size

    rded = EvaluateConfig(protocol="rded")
    assert [student_batch_size(rded, ipc, 10) for ipc in (1, 10, 50)] == [10, 50, 100]
    assert [student_batch_size(rded, ipc, 1000) for ipc in (1, 10, 50)] == [20, 100, 200]
    assert student_batch_size(EvaluateConfig(protocol="hard"), 10, 10) == 256
    assert student_batch_size(EvaluateConfig(protocol="fkd"), 10, 1000) == 1024
    assert student_batch_size(EvaluateConfig(protocol="hard", student_batch_size=64), 10, 10) == 64
    assert student_batch_size(EvaluateConfig(student_batch_size=64, batch_size_by_ipc={10: 7}), 10, 10) == 7


def test_optimizers_and_schedules_are_the_references():
    from engine.evaluate.protocols import make_optimizer

    model = create_student("convnet3", 10, 16, 8)
    optimizer, schedule = make_optimizer(get_protocol("rded"), model, steps=100)
    decayed, plain = optimizer.param_groups
    assert all(p.ndim > 1 for p in decayed["params"]) and decayed["weight_decay"] == 0.01
    assert all(p.ndim <= 1 for p in plain["params"]) and plain["weight_decay"] == 0.0 and plain["params"]
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == 1e-3 and abs(optimizer.param_groups[0]["lr"] - 0.5e-3) < 1e-9  # RDED's ends at half
    optimizer, schedule = make_optimizer(get_protocol("fkd"), model, steps=10)
    for _ in range(10):
        optimizer.step()
        schedule.step()
    assert optimizer.param_groups[0]["lr"] < 1e-9  # SRe2L's cosine ends at 0
    sgd, _ = make_optimizer(get_protocol("hard"), model, steps=10)
    assert sgd.param_groups[0]["weight_decay"] == 5e-4 and sgd.param_groups[0]["momentum"] == 0.9


def test_the_kd_loss_is_the_batch_mean_kl_without_a_t_squared_factor():
    torch.manual_seed(1)
    student, teacher, temperature = torch.randn(5, 7), torch.randn(5, 7), 20.0
    expected = torch.nn.KLDivLoss(reduction="batchmean")(torch.log_softmax(student / temperature, 1),
                                                         torch.softmax(teacher / temperature, 1))
    torch.testing.assert_close(weighted_kd_loss(student, teacher, torch.ones(5), temperature), expected)


def test_rded_crops_the_whole_image_below_128_px_and_half_its_area_above_as_rded_does():
    from engine.evaluate.protocols import crop_min_area

    rded, fkd = get_protocol("rded"), get_protocol("fkd")
    assert crop_min_area(rded, 32) == 1.0 and crop_min_area(rded, 224) == 0.5 and crop_min_area(fkd, 32) == 0.08
    plan = plan_batch(rded, torch.Generator().manual_seed(0), torch.arange(64), 32, flip=True, cutmix=False)
    affine = plan["affine"]
    assert torch.equal(affine[:, 0].abs(), torch.ones(64))  # whole image: scale 1, no shift, no rotation
    assert torch.equal(affine[:, 1:], torch.tensor([[1.0, 0, 0, 0]]).repeat(64, 1))
    assert (affine[:, 0] < 0).any()  # flips stay
