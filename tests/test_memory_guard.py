"""Memory guard: the driver-side steps that used to load a whole split (the tiny prior's training images, the
real-image baselines) now stream it. Run in a fresh process on a generated split whose decoded size (226 MB of
uint8, 900 MB as float32) is far above what they may add to the process's peak RSS; the code they replace
(`load_split` for both) holds the whole decoded split."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
IMAGES, SIZE, SHARDS = 1500, 224, 5
DECODED_MB = IMAGES * SIZE * SIZE * 3 / 2**20  # 215 MiB

PROBE = """
import json, resource, sys
from engine.config import DataConfig
from engine.data.images import decode_rows, sample_split
from engine.data.readback import read_rows_by_id

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

root, picks = sys.argv[1], json.loads(sys.argv[2])
config = DataConfig(source="parquet", path=root, image_size=224)
before = peak_mb()
sample = sample_split(config, "train", 60, seed=0)  # the tiny prior's training sample
for source, ids in picks.items():  # the baselines' read-back, shard by shard
    rows = read_rows_by_id(config, source, ids)
    decoded, _ = decode_rows(rows, 224)
    assert list(decoded["id"]) == ids
print(json.dumps({"added_mb": peak_mb() - before, "sample": len(sample)}))
"""


def write_split(root: Path) -> dict[str, list[str]]:
    """Smooth JPEGs (small on disk, 224x224 decoded) in HF parquet shards; returns 10 ids per shard to read back."""
    rng = np.random.default_rng(0)
    picks = {}
    for shard in range(SHARDS):
        rows, labels = [], []
        for i in range(IMAGES // SHARDS):
            colour = rng.integers(0, 256, 3)
            ramp = np.linspace(0, 60, SIZE)[None, :, None]
            image = np.clip(colour + ramp, 0, 255).astype(np.uint8).repeat(SIZE, axis=0)
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG", quality=70)
            rows.append({"bytes": buffer.getvalue(), "path": f"train/{shard}/{i:05d}.jpg"})
            labels.append(i % 3)
        name = f"train-{shard:05d}-of-{SHARDS:05d}.parquet"
        pq.write_table(pa.table({"image": pa.array(rows), "label": pa.array(labels, pa.int64())}), root / name,
                       row_group_size=100)
        picks[name] = [f"{name}#{i}" for i in range(0, len(rows), 30)]
    (root / "classes.txt").write_text("a\nb\nc\n")
    return picks


def test_the_prior_sample_and_the_baselines_read_back_never_hold_the_split(tmp_path):
    picks = write_split(tmp_path)
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), json.dumps(picks)], cwd=ROOT,
                         capture_output=True, text=True, check=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["sample"] == 60
    # A bounded sample (60 images) and one shard's chosen rows at a time: a few MB over the imports, far from the
    # 215 MiB the decoded split would add.
    assert probe["added_mb"] < DECODED_MB / 4, probe
