"""Run folders contain their run (engine/io/run_folder.py): another configuration's run, or files the engine did not
write, are refused in one sentence or cleared with --overwrite; a re-used folder's sets hold this run's images only."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine.config import RunError
from engine.config import ConfigError, load_config
from engine.io import store
from engine.io.run_folder import save_config
from engine.io.run_folder import Keep, check_run_folder, prune_run_folder


@pytest.fixture
def config(tmp_path):
    return load_config(None, [f"runs_dir={tmp_path / 'runs'}", "name=mine"])


def write_set(folder, labels: list[int]) -> list[str]:
    files = [store.image_file_name(label, i) for i, label in enumerate(labels)]
    for name, label in zip(files, labels):
        store.write_png(folder / name, np.full((8, 8, 3), 40 * label, np.uint8))
    ones = np.ones(len(labels))
    store.write_set_index(folder, files, labels, ("a", "b", "c"), ones, ones.astype(int))
    return files


def test_a_new_or_same_configuration_folder_passes(config):
    check_run_folder(config)  # no folder yet
    config.run_dir.mkdir(parents=True)
    save_config(config, config.run_dir / "config.yaml")
    write_set(config.run_dir / "distilled" / "random-ipc1", [0, 1])
    runtime_only = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, quantize_actors=1))
    check_run_folder(runtime_only)  # runtime settings change how fast, not what


def test_files_the_engine_did_not_write_are_refused_or_deleted(config):
    config.run_dir.mkdir(parents=True)
    (config.run_dir / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(RunError, match=r"1 file\(s\) no run of the engine wrote \(e.g. holiday.jpg\).*--overwrite"):
        check_run_folder(config)
    check_run_folder(config, overwrite=True)
    assert not config.run_dir.exists() or not any(config.run_dir.iterdir())


def test_another_configuration_is_named_and_refused(config):
    config.run_dir.mkdir(parents=True)
    save_config(config, config.run_dir / "config.yaml")
    other = load_config(None, [f"runs_dir={config.runs_dir}", "name=mine", "quantize.ipc=[1,2]"])
    with pytest.raises(RunError, match=r"another configuration \(quantize.ipc: \[1, 10\] there, \[1, 2\] now"):
        check_run_folder(other)
    check_run_folder(other, overwrite=True)  # allowed: its stale outputs are pruned after the stages


def test_a_reused_set_folder_loads_as_exactly_this_runs_images(config):
    from torchvision.datasets import ImageFolder

    config.run_dir.mkdir(parents=True)
    save_config(config, config.run_dir / "config.yaml")
    folder = config.run_dir / "distilled" / "ddoq-mass-ipc1"
    files = write_set(folder, [0, 1, 2])
    store.write_png(folder / "00007" / "c00007_0000.png", np.zeros((8, 8, 3), np.uint8))  # another run's class 7
    with pytest.raises(RunError, match=r"1 file\(s\) this run did not write \(e.g. distilled/ddoq-mass-ipc1/00007"):
        check_run_folder(config)
    check_run_folder(config, overwrite=True)
    loaded = ImageFolder(str(folder))
    assert sorted(p.split(f"{folder}/")[1] for p, _ in loaded.samples) == sorted(files)
    assert loaded.classes == ["00000", "00001", "00002"]


def test_outputs_of_replaced_configurations_are_pruned(config):
    run = config.run_dir
    write_set(run / "distilled" / "random-ipc1", [0])
    write_set(run / "distilled" / "random-ipc50", [0])
    for key in ("old", "new"):
        store.atomic_write_json(run / "quantized" / key / "class-0.json", {})
        store.atomic_write_json(run / "results" / key / "job.json", {})
    removed = prune_run_folder(run, Keep(frozenset({"random-ipc1"}), "new", "new"))
    assert removed == ["distilled/random-ipc50", "quantized/old", "results/old"]
    assert sorted(p.name for p in (run / "distilled").iterdir()) == ["random-ipc1"]
    assert prune_run_folder(run, Keep(frozenset({"random-ipc1"}), "new", None)) == []  # results unknown: kept


@pytest.mark.parametrize("override", ["name=../elsewhere", "name=/abs/run", "name=.hidden", "data.name=a/b"])
def test_run_and_dataset_names_are_single_folder_names(override, tmp_path):
    with pytest.raises(ConfigError, match="must be one folder name"):
        load_config(None, [f"runs_dir={tmp_path}", override])
