"""evaluate.select: a student's best-validation weights are the argmax of its validation curve, chosen without
reading test, and test is read once per choice, after training. Runs a trainer's job in this process (no Ray
instance: the trainer's code takes its held-out split from memory when it is small)."""

import io

import numpy as np
import pytest
import torch

from engine.config import DataConfig, DistillConfig, EvaluateConfig
from engine.data.images import load_split
from engine.io import store
from engine.ray import train_loop
from engine.ray.jobs import StudentJob
from engine.evaluate.students import create_student
from engine.evaluate.train import Worker, evaluate_top1


@pytest.fixture(scope="module")
def digits():
    return load_split(DataConfig(), "train"), load_split(DataConfig(), "val"), load_split(DataConfig(), "test")


def write_set(folder, images, labels):
    files = [store.image_file_name(int(label), i) for i, label in enumerate(labels)]
    for name, image in zip(files, images):
        store.write_png(folder / name, image)
    store.write_set_index(folder, files, labels, tuple(str(d) for d in range(10)), np.ones(len(labels)),
                          np.ones(len(labels), dtype=int))


def test_best_val_weights_are_the_curves_argmax_and_test_is_read_after_training(tmp_path, digits, monkeypatch):
    train, val, test = digits
    chosen = np.concatenate([np.flatnonzero(train.labels == c)[:2] for c in range(10)])
    write_set(tmp_path / "set", train.images[chosen], train.labels[chosen])
    evaluate = EvaluateConfig(protocol="hard", width=8, student_epochs=40, reports=8, select="best_val",
                              student_batch_size=8, set_quality=False)
    job = StudentJob("random-ipc2-convnet3-seed0", "random-ipc2", "random", "none", 2, 0, "convnet3", "none", "hard",
                     str(tmp_path / "set"))
    loop = train_loop.LoopConfig(DistillConfig(evaluate=evaluate), "students", "t", 1, str(tmp_path / "results"), "",
                                 len(train.labels), 10, (val.images, val.labels), (test.images, test.labels),
                                 str(tmp_path), (job,))
    test_reads, training = [], [True]
    original = train_loop.held_out_top1

    def held_out(model, worker, loop_config):
        test_reads.append(all(training) is False)  # True: read after training ended
        return original(model, worker, loop_config)

    monkeypatch.setattr(train_loop, "held_out_top1", held_out)
    trainer = train_loop.StudentTrainer(loop, Worker())
    original_train = trainer._train_on_set

    def train_then_mark(*args):
        result = original_train(*args)
        training[0] = False
        return result

    trainer._train_on_set = train_then_mark
    row = trainer.train_job(job)

    curve = dict((str(step), value) for step, value in row["val_curve"])
    assert len(curve) == 8
    best_step = max(curve, key=lambda s: curve[s])
    assert row["best_val_step"] == int(best_step) and row["select"] == "best_val"
    assert row["top1"] == row["top1_best_val"]
    assert test_reads and all(test_reads)  # test was never read while training (no report reads it)
    last_step = str(row["val_curve"][-1][0])
    if best_step != last_step:
        assert len(test_reads) == 2
        saved = torch.load(io.BytesIO(train_loop.JobFiles.of(store.location(loop.results_dir), job).best.read_bytes()),
                           weights_only=True)
        assert saved["step"] == int(best_step)
        model = create_student("convnet3", 10, train.images.shape[1], 8)
        from engine.evaluate.protocols import attach_input_norm, dataset_norm

        attach_input_norm(model, dataset_norm(val.images))
        model.load_state_dict(saved["weights"])
        assert evaluate_top1(model, val.images, val.labels) == pytest.approx(curve[best_step])
        assert evaluate_top1(model, test.images, test.labels) == pytest.approx(row["top1_best_val"])
    else:
        assert row["top1_best_val"] == row["top1_last"] and len(test_reads) == 1


def test_random_is_drawn_anew_for_every_seed(tmp_path):
    """Each evaluate seed's `random` student trains on its own subset (draw seed mod quantize.random_draws); the other
    sets keep one folder for every seed; every job's row names its draw."""
    from engine.config import load_config
    from engine.evaluate.sets import SetKey, requested_sets, set_dir
    from engine.pipeline import student_jobs

    config = load_config(None, [f"runs_dir={tmp_path}", "name=draws", "evaluate.methods=[random,herding,ddoq]",
                                "evaluate.ddoq_weights=[mass]", "quantize.ipc=[1]", "evaluate.seeds=[4,5,6,7]"])
    keys = requested_sets(config)
    assert [k for k in keys if k.method == "random"] == [SetKey("random", "none", 1, d) for d in range(3)]
    dirs = {key: set_dir(config.run_dir, key) for key in keys}
    assert len({folder.name for folder in dirs.values()}) == len(keys)  # one folder per draw
    assert dirs[SetKey("random", "none", 1)].name == "random-ipc1"  # draw 0: the single-draw runs' folder
    jobs = {(j.method, j.seed): j for j in student_jobs(config, dirs)}
    assert [jobs["random", s].draw for s in (4, 5, 6, 7)] == [1, 2, 0, 1]  # 4 seeds, 3 draws: seed 7 reuses draw 1
    assert [jobs["random", s].set_dir for s in (6, 4, 5)] == [str(dirs[SetKey("random", "none", 1, d)]) for d in range(3)]
    assert jobs["random", 5].name == "random-ipc1-convnet3-seed5" and jobs["random", 5].identity()["draw"] == 2
    assert {jobs["herding", s].set_dir for s in (4, 5, 6, 7)} == {str(dirs[SetKey("herding", "none", 1)])}
    one = load_config(None, ["evaluate.methods=[random]", "quantize.random_draws=1", "evaluate.seeds=[0,1,2]"])
    assert [k.draw for k in requested_sets(one)] == [0] * len(one.quantize.ipc)
    # Seeds added by a second run keep the draws the first run's seeds had and get new ones of their own.
    more = load_config(None, ["evaluate.methods=[random]", "quantize.random_draws=5", "evaluate.seeds=[3,4]",
                              "quantize.ipc=[1]"])
    assert [k.draw for k in requested_sets(more)] == [3, 4]
    later = {j.seed: j for j in student_jobs(more, {k: set_dir(more.run_dir, k) for k in requested_sets(more)})}
    assert sorted(later) == [3, 4] and [later[s].draw for s in (3, 4)] == [3, 4]
    assert later[4].set_dir.endswith("random-draw4-ipc1")


def test_a_grid_of_learning_rates_trains_every_set_and_seed_at_each(tmp_path):
    from engine.config import load_config
    from engine.evaluate.sets import requested_sets, set_dir
    from engine.pipeline import student_jobs

    config = load_config(None, [f"runs_dir={tmp_path}", "evaluate.methods=[ddoq,full]", "evaluate.ddoq_weights=[mass]",
                                "quantize.ipc=[1]", "evaluate.seeds=[0,1]", "evaluate.protocol=hard",
                                "evaluate.learning_rates=[0.003,0.03]"])
    jobs = student_jobs(config, {key: set_dir(config.run_dir, key) for key in requested_sets(config)})
    assert len(jobs) == 2 * 2 * 2 and len({j.name for j in jobs}) == 8  # (ddoq, full) x seeds x rates
    assert {j.identity()["learning_rate"] for j in jobs} == {0.003, 0.03}
    assert "ddoq-mass-ipc1-convnet3-seed1-lr0.03" in {j.name for j in jobs}
    plain = student_jobs(load_config(None, ["evaluate.protocol=hard", "evaluate.methods=[full]"]), {})
    assert plain[0].name.endswith("-seed0") and plain[0].identity()["learning_rate"] == 0.01  # the protocol's
