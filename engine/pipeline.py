"""The stage graph that jobs/distill.py and tune/sweep.py both run: prior -> encode -> quantize -> decode ->
real-image baselines -> evaluate. Each stage writes into the run folder with a completion marker keyed by a hash of
everything it depends on, so a re-run (or a killed run started again) skips finished stages and finished students.
The Ray layer (engine/ray/) places each stage; this module only decides what runs, in which order, with which key.
Each stage function returns a small record (PreparedPrior, Encoded, Quantized, StageSets) that the next one takes.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from engine.config import DistillConfig, config_hash
from engine.evaluate.protocols import get_protocol, teacher_channels
from engine.io import store
from engine.io.location import ObjectPath, is_shared_place, location, publish_folder
from engine.io.manifest import record_stage

# The stages a run can stop after (jobs/distill.py --until); the prior and encode stages always run.
UNTIL_CHOICES = ("quantize", "decode", "baselines", "evaluate")
# Run folders written before the baselines stage's marker was named after it call it real_sets (same key).
BASELINES_MARKERS = ("baselines", "real_sets")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"

# A tiny, fast version of the same run: every stage runs for real, on fewer steps.
SMOKE_OVERRIDES = (
    "name=smoke", "quantize.ipc=[1,2]", "prior.vae_steps=30", "prior.unet_steps=30", "decode.num_steps=4",
    "evaluate.teacher_epochs=1", "evaluate.student_epochs=5", "evaluate.full_epochs=1", "evaluate.seeds=[0]",
    "evaluate.reports=1", "evaluate.methods=[random,herding,d4m,ddoq,full]", "evaluate.ddoq_weights=[mass]",
)


def log(message: str) -> None:
    print(f"[distill {time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Wall seconds of the block into timings[stage] (metrics.json's timings_s), when the block finishes."""
    start = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - start


@dataclass(frozen=True)
class PreparedPrior:
    folder: Path | ObjectPath  # the prior's files, where every actor loads them
    class_names: tuple[str, ...]
    latent_shape: tuple[int, ...]
    image_size: int  # the prior's input size: the encode stage reads the data at it


@dataclass(frozen=True)
class Encoded:
    key: str
    latents_dir: Path | ObjectPath  # run_dir/latents, one folder per class
    images: int  # rows encoded
    skipped: dict[str, int]  # rows left out, per reason
    grey: bool = False  # every encoded image was grey (or decode.color_mode=grey): decoded images are written grey


@dataclass(frozen=True)
class Quantized:
    key: str
    folder: Path | ObjectPath  # run_dir/quantized/<key>: one set of files per class
    grey: bool = False  # decode the centroids into grey images (Encoded.grey)


@dataclass(frozen=True)
class StageSets:
    """What the decode or the baselines stage made: its key and its distilled sets' folders."""

    key: str
    set_dirs: dict  # SetKey (engine/evaluate/sets.py) -> set folder


def job_name(key, student: str, seed: int, learning_rate: float = 0.0) -> str:
    """A student job's name (its result file's stem), e.g. ddoq-mass-ipc10-convnet3-seed0 (-lr0.03 in a grid of
    rates); a random draw's students keep the plain `random` name (their row's `draw` says which subset)."""
    rate = f"-lr{learning_rate:g}" if learning_rate else ""
    return f"{key._replace(draw=0).name}-ipc{key.ipc}-{student}-seed{seed}{rate}"


def student_jobs(config: DistillConfig, set_dirs: dict) -> list:
    """One StudentJob (engine/ray/jobs.py) per (student architecture, set or `full`, seed); every row names all it
    was trained under. `random`'s seeds each train on their own draw (engine/evaluate/sets.py random_draw); with
    evaluate.learning_rates, every (set, seed) at each rate."""
    from engine.evaluate.sets import SetKey, random_draw, requested_sets
    from engine.ray.jobs import StudentJob

    e = config.evaluate
    teacher = e.teacher if get_protocol(e.protocol).soft_labels else "none"
    sets = list(dict.fromkeys(key._replace(draw=0) for key in requested_sets(config)))  # random: once, drawn below
    sets += [SetKey("full", "none", 0)] if "full" in e.methods else []
    jobs = []
    for student in e.students:
        for key, seed, rate in itertools.product(sets, e.seeds, e.learning_rates or (0.0,)):
            drawn = key._replace(draw=random_draw(config, seed)) if key.method == "random" else key
            jobs.append(StudentJob(name=job_name(key, student, seed, rate), set_name=f"{drawn.name}-ipc{key.ipc}",
                                   method=key.method, weights=key.weights, ipc=key.ipc, draw=drawn.draw,
                                   seed=seed, student=student, teacher=teacher, protocol=e.protocol,
                                   set_dir=str(set_dirs.get(drawn, "")), learning_rate=rate))
    return jobs


def shared_cache(config: DistillConfig) -> Path | ObjectPath | None:
    """runs_dir/_cache when the run folders are where every machine of a cluster reaches them (an object store, or
    a mount listed in runtime.shared_paths), so caches the actors or trainer workers read (the teacher, the prior
    this driver trained) go there rather than into each node's own cache_dir."""
    if not is_shared_place(config.runs_dir, config.runtime.shared_paths):
        return None  # a one-machine run keeps its caches in cache_dir, shared by all its run folders
    return location(config.runs_dir) / "_cache"


# The settings naming files that the workers, not only the driver, open; on several nodes each must name the same
# files on every node.
PLACE_KEYS = ("runs_dir", "data.path", "prior.path", "evaluate.teacher_path")


def check_cluster_places(config: DistillConfig, nodes: float, address: str = "") -> None:
    """Refuse, before any stage, node-local files on a cluster of several nodes (or from a driver that joined its
    cluster through Ray Client, ray://, whose own disk no worker sees): each worker would read, or write, its own
    node's disk, and the driver would then miss what they wrote. `nodes`: the nodes the cluster has or may grow
    to (math.inf: no limit); `address`: the cluster address the job joined ("" for a Ray it started)."""
    from engine.config import RunError

    remote = address.startswith("ray://")
    if nodes <= 1 and not remote:
        return
    shared = config.runtime.shared_paths
    values = {"runs_dir": config.runs_dir, "data.path": config.data.path if config.data.source != "digits" else "",
              "prior.path": config.prior.path, "evaluate.teacher_path": config.evaluate.teacher_path}
    local = [f"{key}={values[key]}" for key in PLACE_KEYS if values[key] and not is_shared_place(values[key], shared)]
    if local:
        size = "any number of" if nodes == float("inf") else f"{nodes:g}"
        where = f"a cluster of {size} nodes" if nodes > 1 else f"the cluster at {address}, joined from another machine"
        raise RunError(
            f"on {where} every node must reach the same files, but {' and '.join(local)} "
            f"{'is a path' if len(local) == 1 else 'are paths'} on one machine's own disk: use an object-store URI "
            f"(s3://bucket/..., gs://bucket/...) or a path under a mount every node sees, declared with "
            f"runtime.shared_paths=[/mnt/efs]" + (f" (declared now: {list(shared)})" if shared else ""))


def teacher_cache_path(config: DistillConfig) -> Path | ObjectPath:
    """A given checkpoint (local or a URI), or the cache keyed by (dataset, architecture, seed 0, everything that
    shapes it): in cache_dir, or in the shared cache when the run folders are on an object store or a shared mount
    (a per-node cache would leave a multi-node trainer's ranks disagreeing on whether to train)."""
    e = config.evaluate
    if e.teacher_path:
        if not location(e.teacher_path).is_file():
            raise FileNotFoundError(f"evaluate.teacher_path {e.teacher_path} is not a file")
        return location(e.teacher_path)
    # The input scale it is trained at is part of what it is (a cached teacher read at another scale is wrong).
    key = config_hash(config.data, e.teacher, e.width, e.teacher_epochs, e.batch_size, e.flip, e.input_norm,
                      teacher_channels(e))
    name = f"{config.data.name}-{e.teacher}-seed0-{key}.safetensors"
    return (shared_cache(config) or config.cache_path) / "teachers" / name


def resolve_channels(config: DistillConfig, grey: bool) -> DistillConfig:
    """evaluate.channels=0 made 1 for a grey source (every encoded image grey), 3 otherwise: what the evaluation,
    its result key and its teacher's cache key read."""
    import dataclasses

    if config.evaluate.channels:
        return config
    return dataclasses.replace(config, evaluate=dataclasses.replace(config.evaluate, channels=1 if grey else 3))


def needs_teacher(config: DistillConfig) -> bool:
    """Soft labels need the teacher, and so does judging the sets (evaluate.set_quality)."""
    return get_protocol(config.evaluate.protocol).soft_labels or config.evaluate.set_quality


def prepare_teacher(config: DistillConfig, results_dir) -> float:
    """The driver's entry to the teacher, before anything that shares it runs (a sweep's trials): start Ray, count
    the train rows, and have engine.ray.evaluate.prepare_teacher train (or load) the teacher into its cache and
    score it -> its held-out top-1."""
    from engine.data.sources import count_rows
    from engine.ray import evaluate as ray_evaluate
    from engine.ray.cluster import init_ray

    init_ray(config.runtime)
    rows = count_rows(config.data, "train")
    return ray_evaluate.prepare_teacher(config, teacher_cache_path(config), results_dir, rows, log)


def decode_identity(decode):
    """The decode settings that decide the images: batch size (noise is per centroid) and the networks' speed
    settings (memory format, attention kernel, compilation) only change how fast they are made."""
    import dataclasses

    return dataclasses.replace(decode, batch_size=0, channels_last=False, sdpa=True, compile="none")


def decode_stage(config: DistillConfig, run_dir, prior: PreparedPrior, quantized: Quantized) -> StageSets:
    """Decode once per (centroids, decode config): every ddoq set of an IPC gets the same images (written once),
    each its own weights; d4m its own centroids' images -> the decode key and {SetKey: set folder}."""
    from engine.evaluate.sets import requested_sets, set_dir
    from engine.quantize.class_task import class_result_paths
    from engine.ray.decode import decode_centroids_to_sets, denoiser_histogram

    latent_sets = [key for key in requested_sets(config) if key.method in ("d4m", "ddoq")]
    set_dirs = {key: set_dir(run_dir, key) for key in latent_sets}
    names, quantized_dir = prior.class_names, quantized.folder
    decode_key = config_hash(quantized.key, decode_identity(config.decode), sorted(latent_sets), quantized.grey)
    if latent_sets and store.finished_stage(run_dir, "decode", decode_key) is None:
        ipcs = sorted({key.ipc for key in latent_sets})
        labels = store.quantized_labels(quantized_dir)
        files = {label: class_result_paths(quantized_dir, label)[0] for label in labels}
        strengths = ", ".join(f"{config.decode.strength_at(ipc):g} at IPC {ipc}" for ipc in ipcs)
        log(f"decoding the centroids of {len(files)} classes at IPC {ipcs} (strength {strengths}, "
            f"guidance {config.decode.guidance_scale}, {config.decode.num_steps} steps, "
            f"{config.runtime.decode_actors} actor(s))")
        targets: dict[tuple[int, str], list[str]] = {}
        for key in latent_sets:  # the quantizer of a set is its method's: d4m's own, or the engine's for ddoq
            targets.setdefault((key.ipc, key.method), []).append(str(set_dirs[key]))
        decoded = decode_centroids_to_sets(config, prior.folder, files, targets, names, quantized.grey).to_pandas()
        images = {file: {"sha256": sha, "bytes": size}
                  for copies, sha, size in zip(decoded.files, decoded.sha256, decoded["bytes"]) for file in copies}
        for key in latent_sets:
            part = decoded[(decoded.ipc == key.ipc) & (decoded.quantizer == key.method)]
            store.write_set_index(set_dirs[key], part.path.tolist(), part.label.to_numpy(), names,
                                  part[f"weight_{key.weights}"].to_numpy(), part["count"].to_numpy())
        share = decoded.groupby("actor").size()
        batches = denoiser_histogram(decoded.denoiser_batch)  # full batches of decode.batch_size but the last
        log(f"decode: {len(decoded)} images, per actor {sorted(int(v) for v in share)}; the denoiser ran batches of "
            f"{', '.join(f'{count} x {size}' for size, count in batches.items())}")
        store.mark_stage_finished(run_dir, "decode", decode_key, tuple(sorted(set(decoded.node))),
                                  images=len(decoded), images_per_actor=sorted(int(v) for v in share),
                                  denoiser_batches={str(size): count for size, count in batches.items()})
        record_stage(run_dir, "decode", images)
    return StageSets(decode_key, set_dirs)


def baselines_stage(config: DistillConfig, run_dir, quantized: Quantized, names: tuple[str, ...]) -> StageSets:
    """Real-image baselines (random, herding, k-center) from the ids the quantize actors picked: only the chosen
    rows are read back from the source -> the baselines key and {SetKey: set folder}. Its marker is
    `baselines`; an older run folder's `real_sets` marker of the same key counts as finished too."""
    import numpy as np

    from engine.evaluate.sets import REAL_METHODS, requested_sets, set_dir
    from engine.quantize.class_task import gather_picks
    from engine.ray.baselines import write_real_sets

    real = [m for m in config.evaluate.methods if m in REAL_METHODS]
    ipcs = tuple(config.quantize.ipc)
    quantized_dir = quantized.folder
    real_sets = [key for key in requested_sets(config) if key.method in REAL_METHODS]
    real_key = config_hash(config.data, quantized.key, real, ipcs, sorted({key.draw for key in real_sets}))
    real_dirs = {key: set_dir(run_dir, key) for key in real_sets}
    finished = any(store.finished_stage(run_dir, marker, real_key) for marker in BASELINES_MARKERS)
    if real and not finished:
        log(f"real-image baselines: {', '.join(real)} at IPC {list(ipcs)}, reading only the chosen rows back")
        picks = gather_picks(quantized_dir, store.quantized_labels(quantized_dir), ipcs, tuple(real))
        files = write_real_sets(config, picks, {(key.method, key.ipc, key.draw): str(d) for key, d in real_dirs.items()})
        frame = picks.to_pandas().sort_values(["label", "rank"])
        for key, folder in real_dirs.items():
            part = frame[(frame.method == key.method) & (frame.ipc == key.ipc) & (frame.draw == key.draw)]
            paths = [store.image_file_name(int(c), int(r)) for c, r in zip(part.label, part["rank"])]
            ones = np.ones(len(part))
            store.write_set_index(folder, paths, part.label.to_numpy(), names, ones, ones.astype(int))
        store.mark_stage_finished(run_dir, "baselines", real_key, methods=real, files=len(files))
        record_stage(run_dir, "baselines", files)
    return StageSets(real_key, real_dirs)


def evaluate_stage(config: DistillConfig, run_dir, set_dirs: dict, stage_keys: tuple[str, ...],
                   train_callbacks: tuple = (), train_rows: int | None = None,
                   measured: dict | None = None) -> list[dict]:
    """Every student through Ray Train; finished jobs of the same config are kept. `train_rows`: the train split's
    usable rows (the encode stage's count; counted from the source when not given). With evaluate.set_quality,
    each set is first judged by the teacher (engine/ray/quality.py) into measured["set_quality"]."""
    from engine.data.sources import count_rows
    from engine.ray.evaluate import evaluate_students

    evaluate_key = config_hash(*stage_keys, config.data, config.evaluate)
    results_dir = run_dir / "results" / evaluate_key
    if measured is not None:
        measured["results_folder"] = f"results/{evaluate_key}"
    jobs = student_jobs(config, set_dirs)
    log(f"training {len(jobs)} students, protocol {config.evaluate.protocol}")
    rows = train_rows if train_rows is not None else count_rows(config.data, "train")
    if config.evaluate.set_quality and set_dirs and jobs:
        from engine.ray.evaluate import prepare_teacher as teacher_phase
        from engine.ray.quality import measure_sets

        teacher_phase(config, teacher_cache_path(config), results_dir, rows, log)  # trained once, cached
        quality = measure_sets(config, set_dirs, teacher_cache_path(config), results_dir)
        if measured is not None:
            measured["set_quality"] = quality
        log("sets judged by the teacher against real validation images: " + ", ".join(
            f"{name} {q['class_agreement']:.2f}" for name, q in quality.items() if name != "reference"))
    return evaluate_students(config, jobs, teacher_cache_path(config), results_dir, rows, callbacks=train_callbacks,
                             log=log)


def decode_and_evaluate(config: DistillConfig, run_dir, prior: PreparedPrior, quantized: Quantized, timings: dict,
                        train_callbacks: tuple = (), until: str = "evaluate", train_rows: int | None = None,
                        measured: dict | None = None) -> list[dict]:
    """decode -> real-image baselines -> evaluate (as far as `until`), each timed into `timings`; what the
    evaluation measures beside the result rows (set quality) into `measured`."""
    with timed(timings, "decode"):
        decoded = decode_stage(config, run_dir, prior, quantized)
    if until == "decode":
        return []
    with timed(timings, "baselines"):
        baselines = baselines_stage(config, run_dir, quantized, prior.class_names)
    if until == "baselines":
        return []
    set_dirs = {**decoded.set_dirs, **baselines.set_dirs}
    with timed(timings, "evaluate"):
        return evaluate_stage(config, run_dir, set_dirs, (decoded.key, baselines.key), train_callbacks, train_rows,
                              measured)


def prepare_prior(config: DistillConfig) -> PreparedPrior:
    """Load (or train once and cache) the prior -> its folder, the class names, its latent shape and image size.
    A prior with NaN/Inf weights, or a tiny prior trained for other classes, stops the run here. With run folders
    on an object store, the folder returned is there too (the actors of every machine load it)."""
    from engine.checks import check_finite_parameters
    from engine.config import RunError
    from engine.data.sources import class_names
    from engine.priors import load_or_train_prior, prior_folder

    names = class_names(config.data)
    try:
        prior = load_or_train_prior(config.prior, config.data, config.cache_path, log=log)
    except (FileNotFoundError, ValueError) as error:  # a user's folder: its check names the file and the fix
        if config.prior.kind == "tiny":
            raise
        raise RunError(str(error)) from None
    folder = prior_folder(config.prior, config.data, config.cache_path)
    modules = ("vae", "unet", "transformer", "text_encoder")
    check_finite_parameters({n: getattr(prior, n) for n in modules if hasattr(prior, n)}, f"prior {folder}")
    if prior.kind == "tiny" and prior.class_names != tuple(names):  # sd15/dit take the data's names
        raise RunError(f"prior {folder} was trained for classes {prior.class_names[:5]}... ({prior.num_classes}), "
                       f"but the data has {len(names)} classes {tuple(names)[:5]}...")
    if shared_cache(config) is not None and not config.prior.path:
        # The prior this driver trained into its cache_dir: the encode/decode actors may run on other machines,
        # which share only the run folders' store or mount, so they load it from there (from an object store each
        # machine copies it once).
        folder = publish_folder(folder, shared_cache(config) / "priors" / folder.name)
    return PreparedPrior(folder, tuple(names), tuple(prior.latent_shape), prior.image_size)


def encode_stage(config: DistillConfig, run_dir, prior: PreparedPrior) -> Encoded:
    """Encode once per (data, prior) into run_dir/latents -> its key and folder, the images encoded and the rows
    skipped per reason."""
    from engine.data.images import count_skipped
    from engine.ray.cluster import take_nodes
    from engine.ray.encode import encode_to_parquet

    folder, latent_shape = prior.folder, prior.latent_shape
    encode_key = config_hash(config.data, config.prior, str(folder.resolve()))
    latents_dir = run_dir / "latents"
    marker = store.finished_stage(run_dir, "encode", encode_key)
    if marker is None:
        log(f"encoding the train split with the prior's VAE (latent shape {latent_shape})")
        store.invalidate_stage(run_dir, "encode")  # the old latents are about to be replaced
        result = encode_to_parquet(config, folder, latents_dir, prior.image_size, prior.class_names)
        encoded, files, colour = result.images, result.files, result.colour_images
        records = store.read_table(run_dir / "skipped.parquet", ["id", "reason"]).to_pydict()
        skipped = count_skipped(records["reason"])
        if skipped:
            log(f"encode: skipped {sum(skipped.values())} unusable rows {skipped} (listed in skipped.parquet)")
        damaged = [i for i in records["id"] if "/<damaged after " in i]
        if damaged:  # a tar holds no index: how many samples followed the damage is unknown
            log(f"warning: {len(damaged)} tar shard(s) are damaged; each counts as one skipped row, and the samples "
                f"after the damage are lost uncounted (e.g. {damaged[0]})")
        store.mark_stage_finished(run_dir, "encode", encode_key, take_nodes("encode"), images=encoded,
                                  latent_shape=latent_shape, skipped=skipped, colour_images=colour)
        record_stage(run_dir, "encode", files)
    else:
        encoded, skipped = marker["images"], marker.get("skipped", {})
        colour = marker.get("colour_images", encoded)  # latents encoded before colour was counted: as colour
        log(f"encode: reusing {encoded} latents from an earlier run")
    mode = config.decode.color_mode
    grey = mode == "grey" or (mode == "auto" and colour == 0)
    if grey and mode == "auto":
        log("encode: every image is grey, so the decoded images are written grey (decode.color_mode=rgb keeps "
            "colour)")
    return Encoded(encode_key, latents_dir, int(encoded), skipped, grey)


# The decode settings the invert stage depends on (quantize.space=noise): they name t and condition the climb.
INVERT_KEYS = ("decode.strength", "decode.num_steps", "decode.inversion_guidance", "decode.negative_prompt",
               "decode.class_ids")


def invert_identity(config: DistillConfig) -> tuple:
    """The values of INVERT_KEYS: what makes one inversion differ from another."""
    return tuple(getattr(config.decode, key.split(".", 1)[1]) for key in INVERT_KEYS)


def invert_stage(config: DistillConfig, run_dir, prior: PreparedPrior, encoded: Encoded) -> Encoded:
    """quantize.space=noise: every latent DDIM-inverted to the decode strength's timestep (engine/invert.py), once
    per (latents, prior, decode schedule), into run_dir/inverted/<key>/ in the latents' layout -> the Encoded the
    quantize stage reads in place of the latents. In the latent space, `encoded` itself."""
    import dataclasses

    from engine.ray.cluster import saw_nodes, take_nodes
    from engine.ray.invert import invert_classes

    if config.quantize.space == "latent":
        return encoded
    d = config.decode
    invert_key = config_hash(encoded.key, *invert_identity(config))
    inverted_dir = location(run_dir) / "inverted" / invert_key
    if store.finished_stage(run_dir, "invert", invert_key) is None:
        class_dirs = store.class_latent_dirs(encoded.latents_dir)
        steps = max(1, round(d.num_steps * d.strength))
        log(f"inverting {encoded.images} latents of {len(class_dirs)} classes to the state at strength {d.strength:g} "
            f"({steps} denoiser steps each, inversion guidance {d.inversion_guidance:g}, "
            f"{config.runtime.decode_actors} actor(s))")
        records = invert_classes(config, prior.folder, class_dirs, inverted_dir, prior.class_names, log)
        saw_nodes("invert", (r["node"] for r in records))
        files = {r["file"]: {"sha256": r["sha256"], "bytes": int(r["bytes"])} for r in records}
        store.mark_stage_finished(run_dir, "invert", invert_key, take_nodes("invert"), classes=len(records))
        record_stage(run_dir, "invert", files)
    return dataclasses.replace(encoded, key=invert_key, latents_dir=inverted_dir)


def quantize_stage(config: DistillConfig, run_dir, encoded: Encoded) -> Quantized:
    """Quantize once per (latents, quantizer config) into run_dir/quantized/<key>/ (one set of files per class)
    -> its key and that folder; the per-class statistics go to run_dir/quantization.parquet. centroids.parquet
    lists every centroid's weights and count, not its latent: the latents stay in the class files, which the
    decode stage reads class by class."""
    from engine.quantize.class_task import gather_centroid_weights
    from engine.ray.cluster import take_nodes
    from engine.ray.quantize import quantize_classes

    quantize_key = config_hash(encoded.key, config.quantize)
    quantized_dir = location(run_dir) / "quantized" / quantize_key
    if store.finished_stage(run_dir, "quantize", quantize_key) is None:
        class_dirs = store.class_latent_dirs(encoded.latents_dir)
        log(f"quantizing {len(class_dirs)} classes at IPC {list(config.quantize.ipc)} on "
            f"{config.runtime.quantize_actors} actors")
        stats, files = quantize_classes(config, class_dirs, quantized_dir, log)
        weights = gather_centroid_weights(quantized_dir, sorted(class_dirs))
        store.atomic_write_table(run_dir / "centroids.parquet", weights)
        store.atomic_write_table(run_dir / "quantization.parquet", stats)
        store.mark_stage_finished(run_dir, "quantize", quantize_key, take_nodes("quantize"), classes=len(class_dirs),
                                  grey=encoded.grey)
        record_stage(run_dir, "quantize", files)
    return Quantized(quantize_key, quantized_dir, encoded.grey)


def finish_run_folder(config: DistillConfig, run_dir, quantize_key: str, results_folder: str | None,
                      invert_key: str | None = None) -> None:
    """Drop the engine's outputs of other configurations (left by --overwrite), so the folder's sets and its
    manifest are this run's alone."""
    from engine.evaluate.sets import requested_sets, set_dir
    from engine.io.run_folder import Keep, prune_run_folder

    sets = frozenset(set_dir(run_dir, key).name for key in requested_sets(config))
    results_key = results_folder.split("/", 1)[1] if results_folder else None
    removed = prune_run_folder(run_dir, Keep(sets, quantize_key, results_key, invert_key))
    if removed:
        log(f"removed {len(removed)} output folder(s) of the configuration this run replaced: {removed[:5]}")


def run(config: DistillConfig, until: str = "evaluate", overwrite: bool = False) -> dict:
    """The whole run: every stage up to `until`, then metrics.json, report.html and manifest.json."""
    from engine.checks import check_run_inputs
    from engine.config import RunError
    from engine.data.sources import class_names
    from engine.io.manifest import write_manifest
    from engine.io.run_folder import check_run_folder, save_config
    from engine.ray.cluster import cluster_span, init_ray
    from engine.report.run_report import write_report

    span = cluster_span(config.runtime)  # joins the cluster the job was pointed at; starts nothing otherwise
    check_cluster_places(config, span.nodes, span.address)  # before anything is read, written or started
    check_run_inputs(config, class_names(config.data), until)
    check_run_folder(config, overwrite)  # another run's files, or foreign ones: refused (or cleared) up front
    store.start_ledger()  # this process's writes are recorded for the manifest (engine/io/manifest.py)
    try:  # an unreachable object store or a missing bucket is one sentence, before any work
        run_dir = config.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    except OSError as error:
        raise RunError(f"cannot write the run folder under runs_dir={config.runs_dir}: {error}") from error
    timings: dict[str, float] = {}
    with timed(timings, "prior"):
        prior = prepare_prior(config)
    init_ray(config.runtime)
    with timed(timings, "encode"):
        encoded = encode_stage(config, run_dir, prior)
    config = resolve_channels(config, encoded.grey)
    if config.quantize.space == "noise":
        with timed(timings, "invert"):
            encoded = invert_stage(config, run_dir, prior, encoded)
    with timed(timings, "quantize"):
        quantized = quantize_stage(config, run_dir, encoded)
        stats = store.read_table(run_dir / "quantization.parquet").to_pandas()
    names = prior.class_names
    # Documented behaviour: a class with no usable image gets no distilled images; the run goes on and says so.
    empty_classes = [names[c] for c in range(len(names)) if c not in set(stats.label)]
    if empty_classes:
        log(f"warning: {len(empty_classes)} class(es) have no usable images and get no distilled images: "
            f"{empty_classes[:10]}")

    # Decode, the real-image baselines, then every student (as far as `until`).
    results: list[dict] = []
    measured: dict = {}
    if until != "quantize":  # NaN/Inf centroids are stopped by the decoder, named by class and IPC
        results = decode_and_evaluate(config, run_dir, prior, quantized, timings, until=until,
                                      train_rows=encoded.images, measured=measured)

    quantization = {
        f"ipc{ipc}": {
            "distortion": float(part.distortion.mean()),
            **{f"w2_{m}": float(part[f"w2_{m}"].mean()) for m in ("uniform", "mass", "sqrt")},
            "w2_reduction_mass": float((1 - part.w2_mass / part.w2_uniform).mean()),
            "w2_reduction_sqrt": float((1 - part.w2_sqrt / part.w2_uniform).mean()),
            # DDOQ (the engine's centroids, mass weights) against D4M as its code runs (MiniBatchKMeans, uniform).
            "d4m_distortion": float(part.d4m_distortion.mean()), "w2_d4m": float(part.w2_d4m.mean()),
            "w2_reduction_mass_vs_d4m": float((1 - part.w2_mass / part.w2_d4m).mean()),
        }
        for ipc, part in stats.groupby("ipc")
    }
    counts = {"images_read": encoded.images + sum(encoded.skipped.values()), "images_encoded": encoded.images,
              "skipped": encoded.skipped, "classes": int(stats.label.nunique()), "empty_classes": empty_classes}
    metrics = {"results": results, **measured, "quantization": quantization,
               "timings_s": {k: round(v, 2) for k, v in timings.items()}, "counts": counts}
    store.atomic_write_json(run_dir / "metrics.json", metrics)
    invert_key = encoded.key if config.quantize.space == "noise" else None
    finish_run_folder(config, run_dir, quantized.key, measured.get("results_folder"), invert_key)
    try:
        log(f"report: {write_report(run_dir)}")
    except Exception as error:  # noqa: BLE001 - a figure must never take a finished run down; the numbers are written
        log(f"warning: the report could not be written ({error.__class__.__name__}: {error}); metrics.json holds "
            f"every number")
    write_manifest(run_dir)  # last: from the writers' records (report included), to compare runs, detect changes
    return metrics
