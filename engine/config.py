"""Run configuration: one frozen dataclass per stage, nested in `DistillConfig`.

YAML file -> dict -> dotted overrides (`quantize.ipc=10`) -> validated, frozen `DistillConfig`.
Unknown keys, wrong types and out-of-range values raise `ConfigError` naming the offending key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration file or override that cannot be accepted, with the dotted key that caused it."""


class RunError(ValueError):
    """A run that cannot start or go on, for a reason the user can fix; the job prints it without a traceback."""


@dataclass(frozen=True)
class DataConfig:
    # "digits": scikit-learn's embedded digits. Files under `path` (a local folder or a URI), see engine/data/formats/:
    # "parquet": Hugging-Face-style shards <split>-*.parquet; "imagefolder": torchvision's tree
    # <path>/<train|val>/<class folder>/<image>; "webdataset": [<prefix>-]<split>-<n>.tar shards of samples
    # <key>.<jpg|png|...> + <key>.cls. Split "test" reads val (else validation, else test) of the latter two.
    source: Literal["digits", "parquet", "imagefolder", "webdataset"] = "digits"
    path: str = ""
    name: str = "digits"
    image_size: int = 16
    # digits only: held-out fraction of a seeded stratified split (file sources bring their own test split).
    test_fraction: float = 0.2
    # The validation split every choice is scored on (engine/data/splits.py): this fraction of the train rows, by a
    # seeded coin per row id; never used to train the prior, the teacher or any student. split_seed seeds both.
    # 0: no validation split (reading and distilling only; the evaluation refuses to start without one).
    val_fraction: float = 0.1
    split_seed: int = 0
    # Undecodable rows (corrupt, truncated, empty, too large, bad label) are skipped and counted; the job fails,
    # naming the first bad rows, when more than this fraction of the rows read is skipped.
    max_skip_fraction: float = 0.01
    # Images whose header claims more pixels are skipped before decompression (PIL's decompression-bomb limit).
    max_image_pixels: int = 89_478_485
    # How a decoded image becomes image_size x image_size (engine.data.images.to_rgb_square): "squash" resizes it whole,
    # without cropping (a non-square image is distorted); "center_crop" resizes its shorter side to
    # round(image_size * 256 / 224) and takes the centre square (the standard ImageNet evaluation transform,
    # "resize 256, center-crop 224" at 224 px); "auto" is center_crop at image_size >= 128, squash below (digits,
    # MNIST-likes). It applies at whatever size a stage decodes to (the prior's 512 for sd15: the same 87.5 % centre).
    resize: Literal["auto", "squash", "center_crop"] = "auto"
    # A file (ImageFolder) or tar member bigger than this is skipped as too_large without being read whole.
    max_image_bytes: int = 64 * 2**20
    # ImageFolder: follow symbolic links that lead out of data.path (links inside it are always followed, loops
    # never). Off by default: a link to / would walk the whole filesystem.
    follow_symlinks: bool = False
    # A classes.txt whose display names replace the data's own (same classes, same order), e.g. ImageNet-1K's
    # readable names for the sd15 prompts (configs/imagenet1k_classes.txt) when the data lists bare synsets.
    classes_file: str = ""


@dataclass(frozen=True)
class PriorConfig:
    # "tiny": trained by the engine; "sd15" / "dit": Stable Diffusion v1.5 / DiT-XL/2 from a local diffusers folder.
    kind: Literal["tiny", "sd15", "dit"] = "tiny"
    # A diffusers-format folder; empty = the engine's cache, trained on first use (tiny only).
    path: str = ""
    # sd15/dit: which weight files of the folder to load (engine/priors/base.py). "auto": the full-precision files
    # (no suffix) where a component has them, else its only variant (a download of *.fp16.safetensors alone);
    # "none": only the files without a suffix; a name such as "fp16": diffusion_pytorch_model.fp16.safetensors etc.
    # Weights are upcast to float32 on load either way; runtime.prior_dtype sets what the networks run in.
    variant: str = "auto"
    vae_channels: tuple[int, ...] = (16, 32)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64)
    # Self-attention in the UNet's lowest block and middle; off for the tiny default (CPU time).
    unet_attention: bool = False
    vae_steps: int = 400
    unet_steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 1e-3
    kl_weight: float = 1e-4
    # Probability of replacing the class by the null class while training, so classifier-free guidance works.
    class_dropout: float = 0.1
    # The tiny prior trains on a seeded, class-stratified sample of at most this many train images (streamed from
    # the source, never the whole split in memory); 0 = every image (small sets only).
    train_images: int = 60_000
    num_train_timesteps: int = 1000
    # What the UNet predicts: the noise ("epsilon") or v = alpha·noise − sigma·latent ("v_prediction", Salimans &
    # Ho 2022: well scaled at every noise level); the scheduler is saved with it, so sampling reads it.
    prediction: Literal["epsilon", "v_prediction"] = "epsilon"
    # Min-SNR loss weighting (Hang et al. 2023): each timestep's loss weighted by min(SNR, gamma) / SNR (epsilon)
    # or / (SNR + 1) (v); 0 = uniform. 5 is the paper's value.
    min_snr_gamma: float = 0.0
    # Exponential moving average of the UNet's weights (decay per step, warmed up as 1 - 1/(10 + step) until it
    # reaches this); the saved prior, so every sample and decode, uses the averaged weights. 0 = off.
    ema_decay: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.kind != "tiny" and not self.path:
            raise ConfigError(f"prior.kind={self.kind} needs prior.path: a local diffusers folder with its weights")
        # A variant is one word of a file name (diffusion_pytorch_model.<variant>.safetensors): a dot or a path
        # would name other files than the ones the folder check looks for.
        if not self.variant.replace("_", "").isalnum() or not self.variant.isascii():
            raise ConfigError(f"prior.variant={self.variant!r} must be auto, none or a variant name such as fp16")


@dataclass(frozen=True)
class EncodeConfig:
    batch_size: int = 256


@dataclass(frozen=True)
class QuantizeConfig:
    ipc: tuple[int, ...] = (1, 10)
    # Where classes are quantized (engine/invert.py): "latent", the VAE's latents, decoded by img2img from the
    # noised centroid; "noise", each latent's DDIM-inverted state at the timestep decode.strength starts from,
    # sampled back deterministically from the centroid (rescaled to its cell's norm), the paper's DDOQ-DiT variant.
    space: Literal["latent", "noise"] = "latent"
    # "lloyd": faiss k-means; "clvq": competitive learning (online, mini-batch), the paper's analysed algorithm.
    algorithm: Literal["lloyd", "clvq"] = "lloyd"
    # "kmeans++": greedy D^2 seeding; "random": K distinct points; "faiss": faiss's own seeded sampling.
    init: Literal["kmeans++", "random", "faiss"] = "kmeans++"
    # Lloyd: at most `niter` iterations, stopping early once 5 iterations improve the objective by < tol (relative).
    niter: int = 50
    tol: float = 1e-6
    # Independent seeded runs (seed, seed + 1, ...); the lowest distortion wins.
    nredo: int = 3
    clvq_epochs: int = 10
    clvq_batch_size: int = 64
    seed: int = 0
    # D4M's quantizer (engine/quantize/d4m.py, the `d4m` sets): partial_fit batches of d4m_km_expand x IPC latents,
    # one pass; 1 is D4M's published ImageNet command.
    d4m_km_expand: int = 1
    # The `random` baseline's subsets per IPC: the student of evaluate seed s trains on draw s mod random_draws, so
    # random's spread and every p-value against it include which images were drawn, as the other sets' spread
    # includes their seeds. 1 = one subset for every seed.
    random_draws: int = 3


@dataclass(frozen=True)
class DecodeConfig:
    guidance_scale: float = 2.0
    # Fraction of the diffusion trajectory replayed from the noised centroid (img2img strength).
    strength: float = 0.5
    # A strength for some IPCs where one does not suit all ({ipc: strength}; IPCs not named use `strength`): at
    # IPC 1 the one centroid of a class is its mean, which a light pass leaves a blurred mean (docs/results.md, "Fashion-MNIST").
    strength_by_ipc: dict[int, float] = field(default_factory=dict)
    num_steps: int = 50
    # quantize.space=noise: the guidance of the DDIM inversion (1 = the class-conditional model alone, the most
    # faithful round trip); decoding from the states uses guidance_scale.
    inversion_guidance: float = 1.0
    # The colour of the decoded images: "auto" writes them grey when every encoded image was grey (R = G = B: the
    # VAE's decoder still adds colour noise such sources never have), "grey" and "rgb" force it.
    color_mode: Literal["auto", "grey", "rgb"] = "auto"
    batch_size: int = 64
    seed: int = 0
    # sd15: the text classifier-free guidance pushes away from (D4M: "cartoon, anime, painting"); "" = unconditional.
    negative_prompt: str = ""
    # dit: the model's class id for each data label (ImageNet-1K: empty = identity); other data needs a mapping.
    class_ids: tuple[int, ...] = ()
    # Speed of the sd15/dit networks (engine/priors/sd15.py NetworkTuning; the tiny prior ignores them):
    # channels_last memory format for the convolutions; SDPA (fused) attention rather than diffusers' classic
    # softmax(QK^T)V; torch.compile of the denoiser: "inductor" generates kernels (minutes of compile, once per
    # actor), "eager" only traces the graph (a check of compilability, e.g. on the CPU). Unmeasured on a GPU
    # here: benchmarks/gpu_check.py measures each, and the defaults should follow its table.
    channels_last: bool = False
    sdpa: bool = True
    compile: Literal["none", "inductor", "eager"] = "none"

    def strength_at(self, ipc: int) -> float:
        """The img2img strength the centroids of a set at this IPC are decoded with."""
        return self.strength_by_ipc.get(ipc, self.strength)


METHODS = ("random", "herding", "kcenter", "d4m", "ddoq", "full")


@dataclass(frozen=True)
class EvaluateConfig:
    # random / herding / kcenter: real images; d4m: D4M's own centroids (engine/quantize/d4m.py), uniform weights;
    # ddoq: the engine's centroids with each weighting of `ddoq_weights` (uniform: the ablation without weights);
    # full: the whole train split. See engine/quantize/baselines.py and engine/evaluate/protocols.py.
    methods: tuple[str, ...] = METHODS
    ddoq_weights: tuple[str, ...] = ("mass", "sqrt")
    # rded (online soft labels), fkd (stored soft labels) or hard (DC/DSA hard labels): engine/evaluate/protocols.py.
    protocol: Literal["rded", "fkd", "hard"] = "rded"
    # Architectures: convnet3 or any timm model name (engine/evaluate/students.py). Every student learns from the teacher.
    teacher: str = "convnet3"
    # A local safetensors state dict of `teacher` for this data; empty = train it on the full split (cached).
    teacher_path: str = ""
    # The students' input scale (engine/evaluate/protocols.py): "imagenet" = ImageNet mean/std (RDED and SRe2L use
    # it for every dataset); "dataset" = the data's own per-channel mean/std, measured on real validation images
    # (DC/DSA's); "symmetric" = x / 127.5 - 1; "auto" = the protocol's reference: dataset for hard, imagenet for
    # rded and fkd. A teacher the engine trains reads imagenet at data.image_size >= 64 and symmetric below,
    # unless this says imagenet or symmetric.
    input_norm: Literal["auto", "imagenet", "symmetric", "dataset"] = "auto"
    # Input channels of the students and of a teacher the engine trains: 1 reads a grey source as DC/DSA do (the
    # first of the three equal channels), 3 reads RGB; 0 = 1 when every encoded image was grey, else 3. A given
    # teacher_path is read with 3.
    channels: int = 0
    # The per-channel mean/std (of pixels in [0, 1]) a given teacher_path was trained with; empty = the timm
    # architecture's pretrained_cfg (its weights' own normalization) at >= 64 px, else input_norm.
    teacher_mean: tuple[float, ...] = ()
    teacher_std: tuple[float, ...] = ()
    # The run stops before any student when the teacher's validation top-1 is below this (a wrongly scaled or
    # wrong teacher labels every batch badly without an error); 0 = off.
    min_teacher_top1: float = 0.0
    students: tuple[str, ...] = ("convnet3",)
    width: int = 32  # ConvNet-3 channels (128 in the classic hard-label tables)
    teacher_epochs: int = 30
    # Epochs over the distilled set; 0 = the protocol's own (rded/fkd 300, hard 1000).
    student_epochs: int = 100
    # A grid of student learning rates (e.g. [0.003, 0.01, 0.03]): every set, `full` included, trains each seed at
    # each; jobs/results.py and the report show the protocol's own rate (fixed) beside, per set, the rate with the
    # best mean validation top-1 (selected; test never chooses). Empty: the protocol's rate alone.
    learning_rates: tuple[float, ...] = ()
    full_epochs: int = 15
    batch_size: int = 64  # the teacher's and `full`'s batch
    # The students' batch; 0 = the protocol's reference: hard 256, fkd 1024, rded 10 / 50 / 100 from IPC 1 / 10 /
    # 50 (twice that from 100 classes). Never more than the set.
    student_batch_size: int = 0
    # A student batch size for some IPCs ({ipc: batch}), over student_batch_size.
    batch_size_by_ipc: dict[int, int] = field(default_factory=dict)
    temperature: float = 20.0  # RDED's T with CutMix
    cutmix: bool = True  # rded / fkd only
    flip: bool = False  # off for digits and other orientation-bearing data
    # Validation top-1 is measured and reported (ray.train.report, checkpoint saved) this many times per student.
    reports: int = 5
    # Which weights a student's top-1 is measured with: "last" (the end of training, as DC/DSA report) or
    # "best_val" (those of its best validation report). Rows carry both (top1_last, top1_best_val).
    select: Literal["last", "best_val"] = "last"
    seeds: tuple[int, ...] = (0, 1, 2)
    # auto = bf16 autocast on GPUs (weights and optimizer stay fp32), fp32 on CPUs; fp32 / bf16 force it.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Judge every distilled set with the teacher against real validation images (engine/evaluate/quality.py: class
    # agreement, Fréchet distance, precision / recall) into results/<key>/set_quality.json and the report. Trains
    # the teacher when the protocol has none (hard).
    set_quality: bool = True

    def __post_init__(self):
        if bool(self.teacher_mean) != bool(self.teacher_std):
            raise ConfigError("evaluate.teacher_mean and evaluate.teacher_std go together: give both or neither")



@dataclass(frozen=True)
class RuntimeConfig:
    # 0 = let Ray use every core of the machine (ignored when connecting to a running cluster).
    num_cpus: int = 0
    # Object store of a local Ray, MiB; 0 = Ray's default (30 % of RAM). Every worker maps the store, and the
    # store's pages a worker has touched count in its RSS, up to the store's size.
    object_store_mb: int = 0
    encode_actors: int = 1
    quantize_actors: int = 2
    # GPUs per quantize actor: > 0 runs faiss k-means on the GPU (needs the faiss-gpu build: `pip install .[gpu]`).
    quantize_gpus_per_actor: float = 0.0
    decode_actors: int = 1
    gpus_per_actor: float = 0.0
    # CPUs Ray reserves per encode / decode actor. Their input is read (and their images written) by Ray Data
    # tasks of one CPU each, so a local pool must leave one CPU free: 2 actors on 2 cores take 0.5 each.
    encode_cpus_per_actor: float = 1.0
    decode_cpus_per_actor: float = 1.0
    # torch threads per encode / decode actor; 0 = its CPU reservation rounded up (Ray's OMP_NUM_THREADS).
    encode_threads_per_actor: int = 0
    decode_threads_per_actor: int = 0
    # The encode stage's group-by-class shuffle: through local disk (memory bounded whatever the data size) or,
    # when false, the object store; and its number of hash partitions (at most one per class).
    disk_shuffle: bool = True
    shuffle_partitions: int = 200
    # An encode / decode pool waits this long for all its actors (GPU nodes the autoscaler adds) before failing.
    pool_start_timeout_s: int = 1800
    # Evaluation: each trainer is a Ray Train TorchTrainer of `train_workers` DDP workers; `concurrent_trainers`
    # of them run the student jobs side by side (0 = as many as the cluster's GPUs or CPUs hold, one per job at
    # most). CPUs reserved per worker may be a fraction (the real data streams through Ray Data tasks that need
    # some CPU left); torch threads per worker, 0 = the reservation rounded up.
    train_workers: int = 1
    train_cpus_per_worker: float = 0.75
    train_threads_per_worker: int = 1
    concurrent_trainers: int = 0
    train_use_gpu: bool = False
    # Weights and activations of the prior's networks on the decode/encode actors (bfloat16 on GPUs).
    prior_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Mount points every node of the cluster sees at the same path (NFS, EFS, Filestore, a PVC), e.g. [/mnt/efs]:
    # on several nodes runs_dir, data.path, prior.path and evaluate.teacher_path must be URIs or under one of these
    # (engine/pipeline.py check_cluster_places), and the teacher and prior caches go under such a runs_dir.
    shared_paths: tuple[str, ...] = ()

    def threads(self, stage: str) -> int:
        """torch threads of one `stage` ("encode" / "decode") actor or "train" worker."""
        if stage == "train":
            return self.train_threads_per_worker or max(1, math.ceil(self.train_cpus_per_worker))
        given = getattr(self, f"{stage}_threads_per_actor")
        return given or max(1, math.ceil(getattr(self, f"{stage}_cpus_per_actor")))


@dataclass(frozen=True)
class DistillConfig:
    name: str = "digits"
    runs_dir: str = "runs"
    cache_dir: str = "~/.cache/ddoq"
    data: DataConfig = field(default_factory=DataConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self):
        if self.quantize.space == "noise" and self.decode.strength_by_ipc:
            raise ConfigError("quantize.space=noise inverts every latent once, to the timestep decode.strength names, "
                              "so one strength serves every IPC: set decode.strength_by_ipc={} (and decode.strength "
                              "to the t wanted)")

    @property
    def run_dir(self):
        """runs_dir/name: an absolute local Path (Ray workers run in other working directories), or an ObjectPath
        when runs_dir is an object-store URI (s3://bucket/runs, gs://bucket/runs) that every node reaches."""
        from engine.io.location import location

        return (location(self.runs_dir) / self.name).resolve()

    @property
    def cache_path(self) -> Path:
        return Path(os.path.expanduser(self.cache_dir))


ONE_FOLDER = "must be one folder name (no '/', '..' or leading '.')"
# Value checks beyond types: (predicate, message) per dotted key.
_CHECKS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "name": (lambda v: is_path_component(v), f"{ONE_FOLDER}: runs_dir/name is the run folder"),
    "data.name": (lambda v: is_path_component(v), f"{ONE_FOLDER}: it names the dataset's caches"),
    "data.max_image_bytes": (lambda v: v >= 1, "must be >= 1 (bytes)"),
    "data.image_size": (lambda v: 8 <= v <= 1024 and v % 4 == 0, "must be a multiple of 4 in [8, 1024]"),
    "data.test_fraction": (lambda v: 0.0 < v < 1.0, "must be in (0, 1)"),
    "data.val_fraction": (lambda v: 0.0 <= v <= 0.5, "must be in [0, 0.5]: val is carved from train"),
    "data.max_skip_fraction": (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
    "data.max_image_pixels": (lambda v: v >= 1, "must be >= 1"),
    "prior.vae_steps": (lambda v: v >= 1, "must be >= 1"),
    "prior.unet_steps": (lambda v: v >= 1, "must be >= 1"),
    "quantize.ipc": (lambda v: len(v) > 0 and all(k >= 1 for k in v), "must be one or more integers >= 1"),
    "quantize.niter": (lambda v: v >= 1, "must be >= 1"),
    "quantize.nredo": (lambda v: v >= 1, "must be >= 1"),
    "quantize.tol": (lambda v: v >= 0, "must be >= 0"),
    "quantize.clvq_epochs": (lambda v: v >= 1, "must be >= 1"),
    "quantize.clvq_batch_size": (lambda v: v >= 1, "must be >= 1"),
    "quantize.random_draws": (lambda v: v >= 1, "must be >= 1"),
    "quantize.d4m_km_expand": (lambda v: v >= 1, "must be >= 1"),
    "decode.strength": (lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
    "decode.strength_by_ipc": (lambda v: all(k >= 1 and 0.0 < s <= 1.0 for k, s in v.items()),
                               "must map IPCs >= 1 to strengths in (0, 1]"),
    "decode.guidance_scale": (lambda v: v >= 0.0, "must be >= 0"),
    "decode.inversion_guidance": (lambda v: v >= 0.0, "must be >= 0"),
    "evaluate.learning_rates": (lambda v: all(r > 0 for r in v), "must be learning rates > 0"),
    "evaluate.channels": (lambda v: v in (0, 1, 3), "must be 0 (auto), 1 or 3"),
    "decode.num_steps": (lambda v: v >= 1, "must be >= 1"),
    "prior.class_dropout": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    "prior.min_snr_gamma": (lambda v: v >= 0.0, "must be >= 0 (0 = uniform weighting)"),
    "prior.ema_decay": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1) (0 = no EMA)"),
    "evaluate.seeds": (lambda v: len(v) > 0, "must list at least one seed"),
    "evaluate.methods": (lambda v: len(v) > 0 and set(v) <= set(METHODS),
                         f"must be a non-empty subset of {', '.join(METHODS)}"),
    "evaluate.ddoq_weights": (lambda v: len(v) > 0 and set(v) <= {"mass", "sqrt", "uniform"},
                              "must be a non-empty subset of mass, sqrt, uniform"),
    "evaluate.students": (lambda v: len(v) > 0, "must list at least one architecture"),
    "evaluate.student_epochs": (lambda v: v >= 0, "must be >= 0 (0 = the protocol's default)"),
    "evaluate.reports": (lambda v: v >= 1, "must be >= 1"),
    "evaluate.batch_size": (lambda v: v >= 1, "must be >= 1"),
    "evaluate.student_batch_size": (lambda v: v >= 0, "must be >= 0 (0 = the protocol's reference batch)"),
    "evaluate.batch_size_by_ipc": (lambda v: all(k >= 1 and b >= 1 for k, b in v.items()),
                                   "must map IPCs >= 1 to batch sizes >= 1"),
    "evaluate.teacher_mean": (lambda v: len(v) in (0, 3), "must be empty or 3 channel means"),
    "evaluate.teacher_std": (lambda v: len(v) in (0, 3) and all(x > 0 for x in v), "must be empty or 3 stds > 0"),
    "evaluate.min_teacher_top1": (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1] (0 = off)"),
    "evaluate.temperature": (lambda v: v > 0, "must be > 0"),
    "runtime.train_workers": (lambda v: v >= 1, "must be >= 1"),
    "runtime.train_cpus_per_worker": (lambda v: v > 0, "must be > 0"),
    "runtime.train_threads_per_worker": (lambda v: v >= 0, "must be >= 0 (0 = the CPU reservation)"),
    "runtime.concurrent_trainers": (lambda v: v >= 0, "must be >= 0 (0 = as many as the cluster holds)"),
    "runtime.encode_actors": (lambda v: v >= 1, "must be >= 1"),
    "runtime.decode_actors": (lambda v: v >= 1, "must be >= 1"),
    "runtime.encode_cpus_per_actor": (lambda v: v > 0, "must be > 0"),
    "runtime.decode_cpus_per_actor": (lambda v: v > 0, "must be > 0"),
    "runtime.encode_threads_per_actor": (lambda v: v >= 0, "must be >= 0 (0 = the CPU reservation)"),
    "runtime.decode_threads_per_actor": (lambda v: v >= 0, "must be >= 0 (0 = the CPU reservation)"),
    "runtime.shuffle_partitions": (lambda v: v >= 1, "must be >= 1"),
    "runtime.object_store_mb": (lambda v: v == 0 or v >= 80, "must be 0 (Ray's default) or >= 80"),
    "prior.train_images": (lambda v: v >= 0, "must be >= 0 (0 = every train image)"),
    "runtime.shared_paths": (lambda v: all(p.startswith("/") and "://" not in p for p in v),
                             "must list absolute mount points such as /mnt/efs (URIs need no declaring)"),
}


def is_path_component(name: str) -> bool:
    """A single, ordinary folder name: what runs_dir/name and cache paths may be built from."""
    return bool(name) and name not in (".", "..") and not name.startswith(".") and "/" not in name \
        and "\\" not in name and "\0" not in name and not os.path.isabs(name)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field annotation and convert YAML lists to tuples; raise ConfigError otherwise."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(annotation, value, key + ".")
    if origin is Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(annotation))}")
        return value
    if origin is tuple:
        item_type = typing.get_args(annotation)[0]
        items = value if isinstance(value, (list, tuple)) else [value]  # `quantize.ipc=10` means (10,)
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(items))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(annotation)
        # JSON round trips (a sweep's base config) and dotted overrides (`decode.strength_by_ipc.1=0.7`) make
        # integer keys strings: read them back as the integers they were.
        return {_coerce(int(k) if key_type is int and isinstance(k, str) and k.lstrip("-").isdigit() else k,
                        key_type, f"{key}.{k}"): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in configs")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(prefix + u for u in unknown)}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        key = prefix + name
        kwargs[name] = _coerce(value, hints[name], key)
        if key in _CHECKS and not _CHECKS[key][0](kwargs[name]):
            raise ConfigError(f"{key}={kwargs[name]!r} {_CHECKS[key][1]}")
    return cls(**kwargs)


def apply_override(values: dict, override: str) -> None:
    """Set `a.b.c=value` (value parsed as YAML) in a nested dict, in place."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.path=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = (),
                values: dict | None = None) -> DistillConfig:
    """From a YAML file, or from a nested dict (`values`, e.g. a sweep's base config), then the overrides."""
    values = json.loads(json.dumps(values or {}))  # a deep copy: overrides edit it in place
    if path is not None:
        text = Path(path).read_text()
        values = yaml.safe_load(text) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for override in overrides:
        apply_override(values, override)
    return _resolve_paths(_build(DistillConfig, values))


def _resolve_paths(config: DistillConfig) -> DistillConfig:
    """Make local data/prior paths absolute now: Ray workers run in other working directories."""

    def absolute(path: str) -> str:
        return path if not path or "://" in path else str(Path(os.path.expanduser(path)).resolve())

    return dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, path=absolute(config.data.path),
                                 classes_file=absolute(config.data.classes_file)),
        prior=dataclasses.replace(config.prior, path=absolute(config.prior.path)),
        evaluate=dataclasses.replace(config.evaluate, teacher_path=absolute(config.evaluate.teacher_path)),
    )


def config_to_dict(config: Any) -> dict:
    """Plain nested dict with lists instead of tuples (YAML/JSON friendly)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_hash(*parts: Any) -> str:
    """Stable short hash of config sections (dataclasses or plain values): the cache key of a stage."""
    blob = json.dumps([config_to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
