import time

import numpy as np
import pytest
import torch

from engine.config import DataConfig, EvaluateConfig
from engine.data.images import load_split
from engine.evaluate.protocols import get_protocol
from engine.evaluate.students import create_student
from engine.quantize.baselines import select_herding, select_kcenter, select_random
from engine.evaluate.train import (Recipe, Reporting, Stream, Targets, TrainSet, Worker, evaluate_top1, fit, student_recipe,
                          train_student)
from tests.training import train_teacher

FAST = EvaluateConfig(width=16, teacher_epochs=2, batch_size=64)


def test_convnet_shapes_and_bad_sizes():
    model = create_student("convnet3", 10, 16, width=8)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="too small"):
        create_student("convnet3", 10, 4)
    with pytest.raises(ValueError, match="unknown student"):
        create_student("resnet_does_not_exist", 10, 32)


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2_100", "efficientnet_b0", "swin_tiny_patch4_window7_224"])
def test_timm_students_take_small_images_without_collapsing_them(name):
    model = create_student(name, 10, 28)
    assert model(torch.zeros(2, 3, 28, 28)).shape == (2, 10)
    if name == "resnet18":  # CIFAR-style stem: the first stage sees the full 28x28 grid
        features = model.forward_features(torch.zeros(1, 3, 28, 28))
        assert features.shape[-1] == 4  # 28 -> 14 -> 7 -> 4 over three stride-2 stages (ImageNet stem: 1)


def test_select_random_takes_ipc_per_class_seeded():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 1)
    chosen = select_random(labels, 2, seed=0)
    assert np.bincount(labels[chosen]).tolist() == [2, 2, 1]
    np.testing.assert_array_equal(chosen, select_random(labels, 2, seed=0))


def test_herding_tracks_the_mean_and_kcenter_covers_the_spread():
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(0, 1, (95, 4)), rng.normal(20, 1, (5, 4))])  # a small far-away cluster
    herd = select_herding(points, 5)
    assert len(set(herd.tolist())) == 5
    # herding's running mean approaches the class mean faster than random picks do
    random_gap = np.mean([np.linalg.norm(points[rng.choice(100, 5, replace=False)].mean(0) - points.mean(0))
                          for _ in range(50)])
    assert np.linalg.norm(points[herd].mean(0) - points.mean(0)) < 0.5 * random_gap
    center = select_kcenter(points, 2)
    assert center[1] >= 95  # the second center is in the far cluster
    assert sorted(select_kcenter(np.zeros((3, 2)), 5).tolist()) == [0, 1, 2]  # duplicates, k > n: no repeats
    with pytest.raises(ValueError, match="NaN"):
        select_herding(np.full((3, 2), np.nan), 1)


def test_teacher_learns_digits_and_student_learns_from_it():
    train, test = load_split(DataConfig(), "train"), load_split(DataConfig(), "test")
    teacher = train_teacher(TrainSet(train.images, train.labels, np.ones(len(train))), 10, "convnet3", FAST, seed=0)
    assert evaluate_top1(teacher, test.images, test.labels) > 0.5  # chance is 0.1
    chosen = select_random(train.labels, 10, seed=0)
    small = TrainSet(train.images[chosen], train.labels[chosen], np.ones(len(chosen)))
    reported = []
    student = train_student(small, Targets(teacher), 10, "convnet3", 30, student_recipe(FAST, seed=0),
                            reporting=Reporting(lambda step, model: reported.append(step), reports=3))
    assert evaluate_top1(student, test.images, test.labels) > 0.3
    assert reported == [20, 40, 60]  # 100 images, batch 64: 2 steps per epoch, 30 epochs


def _digits_set(n_per_class=3):
    train = load_split(DataConfig(), "train")
    chosen = select_random(train.labels, n_per_class, seed=0)
    return TrainSet(train.images[chosen], train.labels[chosen], np.ones(len(chosen)))


def test_a_killed_student_resumes_from_its_checkpoint_exactly(tmp_path):
    data, config = _digits_set(), EvaluateConfig(width=8, batch_size=16)
    teacher = create_student("convnet3", 10, 16, 8).eval()
    recipe = student_recipe(config, seed=1)
    straight = train_student(data, Targets(teacher), 10, "convnet3", 4, recipe, reporting=Reporting(reports=2))

    checkpoint = tmp_path / "job.pt"

    def die_after_first_report(step, model):
        raise KeyboardInterrupt  # the process dies right after its first checkpoint

    with pytest.raises(KeyboardInterrupt):
        train_student(data, Targets(teacher), 10, "convnet3", 4, recipe,
                      reporting=Reporting(die_after_first_report, reports=2, checkpoint=checkpoint))
    assert checkpoint.exists()
    resumed = train_student(data, Targets(teacher), 10, "convnet3", 4, recipe,
                            reporting=Reporting(reports=2, checkpoint=checkpoint))
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_data_parallel_workers_split_one_global_batch():
    """Every worker draws the same global batch and trains on its rows rank::world: the two shards of a 2-worker
    run are exactly the rows of the 1-worker run's batch (so DDP's averaged gradient is the global batch's)."""
    data, config = _digits_set(), EvaluateConfig(width=8, batch_size=16, protocol="hard")
    seen = {}
    for rank, world in [(0, 1), (0, 2), (1, 2)]:
        rows = []

        def loss_fn(logits, x, y, w, step, mine, rows=rows):
            rows.append(x.detach().clone())
            return logits.sum() * 0

        model = create_student("convnet3", 10, 16, 8)
        fit(model, data, 2, Recipe(get_protocol("hard"), config, seed=0), loss_fn=loss_fn, worker=Worker(rank, world))
        seen[(rank, world)] = rows
    for step, size in enumerate((16, 14)):  # one pass over 30 images: a batch of 16, then the remaining 14
        whole = seen[(0, 1)][step]
        assert len(whole) == size and len(seen[(0, 2)][step]) == size // 2
        torch.testing.assert_close(whole[0::2], seen[(0, 2)][step])
        torch.testing.assert_close(whole[1::2], seen[(1, 2)][step])


def _shuffled_epochs(images, labels, batch, seed):
    """What Ray Data gives one worker: its rows once per epoch, reshuffled each epoch, as uint8 batches."""
    def epoch_batches(epoch):
        order = np.random.default_rng(seed * 1000 + epoch).permutation(len(labels))
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            yield {"image": torch.from_numpy(images[rows]), "label": torch.from_numpy(labels[rows])}
    return epoch_batches


def test_streamed_training_learns_as_well_as_in_memory_training():
    """fit_stream (each row once per epoch, from a stream) and fit (batches sampled from memory) draw different
    batches, so they are compared by what they learn: the same teacher recipe and steps, top-1 on the held-out
    digits within 8 points of each other. Measured over seeds 0-2: in memory 81.1-87.5 %, streamed 81.7-88.1 %,
    at most 2.8 points apart for a seed, while the seeds of one loop spread 6.4 points."""
    from engine.evaluate.train import fit_stream, new_model, stream_steps, teacher_loss, teacher_recipe

    train, test = load_split(DataConfig(val_fraction=0), "train"), load_split(DataConfig(val_fraction=0), "test")
    config = EvaluateConfig(width=16, teacher_epochs=4, batch_size=64)
    memory = train_teacher(TrainSet(train.images, train.labels, np.ones(len(train))), 10, "convnet3", config, seed=0)
    torch.manual_seed(0)
    model = new_model("convnet3", 10, 16, config.width, Worker())
    steps, local = stream_steps(len(train), config.batch_size, 1)
    assert (steps, local) == (23, 64)  # 1437 rows: 22 full batches and a partial one per epoch
    reported = []
    streamed = fit_stream(model, Stream(_shuffled_epochs(train.images, train.labels, local, 0), len(train), 4),
                          teacher_recipe(config), teacher_loss,
                          reporting=Reporting(lambda step, m: reported.append(step), reports=2))
    assert reported == [46, 92]
    a, b = (evaluate_top1(m, test.images, test.labels) for m in (memory, streamed))
    assert a > 0.7 and b > 0.7 and abs(a - b) < 0.08, (a, b)


def test_streamed_training_resumes_from_its_last_epoch_checkpoint(tmp_path):
    """Killed after epoch 2 of 4, a streamed job resumes at epoch 2 and ends with the weights of an unbroken run."""
    from engine.evaluate.train import fit_stream, new_model, teacher_loss, teacher_recipe

    train = load_split(DataConfig(), "train")
    keep = np.arange(0, len(train), 4)
    images, labels = train.images[keep], train.labels[keep]
    config = EvaluateConfig(width=8, batch_size=64)
    def run(epochs_done_before_kill=None, checkpoint=None):
        torch.manual_seed(0)
        model = new_model("convnet3", 10, 16, 8, Worker())

        def report(step, m):
            if epochs_done_before_kill and step == epochs_done_before_kill * 6:
                raise KeyboardInterrupt  # the kill, right after the epoch-2 checkpoint
        return fit_stream(model, Stream(_shuffled_epochs(images, labels, 64, 0), len(labels), 4),
                          teacher_recipe(config), teacher_loss,
                          reporting=Reporting(report, reports=2, checkpoint=checkpoint))

    unbroken = run()
    checkpoint = tmp_path / "job.pt"
    with pytest.raises(KeyboardInterrupt):
        run(epochs_done_before_kill=2, checkpoint=checkpoint)
    assert checkpoint.exists()
    resumed = run(checkpoint=checkpoint)
    for x, y in zip(unbroken.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_every_module_and_batch_is_on_the_workers_device(device, tmp_path):
    """With a teacher loaded from disk, the student, the teacher and every batch they see (set and stream, training
    and held-out scoring) are on the device the worker was given."""
    from safetensors.torch import save_file

    from engine.evaluate.train import count_correct, fit_stream, load_teacher, new_model, student_loss

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    save_file(create_student("convnet3", 10, 16, 8).state_dict(), tmp_path / "teacher.safetensors")
    teacher = load_teacher(tmp_path / "teacher.safetensors", "convnet3", 10, 16, 8, device)
    seen = []

    def record(module, inputs):
        seen.append((type(module).__name__, inputs[0].device.type, next(module.parameters()).device.type))

    worker = Worker(device=device)
    config = EvaluateConfig(width=8, batch_size=16, protocol="rded")
    data = _digits_set()
    handles = [teacher.register_forward_pre_hook(record)]
    original = new_model

    def hooked_model(*args, **kwargs):
        model = original(*args, **kwargs)
        handles.append(model.register_forward_pre_hook(record))
        return model

    import engine.evaluate.train

    engine.evaluate.train.new_model = hooked_model
    try:
        student = train_student(data, Targets(teacher), 10, "convnet3", 2, student_recipe(config, seed=0),
                                worker=worker)
        streamed = fit_stream(hooked_model("convnet3", 10, 16, 8, worker),
                              Stream(_shuffled_epochs(data.images, data.labels, 8, 0), len(data.labels), 1),
                              Recipe(get_protocol("rded"), config, 0),
                              student_loss(get_protocol("rded"), teacher, config), worker)
        for model in (student, streamed, teacher):
            count_correct(model, [(torch.from_numpy(data.images), torch.from_numpy(data.labels))])
    finally:
        engine.evaluate.train.new_model = original
        for handle in handles:
            handle.remove()
    assert {name for name, _, _ in seen} == {"ConvNet"} and len(seen) > 10
    assert {(d_in, d_param) for _, d_in, d_param in seen} == {(device, device)}


def test_timed_epochs_records_every_epoch_and_the_steady_rate_skips_the_first():
    from engine.evaluate.train import steady_images_per_s, timed_epochs

    def batches(epoch):
        if epoch == 0:
            time.sleep(0.05)  # the stream's start-up, paid in the first epoch
        yield {"epoch": epoch}

    seconds = []
    timed = timed_epochs(batches, seconds)
    assert [list(timed(e)) for e in range(3)] == [[{"epoch": 0}], [{"epoch": 1}], [{"epoch": 2}]]
    assert len(seconds) == 3 and seconds[0] >= 0.05 > max(seconds[1:])
    assert steady_images_per_s(100, [5.0, 2.0, 2.0]) == 50.0  # 2 epochs x 100 rows in 4 s
    assert steady_images_per_s(100, [5.0]) is None


def test_a_teacher_trained_here_is_loaded_back_at_the_scale_it_trained_at(tmp_path):
    """At 64 px the engine trains its teacher on ImageNet mean/std (the default input_norm); load_teacher, called
    without a config as the set-quality judge calls it, reads the saved weights at that same scale: same logits."""
    from safetensors.torch import save_file

    from engine.evaluate.protocols import IMAGENET, input_norm_of, teacher_norm
    from engine.evaluate.train import load_teacher, model_input, new_model

    torch.manual_seed(0)
    trained = new_model("convnet3", 10, 64, 8, Worker(), teacher_norm(EvaluateConfig(), 64)).eval()
    save_file(trained.state_dict(), str(tmp_path / "teacher.safetensors"))
    loaded = load_teacher(tmp_path / "teacher.safetensors", "convnet3", 10, 64, 8, "cpu")
    assert input_norm_of(trained) == input_norm_of(loaded) == IMAGENET
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(model_input(images, "cpu")), trained(model_input(images, "cpu")))
        # Read at [-1, 1] instead, the same weights give other logits: the scale is really applied.
        bare = create_student("convnet3", 10, 64, 8).eval()
        bare.load_state_dict(trained.state_dict())
        assert not torch.allclose(bare(model_input(images, "cpu")), trained(model_input(images, "cpu")), atol=1e-3)


def test_a_pass_whose_smallest_batch_cannot_feed_every_worker_is_refused():
    data = _digits_set()  # 30 images: with batch 16 a pass is 16 + 14 rows
    config = EvaluateConfig(width=8, batch_size=16, protocol="hard")
    with pytest.raises(ValueError, match="a batch of 14 .* over 15 workers"):
        fit(create_student("convnet3", 10, 16, 8), data, 1, Recipe(get_protocol("hard"), config, seed=0),
            loss_fn=lambda *a: None, worker=Worker(0, 15))


@pytest.mark.parametrize("name", ["convnet3", "resnet18"])
def test_one_channel_networks_read_the_first_of_a_grey_batchs_channels(name):
    """evaluate.channels=1: the network's first convolution takes one channel, and the input hook hands it the
    first channel of the (B, 3, H, W) batches every caller feeds; on grey images that is the picture itself."""
    from engine.evaluate.protocols import attach_input_norm, dataset_norm, for_channels

    grey = np.repeat(np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8), 3, axis=3)
    norm = for_channels(dataset_norm(grey), 1)
    assert len(norm.mean) == 1 and norm.mean[0] == pytest.approx(grey.mean() / 255)
    torch.manual_seed(0)
    model = attach_input_norm(create_student(name, 10, 28, width=8, channels=1), norm).eval()
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 1
    batch = torch.from_numpy(grey).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model(batch[:, :1]))  # the hook keeps the first channel


def test_a_one_channel_student_learns_grey_digits():
    from engine.evaluate.train import student_recipe

    train, test = load_split(DataConfig(), "train"), load_split(DataConfig(), "test")
    chosen = select_random(train.labels, 10, seed=0)
    small = TrainSet(train.images[chosen], train.labels[chosen], np.ones(len(chosen)))
    config = EvaluateConfig(width=16, protocol="hard", channels=1, student_batch_size=32, input_norm="symmetric")
    student = train_student(small, Targets(), 10, "convnet3", 40, student_recipe(config, seed=0))
    assert student.features[0].in_channels == 1 and evaluate_top1(student, test.images, test.labels) > 0.5


def test_channels_auto_follow_the_source_and_a_given_teacher_stays_rgb():
    from engine.config import load_config
    from engine.evaluate.protocols import network_channels, teacher_channels
    from engine.pipeline import resolve_channels

    config = load_config(None, [])
    assert resolve_channels(config, grey=True).evaluate.channels == 1
    assert resolve_channels(config, grey=False).evaluate.channels == 3
    forced = load_config(None, ["evaluate.channels=3"])
    assert resolve_channels(forced, grey=True).evaluate.channels == 3
    grey = resolve_channels(config, grey=True).evaluate
    assert network_channels(grey) == teacher_channels(grey) == 1
    import dataclasses

    assert teacher_channels(dataclasses.replace(grey, teacher_path="/some/teacher.safetensors")) == 3
