"""Hostile data (tests/hostile_data.py) through the real readers, in this process and in Ray Data: every row is
encoded with its own label or skipped with the expected reason, nothing else appears, and every whole-source
problem is one `distill: error:` sentence. Then a fuzz of image bytes: decode_rows never raises."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.config import DataConfig
from engine.data.images import decode_rows
from engine.data.readback import read_rows_by_id
from engine.data.sources import iter_row_batches, scan_source
from tests.hostile_data import MAX_BYTES, ROW_BUILDERS, SIZE, SOURCE_CASES, Outcome, png

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))
LAYOUTS = sorted(ROW_BUILDERS)


def data_config(layout: str, root: Path) -> DataConfig:
    return DataConfig(source=layout, path=str(root), image_size=SIZE, val_fraction=0, max_skip_fraction=1.0,
                      max_image_bytes=MAX_BYTES)


def normalized(row_id: str) -> str:
    """A damaged tar's row names where the damage was found; the suite only asks that it is there."""
    return row_id.split("/<damaged", 1)[0] + "/<damaged>" if "/<damaged" in row_id else row_id


def outcomes(decoded_ids, decoded_labels, skipped_ids, skipped_reasons) -> dict[str, Outcome]:
    found = {normalized(str(i)): Outcome("encoded", int(label)) for i, label in zip(decoded_ids, decoded_labels)}
    for row_id, reason in zip(skipped_ids, skipped_reasons):
        assert normalized(row_id) not in found, f"{row_id} both encoded and skipped"
        found[normalized(row_id)] = Outcome("skipped", reason)
    return found


def read_in_process(config: DataConfig) -> dict[str, Outcome]:
    listing = scan_source(config, "train")
    ids, labels, skip_ids, reasons = [], [], list(listing.skipped["id"]), list(listing.skipped["reason"])
    for rows in iter_row_batches(config, "train", batch_size=5, listing=listing):
        decoded, skipped = decode_rows(rows, SIZE, 3, config.max_image_pixels)
        ids += list(decoded["id"])
        labels += list(decoded["label"])
        skip_ids += skipped["id"]
        reasons += skipped["reason"]
    assert len(ids) + len(skip_ids) == len(set(ids) | set(skip_ids)), "two rows share an id"
    return outcomes(ids, labels, skip_ids, reasons)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_hostile_row_is_encoded_with_its_label_or_skipped_with_its_reason(layout, tmp_path):
    expect = ROW_BUILDERS[layout](tmp_path / layout)
    assert read_in_process(data_config(layout, tmp_path / layout)) == expect


@pytest.mark.ray
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_ray_readers_give_the_same_outcomes(layout, tmp_path, ray_session):
    from engine.ray.source import gather_skipped, source_dataset

    expect = ROW_BUILDERS[layout](tmp_path / layout)
    rows = source_dataset(data_config(layout, tmp_path / layout), skip_dir=tmp_path / "skipped",
                          columns=("id", "label")).take_all()
    skipped = gather_skipped(tmp_path / "skipped").to_pydict()
    found = outcomes([r["id"] for r in rows], [r["label"] for r in rows], skipped["id"], skipped["reason"])
    assert found == expect


def test_rows_that_store_the_same_path_are_read_back_as_themselves(tmp_path):
    """Three classes re-exported with the same file name: each id reads back its own row's image."""
    ROW_BUILDERS["parquet"](tmp_path)
    config = data_config("parquet", tmp_path)
    shard = "train-00000-of-00005.parquet"
    rows = read_rows_by_id(config, shard, [f"{shard}#2", f"{shard}#0", f"{shard}#1"])
    assert [image["bytes"] for image in rows["image"]] == [png(3), png(1), png(2)]
    assert rows["label"] == [2, 0, 1]
    with pytest.raises(KeyError, match="not a row of this shard"):
        read_rows_by_id(config, shard, [f"{shard}#99"])


@pytest.mark.parametrize("layout, case", [(layout, case) for layout in sorted(SOURCE_CASES)
                                          for case in sorted(SOURCE_CASES[layout])])
def test_a_whole_source_problem_is_one_sentence_before_any_stage(layout, case, tmp_path, capsys):
    import distill

    build, message = SOURCE_CASES[layout][case]
    build(tmp_path / "data")
    with pytest.raises(SystemExit) as exit_info:
        distill.main([f"runs_dir={tmp_path / 'runs'}", f"data.source={layout}", f"data.path={tmp_path / 'data'}",
                      f"cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and err.startswith("distill: error: ")
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()  # nothing written


# ---------------------------------------------------------------- fuzz


def encoded_image(fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"save_all": True} if fmt == "GIF" else {}))
    return buffer.getvalue()


def mutations(data: bytes, rng: np.random.Generator, count: int):
    for _ in range(count):
        out = bytearray(data)
        kind = rng.integers(4)
        if kind == 0:  # flip a few bytes
            for at in rng.integers(0, len(out), rng.integers(1, 8)):
                out[at] = int(rng.integers(256))
        elif kind == 1:  # cut
            out = out[: rng.integers(0, len(out))]
        elif kind == 2:  # insert junk
            at = int(rng.integers(0, len(out)))
            out[at:at] = rng.integers(0, 256, rng.integers(1, 64), dtype=np.uint8).tobytes()
        else:  # overwrite a header field with extremes
            at = int(rng.integers(0, min(len(out), 64)))
            out[at:at + 4] = b"\xff\xff\xff\x7f"
        yield bytes(out)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"])
def test_mutated_images_of_every_format_are_decoded_or_skipped_never_raised(fmt):
    rng = np.random.default_rng(sum(map(ord, fmt)))
    samples = list(mutations(encoded_image(fmt, 0), rng, 150))
    batch = {"image": [{"bytes": b, "path": f"fuzz/{i}"} for i, b in enumerate(samples)], "label": [0] * len(samples)}
    decoded, skipped = decode_rows(batch, SIZE, 3, max_pixels=1 << 20)
    assert len(decoded["id"]) + len(skipped["id"]) == len(samples)
    assert decoded["image"].shape[1:] == (SIZE, SIZE, 3) and decoded["image"].dtype == np.uint8


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_priors_sample_takes_hostile_rows_and_counts_them(layout, tmp_path):
    """The tiny prior's training sample reads the same rows before any check runs (string and NaN labels used to
    raise there): bad rows are sampled in a bucket of their own and skipped with their reasons."""
    from engine.data.images import sample_split

    expect = ROW_BUILDERS[layout](tmp_path / layout)
    sample = sample_split(data_config(layout, tmp_path / layout), "train", limit=300, seed=0)
    assert {str(i): int(label) for i, label in zip(sample.ids, sample.labels)} == {
        i: o.value for i, o in expect.items() if o.kind == "encoded"}
    assert sum(sample.skipped.values()) > 0


@pytest.mark.ray
@pytest.mark.slow
def test_a_run_on_hostile_data_files_every_real_image_under_its_own_class(tmp_path, ray_session):
    """jobs/distill.py end to end on the hostile parquet set (three classes storing the same `img_0.png`): every
    image of the random and herding sets is a train image of the class it is filed under."""
    import distill
    import pyarrow.parquet as pq

    from engine.data.images import load_split
    from engine.io.store import read_image

    ROW_BUILDERS["parquet"](tmp_path / "data")
    data = ["data.source=parquet", f"data.path={tmp_path / 'data'}", "data.name=hostile", "data.val_fraction=0.2",
            "data.max_skip_fraction=1.0", f"data.max_image_bytes={MAX_BYTES}"]
    distill.main(["--smoke-test", "--until", "baselines", f"runs_dir={tmp_path / 'runs'}",
                  f"cache_dir={tmp_path / 'cache'}", *data])
    train = load_split(DataConfig(source="parquet", path=str(tmp_path / "data"), image_size=16, val_fraction=0.2,
                                  max_skip_fraction=1.0, max_image_bytes=MAX_BYTES), "train")
    for name in ("random-ipc2", "herding-ipc2"):
        folder = tmp_path / "runs" / "smoke" / "distilled" / name
        for row in pq.read_table(folder / "index.parquet").to_pylist():
            image = read_image(folder / row["path"])
            assert [int(c) for i, c in zip(train.images, train.labels) if np.array_equal(i, image)] == [row["label"]]
