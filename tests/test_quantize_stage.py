import numpy as np
import pyarrow.parquet as pq
import pytest

from engine import store
from engine.config import QuantizeConfig
from engine.quantize_stage import class_result_paths, gather_class_results, quantize_class_folder


def write_class(root, label, latents):
    ids = np.array([f"{label}/{i:04d}" for i in range(len(latents))])
    table = store.latents_to_table(ids, np.full(len(latents), label), latents)
    store.atomic_write_table(root / f"label={label}" / "part-0.parquet", table)
    return root / f"label={label}"


def test_class_results_are_written_once_and_skipped_on_retry(tmp_path):
    rng = np.random.default_rng(0)
    config = QuantizeConfig(ipc=(1, 3))
    folders = {c: write_class(tmp_path / "latents", c, rng.standard_normal((20, 8)).astype(np.float32)) for c in (0, 1)}
    out = tmp_path / "out"
    first = [quantize_class_folder(c, str(d), config, str(out)) for c, d in folders.items()]
    assert [s["skipped"] for s in first] == [False, False] and all(s["peak_rss_mb"] > 0 for s in first)
    before = class_result_paths(out, 0)[1].stat().st_mtime_ns
    again = quantize_class_folder(0, str(folders[0]), config, str(out))
    assert again["skipped"] and class_result_paths(out, 0)[1].stat().st_mtime_ns == before
    centroids, stats = gather_class_results(out, [0, 1])
    assert centroids.num_rows == 2 * (1 + 3) and stats.num_rows == 4
    assert stats.column("ipc").to_pylist() == [1, 1, 3, 3]  # sorted by (ipc, label)


def test_small_class_is_recorded_and_nan_names_the_class(tmp_path):
    rng = np.random.default_rng(0)
    small = write_class(tmp_path / "latents", 4, rng.standard_normal((3, 8)).astype(np.float32))
    quantize_class_folder(4, str(small), QuantizeConfig(ipc=(10,)), str(tmp_path / "out"))
    stats = pq.read_table(class_result_paths(tmp_path / "out", 4)[1]).to_pylist()[0]
    assert stats["k"] == 3 and stats["requested_k"] == 10 and "K=10" in stats["warning"]

    bad = rng.standard_normal((6, 8)).astype(np.float32)
    bad[2, 5] = np.nan
    folder = write_class(tmp_path / "latents", 7, bad)
    with pytest.raises(ValueError, match=r"class 7: 1 of 6 latents .* NaN or Inf"):
        quantize_class_folder(7, str(folder), QuantizeConfig(), str(tmp_path / "out"))
    assert not class_result_paths(tmp_path / "out", 7)[1].exists()
