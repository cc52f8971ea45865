"""The validation split (engine/data/splits.py): carved from train by a seeded coin per row id, disjoint from train and
test, stratified, the same rows whoever reads it, and never what the students, teacher or prior train on."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine.config import ConfigError, DataConfig, load_config
from engine.data.formats.parquet import parquet_table
from engine.data.images import load_split, sample_split
from engine.data.sources import count_rows, iter_row_batches
from engine.data.splits import in_split, rows_of_split, source_split, val_coin

CLASSES, PER_CLASS = 4, 300


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), value % 256, np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """CLASSES x PER_CLASS train rows in 3 shards that mix classes, 40 test rows."""
    root = tmp_path_factory.mktemp("split-shards")
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(CLASSES), PER_CLASS))
    rows = [{"bytes": png(i), "path": f"train/{i:06d}.png"} for i in range(len(labels))]
    for shard, part in enumerate(np.array_split(np.arange(len(labels)), 3)):
        table = pa.table({"image": pa.array([rows[i] for i in part]), "label": pa.array(labels[part], pa.int64())})
        pq.write_table(table, root / f"train-{shard:05d}-of-00003.parquet", row_group_size=100)
    test = [{"bytes": png(i), "path": f"test/{i:06d}.png"} for i in range(40)]
    pq.write_table(pa.table({"image": pa.array(test), "label": pa.array(np.arange(40) % CLASSES, pa.int64())}),
                   root / "test-00000-of-00001.parquet")
    (root / "classes.txt").write_text("".join(f"c{i}\n" for i in range(CLASSES)))
    return root


def config_of(root, **kwargs) -> DataConfig:
    return DataConfig(source="parquet", path=str(root), image_size=8, **{"val_fraction": 0.2, **kwargs})


def test_the_coin_is_a_seeded_uniform_function_of_the_id():
    ids = [f"row-{i}" for i in range(20_000)]
    coins = np.array([val_coin(i, 0) for i in ids])
    assert 0 <= coins.min() and coins.max() < 1 and abs(coins.mean() - 0.5) < 0.01
    assert [val_coin(i, 0) for i in ids[:50]] == coins[:50].tolist()  # fixed by (seed, id) alone
    assert np.mean(in_split(ids, "val", 0.1, seed=0)) == pytest.approx(0.1, abs=0.01)
    assert (in_split(ids, "val", 0.1, 0) != in_split(ids, "val", 0.1, 1)).any()  # another seed, other rows
    assert (in_split(ids, "train", 0.1, 0) == ~in_split(ids, "val", 0.1, 0)).all()
    assert in_split(ids, "test", 0.1, 0).all() and not in_split([None], "val", 0.5, 0).any()
    assert source_split("val") == "train" and source_split("test") == "test"
    with pytest.raises(ValueError, match="train, val, test"):
        source_split("validation")


def test_val_is_disjoint_from_train_and_test_and_stratified(shards):
    config = config_of(shards)
    train, val, test = (load_split(config, split) for split in ("train", "val", "test"))
    assert len(train) + len(val) == CLASSES * PER_CLASS and len(test) == 40
    assert not set(train.ids) & set(val.ids) and not (set(train.ids) | set(val.ids)) & set(test.ids)
    # Every class gives its fraction: 60 expected of 300 rows, sd 6.9; 4 sd is a bound that holds for any seed.
    per_class = np.bincount(val.labels, minlength=CLASSES)
    assert (np.abs(per_class - 0.2 * PER_CLASS) < 4 * np.sqrt(PER_CLASS * 0.2 * 0.8)).all()
    assert count_rows(config, "val") == len(val) and count_rows(config, "train") == len(train)
    assert count_rows(config, "test") == 40


def test_the_same_rows_whatever_the_batches(shards):
    config = config_of(shards)
    val = set(load_split(config, "val").ids)
    small = {image["path"] for rows in iter_row_batches(config, "val", batch_size=7) for image in rows["image"]}
    assert small == val
    # And the raw-row filter the Ray Data read tasks use gives the same rows from numpy columns.
    rows = [row for shard in sorted(shards.glob("train-*.parquet")) for row in parquet_table(
        pq.read_table(shard).combine_chunks().to_batches()[0], shard.name, 0, str(shard)).to_pylist()]
    columns = {"image": np.array([r["image"] for r in rows], dtype=object), "label": np.array([r["label"] for r in rows])}
    assert {i["path"] for i in rows_of_split(columns, "val", 0.2, 0)["image"]} == val


def test_the_prior_sample_never_holds_a_validation_row(shards):
    config = config_of(shards)
    sample = sample_split(config, "train", 200, seed=0)
    assert len(sample) == 200 and not set(sample.ids) & set(load_split(config, "val").ids)


def test_val_fraction_is_checked():
    with pytest.raises(ConfigError, match="data.val_fraction"):
        load_config(None, ["data.val_fraction=0.7"])
    assert load_config(None, ["data.val_fraction=0"]).data.val_fraction == 0


def test_a_run_without_a_validation_split_stops_before_it_starts():
    from engine.checks import check_run_inputs
    from engine.config import RunError

    config = load_config(None, ["data.val_fraction=0"])
    with pytest.raises(RunError, match="val_fraction=0 leaves no validation split"):
        check_run_inputs(config, ("a", "b"), "evaluate")
    check_run_inputs(config, ("a", "b"), "baselines")  # distilling without evaluating needs none


@pytest.mark.ray
def test_ray_data_reads_the_same_train_and_val_rows(shards, ray_session, tmp_path):
    from engine.ray.source import source_dataset

    config = config_of(shards)
    for split in ("train", "val"):
        rows = source_dataset(config, skip_dir=tmp_path / split, split=split).select_columns(["id"]).take_all()
        assert sorted(r["id"] for r in rows) == sorted(load_split(config, split).ids)
