"""Per-class centroid files, as the quantize stage writes them, for tests of the decode stage."""

import numpy as np
import pyarrow as pa

from engine.io import store
from engine.quantize.class_task import class_result_paths


def write_centroid_files(folder, latents_by_class: dict[int, dict[int, np.ndarray]]) -> dict:
    """{label: {ipc: (k, d) latents}} -> {label: its centroids file} (the engine's quantizer, weights 1, counts 1)."""
    files = {}
    for label, by_ipc in latents_by_class.items():
        rows = [(ipc, index) for ipc, latents in sorted(by_ipc.items()) for index in range(len(latents))]
        table = pa.table({"label": [label] * len(rows), "ipc": [r[0] for r in rows],
                          "quantizer": ["ddoq"] * len(rows), "index": [r[1] for r in rows],
                          "count": [1] * len(rows), **{f"weight_{m}": [1.0] * len(rows)
                                                        for m in ("uniform", "mass", "sqrt")}})
        latents = np.concatenate([by_ipc[ipc] for ipc in sorted(by_ipc)]).reshape(len(rows), -1)
        files[label] = class_result_paths(folder, label)[0]
        store.atomic_write_table(files[label], table.append_column("latent", store.float32_rows(latents)))
    return files
