"""tune/sweep.py: search spaces, work sharing, the resource rule, the --smoke-test sweep and `ray job submit`."""

import json
import dataclasses
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine.config import ConfigError, load_config
from engine.io import store
from engine.io.location import ObjectPath
from tests.local_head import submit_to_local_head

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tune"), str(ROOT / "jobs")]
import sweep  # noqa: E402

BASE = load_config(ROOT / "configs" / "digits.yaml")


def write_space(tmp_path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_bundled_spaces_load():
    for path in sorted((ROOT / "tune" / "spaces").glob("*.yaml")):
        space = sweep.load_search_space(path, BASE)
        assert space.params and space.scheduler in ("asha", "none")


def test_space_rejects_unknown_keys_and_continuous_shared_stages(tmp_path):
    with pytest.raises(ConfigError, match="decode.nope"):
        sweep.load_search_space(write_space(tmp_path, "params:\n  decode.nope: {grid: [1]}\n"), BASE)
    with pytest.raises(ConfigError, match="grid or choice"):
        sweep.load_search_space(write_space(tmp_path, "params:\n  quantize.nredo: {randint: [1, 4]}\n"), BASE)
    with pytest.raises(ConfigError, match="one of"):
        sweep.load_search_space(write_space(tmp_path, "params:\n  decode.strength: [0.5]\n"), BASE)


def test_trials_share_quantization_across_ipc_weights_and_decode(tmp_path):
    space = sweep.load_search_space(write_space(tmp_path, """
params:
  quantize.ipc: {grid: [1, 10, [2, 5]]}
  evaluate.ddoq_weights: {choice: [[mass], [sqrt]]}
  quantize.nredo: {grid: [1, 3]}
  decode.guidance_scale: {uniform: [1.0, 4.0]}
fixed:
  evaluate.methods: [ddoq]
"""), BASE)
    assert sweep.all_ipcs(BASE, space) == (1, 2, 5, 10)
    assert sweep.shared_combinations(space) == [{"quantize.nredo": 1}, {"quantize.nredo": 3}]
    a = sweep.trial_config(BASE, space, {"quantize.ipc": 1, "quantize.nredo": 1, "decode.guidance_scale": 1.5},
                           tmp_path)
    b = sweep.trial_config(BASE, space, {"quantize.ipc": 10, "evaluate.ddoq_weights": ["sqrt"], "quantize.nredo": 1,
                                         "decode.guidance_scale": 3.0}, tmp_path)
    c = sweep.trial_config(BASE, space, {"quantize.ipc": 1, "quantize.nredo": 3}, tmp_path)
    assert (a.quantize.ipc, b.quantize.ipc, b.evaluate.ddoq_weights, a.evaluate.methods) == ((1,), (10,), ("sqrt",),
                                                                                         ("ddoq",))
    assert a.run_dir != b.run_dir and a.run_dir.parent == tmp_path / "trials"
    assert sweep.shared_folder(a, tmp_path) == sweep.shared_folder(b, tmp_path) != sweep.shared_folder(c, tmp_path)


def runtime(**changes):
    return dataclasses.replace(BASE, runtime=dataclasses.replace(BASE.runtime, **changes))


def test_a_noise_space_sweep_shares_the_inversion_per_t(tmp_path):
    """quantize.space=noise: the decode keys the inversion depends on are shared stages (grid or choice), each t
    its own inverted and quantized folder; the guidance of the reverse process stays free per trial."""
    with pytest.raises(ConfigError, match="params.decode.strength: stages shared"):
        sweep.load_search_space(write_space(tmp_path, "params:\n  decode.strength: {uniform: [0.3, 0.9]}\n"
                                            "fixed:\n  quantize.space: noise\n"), BASE)
    space = sweep.load_search_space(write_space(tmp_path, """
params:
  decode.strength: {grid: [0.4, 0.6]}
  decode.guidance_scale: {uniform: [1.0, 3.0]}
fixed:
  quantize.space: noise
"""), BASE)
    assert sweep.shared_combinations(space) == [{"decode.strength": 0.4}, {"decode.strength": 0.6}]
    folder = lambda **p: sweep.shared_folder(sweep.trial_config(BASE, space, p, tmp_path), tmp_path)  # noqa: E731
    assert folder(**{"decode.strength": 0.4, "decode.guidance_scale": 1.0}) == \
        folder(**{"decode.strength": 0.4, "decode.guidance_scale": 2.5}) != folder(**{"decode.strength": 0.6})
    latent = sweep.load_search_space(write_space(tmp_path, "params:\n  decode.strength: {grid: [0.4, 0.6]}\n"), BASE)
    assert sweep.shared_combinations(latent) == [{}]  # in the latent space t is a decode setting like any other


def test_concurrency_rule_never_starves_trainers():
    one_cpu = runtime(train_cpus_per_worker=1, decode_actors=1)
    # Each trial holds 0.01 CPU for its whole life: on 2 CPUs, two trials could not both start a 1-CPU trainer.
    assert sweep.max_concurrent_trials(one_cpu, {"CPU": 2.0}) == 1
    assert sweep.max_concurrent_trials(one_cpu, {"CPU": 16.0}) == 10  # decode: 1 actor + 0.5 for its writes
    assert sweep.max_concurrent_trials(runtime(train_cpus_per_worker=2, decode_actors=4), {"CPU": 16.0}) == 3
    gpu = runtime(train_cpus_per_worker=4, train_use_gpu=True, decode_actors=2, gpus_per_actor=1.0)
    assert sweep.max_concurrent_trials(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4  # 2 GPUs at the decode peak
    with pytest.raises(ConfigError, match="could never start"):
        sweep.max_concurrent_trials(runtime(train_cpus_per_worker=2), {"CPU": 2.0})
    # A trainer reading a file source through Ray Data needs its stream's tasks' CPU free beside it (0.5): a 1-CPU
    # trainer beside a 0.01-CPU trial fits 2 CPUs; a 1.5-CPU one leaves the stream nothing and is refused.
    parquet = dataclasses.replace(one_cpu, data=dataclasses.replace(one_cpu.data, source="parquet"))
    assert sweep.peak_trial_resources(parquet, streams=True)["CPU"] == pytest.approx(1.51)
    assert sweep.max_concurrent_trials(parquet, {"CPU": 2.0}, streams=True) == 1
    greedy = dataclasses.replace(parquet, runtime=dataclasses.replace(parquet.runtime, train_cpus_per_worker=1.5))
    with pytest.raises(ConfigError, match="the stream feeding it"):
        sweep.max_concurrent_trials(greedy, {"CPU": 2.0}, streams=True)
    assert sweep.max_concurrent_trials(parquet, {"CPU": 2.0}, streams=False) == 1  # nothing streamed: it fits
    for cpus in (2.0, 3.0, 8.0, 33.0):  # the rule itself: all running trials at their peak fit at once
        for config in (one_cpu, runtime(train_cpus_per_worker=2, decode_actors=3)):
            peak = sweep.peak_trial_resources(config)["CPU"]
            if peak <= cpus:
                assert sweep.max_concurrent_trials(config, {"CPU": cpus}) * peak <= cpus


def test_each_stage_declares_its_resources_once():
    """engine/ray/cluster.py's stage_resources is the one place the trainers', their stream's and the decoders'
    CPUs and GPUs are worked out; the trainer count and a sweep's trial peak read it."""
    from engine.ray.cluster import stage_resources

    gpu = runtime(train_workers=2, train_cpus_per_worker=4, train_use_gpu=True, decode_actors=2, gpus_per_actor=1.0)
    stages = stage_resources(gpu)
    assert (stages.trainer_cpus, stages.trainer_gpus, stages.decode_gpus) == (8, 2, 2)
    assert stages.trainers_fitting(64.0, 8.0, streams=False) == 4  # the GPUs bound it
    assert stages.trainers_fitting(16.4, 8.0, streams=False) == 2
    assert stages.trainers_fitting(16.4, 8.0, streams=True) == 1  # the stream's CPU comes first
    assert sweep.peak_trial_resources(gpu, streams=True)["CPU"] == pytest.approx(
        sweep.TRIAL_CPU + stages.trainer_and_stream_cpus(streams=True))
    parquet = dataclasses.replace(gpu, data=dataclasses.replace(gpu.data, source="parquet"))
    assert stage_resources(parquet).stream_cpus == stages.stream_cpus  # no source asks for more than its tasks


def write_digits_parquet(root: Path, test_rows: int) -> Path:
    """The digits as Hugging-Face parquet shards (train, and a test split of `test_rows` rows, repeating the test
    digits under their own ids): a file source whose test split the evaluation streams."""
    import io

    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from engine.data.images import load_split

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

    def write(split, images, labels):
        rows = []
        for i, pixels in enumerate(images):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            rows.append({"bytes": buffer.getvalue(), "path": f"{split}_{i}.png"})
        table = pa.table({"image": pa.array(rows, image_type), "label": pa.array(labels, pa.int64())})
        pq.write_table(table, root / f"{split}-00000-of-00001.parquet")

    root.mkdir(parents=True)
    train, test = load_split(BASE.data, "train"), load_split(BASE.data, "test")
    write("train", train.images, train.labels)
    repeat = np.arange(test_rows) % len(test)
    write("test", test.images[repeat], test.labels[repeat])
    (root / "classes.txt").write_text("\n".join(train.class_names) + "\n")
    return root


def test_a_trial_streams_the_test_split_only_when_it_is_larger_than_the_evaluation_holds(tmp_path, monkeypatch):
    import engine.ray.evaluate

    root = write_digits_parquet(tmp_path / "digits-parquet", test_rows=30)
    config = load_config(None, ["data.source=parquet", f"data.path={root}", "data.name=digits_parquet",
                                "evaluate.methods=[ddoq]"])
    monkeypatch.setattr(engine.ray.evaluate, "VAL_IMAGES", 30)
    assert not sweep.trial_streams(config)  # 30 test rows: in memory
    monkeypatch.setattr(engine.ray.evaluate, "VAL_IMAGES", 29)
    assert sweep.trial_streams(config)
    monkeypatch.setattr(engine.ray.evaluate, "VAL_IMAGES", 30)
    assert sweep.trial_streams(dataclasses.replace(config, evaluate=dataclasses.replace(
        config.evaluate, methods=("ddoq", "full"))))  # `full` streams the train split


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_over_a_file_source_streams_its_test_split_beside_the_trainer(ray_session, tmp_path):
    """A parquet source whose test split (1,100 rows) is larger than the evaluation takes into memory, so each
    trial's trainer streams it for every job's final top-1. A 1-CPU trainer beside the trial's 0.01 leaves the
    stream's 0.5-CPU tasks room on 2 CPUs and finishes with a test top-1 over every test row; a 1.5-CPU one would
    leave them none and is refused in one sentence."""
    root = write_digits_parquet(tmp_path / "digits-parquet", test_rows=1100)
    space = write_space(tmp_path, "params:\n  decode.guidance_scale: {grid: [1.0, 3.0]}\nfixed:\n"
                                  "  quantize.ipc: [1]\n  evaluate.methods: [ddoq]\n  evaluate.ddoq_weights: [mass]\n"
                                  "  evaluate.seeds: [0]\nscheduler: none\n")
    common = ["--smoke-test", "--search-space", str(space), f"runs_dir={tmp_path / 'runs'}",
              f"cache_dir={tmp_path / 'cache'}", "data.source=parquet", f"data.path={root}",
              "data.name=digits_parquet"]
    with pytest.raises(SystemExit) as refused:
        sweep.main(common + ["runtime.train_cpus_per_worker=1.5"])
    assert refused.value.code == 2
    out = sweep.main(common + ["runtime.train_cpus_per_worker=1"])
    table = pq.read_table(out["sweep_dir"] / "trials.parquet").to_pandas()
    assert len(table) == 2 and (table.error == "").all(), table.error.tolist()
    rows = [json.loads(p.read_text()) for p in out["sweep_dir"].glob("trials/t-*/results/*/ddoq-*-seed0.json")]
    assert len(rows) == 2 and all(0.0 <= r["top1"] <= 1.0 for r in rows)
    # Run again: every student is done, so the trials report nothing; they rank by their result rows.
    again = sweep.main(common + ["runtime.train_cpus_per_worker=1"])["table"]
    assert sorted(again.val_top1_mean) == pytest.approx(sorted(table.val_top1_mean))


def test_finished_trials_rank_by_their_rows_and_unfinished_ones_by_their_last_reports():
    from types import SimpleNamespace

    import pandas as pd

    space = sweep.SearchSpace(params={"decode.strength": {"grid": [0.3, 0.5, 0.7]}}, fixed=())
    reports = pd.DataFrame({"job": ["a", "a", "b", "b"], "val_top1": [0.2, 0.4, 0.3, 0.5]})
    grid = [SimpleNamespace(config={"decode.strength": 0.3}, metrics_dataframe=None, error=None, path="t0"),
            SimpleNamespace(config={"decode.strength": 0.5}, metrics_dataframe=reports, error=None, path="t1"),
            SimpleNamespace(config={"decode.strength": 0.7}, metrics_dataframe=reports.iloc[:2], error=None,
                            path="t2")]
    finished = {0.3: [{"val_top1": 0.6}, {"val_top1": 0.8}], 0.5: None, 0.7: None}
    table = sweep.trials_table(grid, space, 2, lambda params: finished[params["decode.strength"]])
    assert table["decode.strength"].tolist() == [0.3, 0.5, 0.7]
    assert table.val_top1_mean.tolist() == pytest.approx([0.7, 0.45, 0.4])  # rows; last reports; ASHA-stopped
    assert table.stopped_early.tolist() == [False, False, True] and table.jobs_done.tolist() == [2, 2, 1]


@pytest.mark.ray
def test_shared_stages_run_once_for_every_trial_of_the_smoke_space(ray_session, tmp_path):
    """The default-tier proof of work sharing (the whole Tune sweep is the slow test below): the driver's
    shared stages serve all 2 x 2 smoke trials, computed once, and computed zero times when run again."""
    args = ["--smoke-test", f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}"]
    base, space, _ = sweep.parse_args(args)
    sweep_dir = tmp_path / "sweep"
    folders = sweep.prepare_shared_stages(base, space, sweep_dir)
    runs = [h["stage"] for h in store.stage_history(sweep_dir)]
    assert (runs.count("encode"), runs.count("quantize")) == (1, 1)
    trials = [sweep.trial_config(base, space, {"quantize.ipc": k, "decode.guidance_scale": g}, sweep_dir)
              for k in (1, 2) for g in (1.0, 3.0)]
    assert {sweep.shared_folder(t, sweep_dir) for t in trials} == set(folders) and len(folders) == 1
    assert len({t.run_dir for t in trials}) == 4  # each trial decodes and trains in its own folder
    shared = pq.read_table(folders[0] / "centroids.parquet").to_pandas()
    assert sorted(shared.ipc.unique()) == [1, 2]  # quantized once at the union of the trials' IPCs
    per_class = shared.groupby(["quantizer", "ipc", "label"])  # the engine's and D4M's centroids, K of each
    assert (per_class.size() == per_class.ipc.first()).all() and set(shared.quantizer) == {"ddoq", "d4m"}
    sweep.prepare_shared_stages(base, space, sweep_dir)
    assert len(store.stage_history(sweep_dir)) == len(runs)


@pytest.mark.ray
@pytest.mark.slow
def test_smoke_sweep_runs_4_trials_and_shares_encode_and_quantize(ray_session, tmp_path):
    out = sweep.main(["--smoke-test", f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}"])
    sweep_dir = out["sweep_dir"]
    table = pq.read_table(sweep_dir / "trials.parquet").to_pandas()
    assert len(table) == 4 and (table.error == "").all()
    assert sorted(zip(table["quantize.ipc"], table["decode.guidance_scale"])) == [(1, 1.0), (1, 3.0), (2, 1.0),
                                                                                 (2, 3.0)]
    assert table.val_top1_mean.between(0, 1).all() and (table.jobs_done >= 1).all()
    best = load_config(sweep_dir / "best_config.yaml")
    assert best.quantize.ipc == (int(table["quantize.ipc"].iloc[0]),) and best.evaluate.methods == ("ddoq",)
    assert (sweep_dir / "accuracy_vs_ipc.png").stat().st_size > 5000

    # Stage runs, counted by the markers the stages themselves write: encode and quantize once for all trials,
    # decode once per trial; every trial trained its student.
    runs = [h["stage"] for h in store.stage_history(sweep_dir)]
    assert (runs.count("encode"), runs.count("quantize"), runs.count("decode")) == (1, 1, 4)
    assert out["stage_runs"] == {"encode": 1, "quantize": 1, "decode": 4}
    rows = [json.loads(p.read_text()) for p in sweep_dir.glob("trials/t-*/results/*/ddoq-*-ipc*-seed0.json")]
    assert len(rows) == 4
    # Trials were ranked on validation top-1: each trial's metric is its student's last report, which scores the
    # final model on the validation slice, i.e. the row's val_top1, not its test top1.
    assert sorted(table.val_top1_mean) == pytest.approx(sorted(r["val_top1"] for r in rows))
    shared = pq.read_table(next(sweep_dir.glob("shared/quantize-*/centroids.parquet"))).to_pandas()
    assert sorted(shared.ipc.unique()) == [1, 2]  # quantized once at the union of the trials' IPCs

    # Preparing the shared stages again (a re-run of the sweep) computes nothing.
    base, space, _ = sweep.parse_args(["--smoke-test", f"runs_dir={tmp_path / 'runs'}",
                                       f"cache_dir={tmp_path / 'cache'}"])
    sweep.prepare_shared_stages(base, space, sweep_dir)
    assert len(store.stage_history(sweep_dir)) == len(runs)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_sweep_against_a_local_head(tmp_path, s3_env):
    """`ray job submit --working-dir . -- python tune/sweep.py --smoke-test` on a real `ray start --head`, the sweep
    folder (shared stages, trials, Tune's own files) on an object store."""
    from engine.io.location import list_files, location

    runs = location(f"s3://{s3_env['bucket']}/{tmp_path.name}/runs")
    out = submit_to_local_head(["python", "tune/sweep.py", "--smoke-test", f"runs_dir={runs}",
                                f"cache_dir={tmp_path / 'cache'}"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout
    table = store.read_table(runs / "smoke-sweep" / "trials.parquet").to_pandas()
    assert len(table) == 4 and (table.error == "").all()
    files = list_files(runs / "smoke-sweep")
    assert "best_config.yaml" in files and any(f.startswith("tune/") for f in files)


def test_runs_dir_file_uri_and_object_stores(tmp_path, s3_env):
    uri = load_config(ROOT / "configs" / "digits.yaml", [f"runs_dir=file://{tmp_path}/shared"])
    assert uri.run_dir == tmp_path / "shared" / "digits"
    remote = load_config(ROOT / "configs" / "digits.yaml", [f"runs_dir=s3://{s3_env['bucket']}/runs"]).run_dir
    assert isinstance(remote, ObjectPath) and str(remote) == f"s3://{s3_env['bucket']}/runs/digits"
    assert sweep.shared_folder(BASE, remote).uri.startswith(str(remote) + "/shared/quantize-")


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_whose_space_leaves_the_methods_open_runs_every_method(ray_session, tmp_path):
    """The smoke base's methods (real-image baselines, d4m, ddoq and full), none fixed by the space: trials take
    their baselines from the shared quantize folder and the teacher the driver trained once before them."""
    space = write_space(tmp_path, "params:\n  quantize.ipc: {grid: [1, 2]}\nfixed:\n  evaluate.seeds: [0]\n"
                                  "  evaluate.ddoq_weights: [mass]\n")
    out = sweep.main(["--smoke-test", "--search-space", str(space), "--max-concurrent", "1",
                      f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}"])
    table = pq.read_table(out["sweep_dir"] / "trials.parquet").to_pandas()
    assert len(table) == 2 and (table.error == "").all(), table.error.tolist()
    jobs = {p.name.split("-ipc")[0] for p in out["sweep_dir"].glob("trials/t-*/results/*/*-seed0.json")}
    assert jobs == {"random", "herding", "d4m", "ddoq-mass", "full"}
    assert len(list((tmp_path / "cache" / "teachers").glob("*.safetensors"))) == 1  # trained once, shared


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_rerun_in_its_folder_succeeds_whatever_state_its_trials_were_left_in(ray_session, tmp_path):
    """Every trial reports its rows to Tune whether it trains now, trained before (an ASHA stop left its students
    done but no metrics.json) or finished: a re-run never fails on a missing metric, and picks the same best."""
    import shutil

    args = ["--smoke-test", f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}"]
    first = sweep.main(args)
    trials = sorted((first["sweep_dir"] / "trials").glob("t-*"))
    assert len(trials) == 4
    (trials[0] / "metrics.json").unlink(missing_ok=True)  # students done, no metrics.json: what an ASHA stop leaves
    shutil.rmtree(trials[1])  # never started
    for result in (trials[2] / "results").glob("*/*-seed0.json"):  # stopped before its student finished
        result.unlink()
    (trials[2] / "metrics.json").unlink(missing_ok=True)
    again = sweep.main(args)  # trials[3] finished: reported from its metrics.json
    table = pq.read_table(again["sweep_dir"] / "trials.parquet").to_pandas()
    assert (table.error == "").all() and (table.jobs_done >= 1).all()
    assert again["best"] == first["best"]
