import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.config import QuantizeConfig
from engine.io import store
from engine.quantize.baselines import select_herding, select_kcenter, select_random_in_class
from engine.quantize.class_task import (class_picks_path, class_result_paths, gather_centroid_weights, gather_class_stats,
                                  gather_picks, quantize_class_folder)


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
    centroids, stats = gather_centroid_weights(out, [0, 1]), gather_class_stats(out, [0, 1])
    assert centroids.num_rows == 2 * 2 * (1 + 3) and stats.num_rows == 4  # the engine's and D4M's centroids
    assert centroids.column("quantizer").to_pylist() == ["ddoq"] * 8 + ["d4m"] * 8
    assert stats.column("ipc").to_pylist() == [1, 1, 3, 3]  # sorted by (ipc, label)
    # Centroid latents are float32 rows, not lists of doubles.
    latent_type = pq.read_schema(class_result_paths(out, 0)[0]).field("latent").type
    assert str(latent_type) == "fixed_size_list<element: float>[8]"


def test_real_image_picks_are_made_beside_the_kmeans(tmp_path):
    """random / herding / kcenter picks per class: the same herding and k-center rows as selecting on the class's
    latents directly (today's driver-side code did exactly that), random seeded per class, nested for the greedy
    methods, with the source file of every pick."""
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((30, 8)).astype(np.float32)
    folder = write_class(tmp_path / "latents", 2, latents)
    out = tmp_path / "out"
    quantize_class_folder(2, str(folder), QuantizeConfig(ipc=(1, 4), seed=5), str(out))
    picks = gather_picks(out, [2], (1, 4), ("random", "herding", "kcenter")).to_pandas()
    ids = np.array([f"2/{i:04d}" for i in range(30)])  # write_class's ids, already in sorted order
    for method, select in (("herding", select_herding), ("kcenter", select_kcenter)):
        chosen = picks[(picks.method == method) & (picks.ipc == 4)].sort_values("rank")
        assert chosen.id.tolist() == ids[select(latents, 4)].tolist()
        first = picks[(picks.method == method) & (picks.ipc == 1)].id.tolist()
        assert first == chosen.id.tolist()[:1]  # greedy: IPC 1 is the first pick of IPC 4
    random4 = picks[(picks.method == "random") & (picks.ipc == 4)]
    assert sorted(set(random4.draw)) == [0, 1, 2]  # quantize.random_draws subsets, each of 4 distinct images
    draws = [frozenset(random4[random4.draw == d].id) for d in range(3)]
    assert all(len(d) == 4 for d in draws) and len(set(draws)) == 3 and set(random4.label) == {2}
    # Draw 0 is the subset single-draw runs chose: (seed, label) seeding, unchanged.
    assert draws[0] == frozenset(ids[select_random_in_class(30, 4, 5, 2)])
    assert set(picks[picks.method != "random"].draw) == {0}
    again = gather_picks(out, [2], (4,), ("random",)).to_pandas()
    assert again.id.tolist() == random4.id.tolist()  # seeded
    assert set(picks.source) == {""}  # latents written without a source column read back with an empty one
    assert class_picks_path(out, 2).exists()


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
