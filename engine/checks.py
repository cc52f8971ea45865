"""Pre-flight and between-stage checks that turn bad runs into one clear sentence, before torch or faiss would
fail deep inside with a traceback (or, worse, silently decode NaN into black images).

    check_run_inputs(config, class_names, until)   config + dataset facts that make a run impossible
    check_finite_parameters(named_modules)         NaN/Inf in a model's weights, naming the parameter
    check_finite_centroids(centroids)              NaN/Inf in centroid latents or weights, naming class and IPC
"""

from __future__ import annotations


import numpy as np
import pyarrow as pa

from engine.config import DistillConfig, RunError


def check_run_inputs(config: DistillConfig, class_names: tuple[str, ...], until: str) -> None:
    from engine.io.location import location

    prior_path = config.prior.path
    if prior_path and not location(prior_path).is_dir():
        raise RunError(f"prior.path={prior_path} does not exist (or is not a folder): point it at a saved prior, "
                       f"or leave it empty to train the tiny prior into the cache")
    if config.data.source != "digits":
        from engine.data.sources import check_source

        check_source(config.data)  # a damaged shard or a bad classes.txt is one sentence, before any stage
    if len(class_names) == 0:
        raise RunError(f"the dataset {config.data.name} lists no classes")
    if len(class_names) < 2 and until == "evaluate":
        raise RunError(f"the dataset {config.data.name} has a single class ({class_names[0]!r}): the evaluation "
                       f"trains classifiers and needs at least 2; `--until quantize` distills it without evaluating")
    if config.data.val_fraction == 0 and until == "evaluate":
        raise RunError("data.val_fraction=0 leaves no validation split, and the evaluation scores its reports and "
                       "choices on it (never on test): set it (default 0.1), or stop earlier with `--until baselines`")


def check_finite_parameters(modules: dict, what: str) -> None:
    """`modules`: {name: torch module}. Raises naming the first parameter or buffer holding NaN or Inf."""
    import torch

    for module_name, module in modules.items():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise RunError(f"{what}: {module_name}.{name} has {bad} NaN/Inf value(s) of {tensor.numel()}; "
                               f"the prior is damaged, retrain it or restore it from a copy")


def check_finite_centroids(centroids: pa.Table) -> None:
    """Stop before the decoder when any centroid latent or weight is NaN/Inf, naming the class(es) and IPC."""
    column = centroids.column("latent").combine_chunks()
    latents = np.asarray(column.flatten(), dtype=np.float64).reshape(centroids.num_rows, -1)
    bad = ~np.isfinite(latents).all(axis=1)
    for name in centroids.column_names:
        if name.startswith("weight_"):
            bad |= ~np.isfinite(np.asarray(centroids.column(name), dtype=np.float64))
    if bad.any():
        labels = np.asarray(centroids.column("label"))[bad]
        ipcs = np.asarray(centroids.column("ipc"))[bad]
        where = sorted({(int(c), int(k)) for c, k in zip(labels, ipcs)})
        raise RunError(f"{int(bad.sum())} centroid(s) hold NaN/Inf latents or weights, (class, ipc): {where[:10]}; "
                       f"not decoding them")
