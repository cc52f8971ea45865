"""Train teachers and students on image sets and measure top-1 on the held-out split. Pure torch.

Images are (N, H, W, 3) uint8 and stay uint8 until a batch is drawn: only a batch is ever float, on the worker's
device. The Ray layer passes `wrap_model` (DDP), its worker `rank`/`world`/`device` (`Worker`) and where to report
and checkpoint (`Reporting`); this module knows nothing about Ray.

Two loops. `fit` trains on a set held in memory (a distilled set: IPC x classes images): every worker draws the same
global batch plan from the same seeded generator and augments only its own rows (rank::world) of it on its device,
so the gradient DDP averages is the gradient of the global batch, and the result does not depend on the worker
count beyond float rounding. `fit_stream` trains on a split that never sits in one process (the teacher, `full`):
each epoch the worker reads its shard of the split as a stream of uint8 batches and augments them on its device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import EvaluateConfig
from engine.evaluate.protocols import (EpochOrder, InputNorm, Protocol, apply_plan, attach_input_norm, dataset_norm,
                                       get_protocol, input_norm_of, make_optimizer, network_norm, plan_batch,
                                       standardize, steps_per_pass, student_norm, teacher_channels, teacher_norm,
                                       weighted_ce_loss, weighted_kd_loss)
from engine.evaluate.students import create_student
from engine.io.store import atomic_write_bytes


@dataclass(frozen=True)
class TrainSet:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64
    weights: np.ndarray  # (N,) float, averaging 1 per class


@dataclass(frozen=True)
class Worker:
    """Where this process sits in a data-parallel group, the device it was given, and how to wrap its model."""
    rank: int = 0
    world: int = 1
    wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m
    device: str | torch.device = "cpu"


def writable_tensor(array: np.ndarray) -> torch.Tensor:
    """The array as a tensor, sharing its memory; a read-only one (e.g. shared through Ray's object store) is
    copied first, since torch cannot wrap it."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def image_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) uint8, a view (no float copy of a set)."""
    return writable_tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def batch_tensor(images) -> torch.Tensor:
    """A streamed batch's images (b, H, W, 3), a tensor already (Ray Data's torch batches) or an array; a
    read-only one (a slice of a set Ray shared through its object store) is copied, a batch at a time."""
    return images if isinstance(images, torch.Tensor) else writable_tensor(np.asarray(images))


def precision_context(device: torch.device | str, precision: str):
    """bf16 autocast on CUDA ("auto" or "bf16"; the weights and optimizer stay fp32), or on CPU when asked;
    fp32 otherwise."""
    device = torch.device(device)
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def on_device_layout(x: torch.Tensor) -> torch.Tensor:
    """channels_last on CUDA, where convolutions (cuDNN, bf16) run faster in it; CPU batches stay as they are."""
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


def new_model(arch: str, num_classes: int, image_size: int, width: int, worker: Worker,
              norm: InputNorm | None = None) -> nn.Module:
    """A network for this worker reading [-1, 1] batches at its input scale `norm` (None: the default
    evaluate.input_norm's at this size): on its device (channels_last on CUDA), wrapped (DDP under Ray Train)."""
    norm = norm or network_norm(EvaluateConfig(), image_size)
    model = create_student(arch, num_classes, image_size, width, channels=len(norm.mean))
    model = attach_input_norm(model, norm).to(worker.device)
    if torch.device(worker.device).type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return worker.wrap_model(model)


def epochs_to_steps(n: int, epochs: int, batch_size: int) -> int:
    """Steps of `epochs` passes over n rows (`EpochOrder`'s batches)."""
    return max(1, epochs * steps_per_pass(n, batch_size))


def student_epochs(config: EvaluateConfig) -> int:
    return config.student_epochs or get_protocol(config.protocol).default_epochs


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


@dataclass(frozen=True)
class Recipe:
    """How a loop trains: the protocol (optimizer, schedule, augmentation), the evaluate settings it reads (batch
    size, flip, CutMix, precision), the seed of its draws and the data's mean/std (hard's input scale; None:
    measured on the set itself)."""
    protocol: Protocol
    config: EvaluateConfig
    seed: int
    data_norm: InputNorm | None = None


def student_recipe(config: EvaluateConfig, seed: int, data_norm: InputNorm | None = None) -> Recipe:
    """A student's training under `config.protocol`."""
    return Recipe(get_protocol(config.protocol), config, seed, data_norm)


@dataclass(frozen=True)
class Reporting:
    """When a loop calls back and where it saves: `report(step, model)` at `reports` evenly spaced points (the last
    at the run's end; 0: never), and, when `checkpoint` is given, the run saved there (rank 0) at each point but
    the last, so a killed job resumes from its last report with the draws it would have made."""
    report: Callable[[int, nn.Module], None] | None = None
    reports: int = 0
    checkpoint: Path | None = None

    def interval(self, units: int) -> int:
        """Units (steps or epochs) between reports over a run of `units`; 0 without reports."""
        return max(1, units // self.reports) if self.reports else 0


@dataclass(frozen=True)
class Targets:
    """What a student learns from besides its labels: the teacher (rded labels each augmented batch online) or its
    stored logits (fkd: `SoftLabels`, written by `generate_soft_labels` with the same seed); hard uses neither."""
    teacher: nn.Module | None = None
    soft_labels: SoftLabels | None = None


@dataclass(frozen=True)
class Stream:
    """A split read as a stream: `epoch_batches(epoch)` yields this worker's rows of one epoch as
    {"image": (b, H, W, 3) uint8, "label": (b,)}, about `rows_per_worker` of them, for `epochs` epochs."""
    epoch_batches: Callable[[int], Iterable[dict]]
    rows_per_worker: int
    epochs: int


class Batch(NamedTuple):
    """One step's input on the worker's device."""
    x: torch.Tensor  # (b, 3, H, W) float
    y: torch.Tensor  # (b,) int64
    w: torch.Tensor  # (b,) float, the rows' weights


@dataclass
class _Run:
    """A loop's mutable state: what a checkpoint holds besides the position."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator

    def write_checkpoint(self, checkpoint: Path, **position) -> None:
        """Everything a killed job needs to go on as if it had not stopped (atomically: local or object store)."""
        state = {"model": _unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                 "schedule": self.schedule.state_dict(), "generator": self.generator.get_state(), **position}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(checkpoint, buffer.getvalue())

    def resume(self, checkpoint: Path | None) -> dict:
        """The saved position ({} when there is nothing to resume), the state restored."""
        if checkpoint is None or not checkpoint.exists():
            return {}
        state = torch.load(io.BytesIO(checkpoint.read_bytes()), weights_only=True)
        _unwrap(self.model).load_state_dict(state.pop("model"))
        self.optimizer.load_state_dict(state.pop("optimizer"))
        self.schedule.load_state_dict(state.pop("schedule"))
        self.generator.set_state(state.pop("generator"))
        return state

    def step(self, batch: Batch, loss_fn: Callable, step: int, rows: slice, precision: str) -> None:
        with precision_context(batch.x.device, precision):
            loss = loss_fn(self.model(batch.x), batch.x, batch.y, batch.w, step, rows)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()

    def finished(self, reporting: Reporting, rank: int, position: tuple[str, int, int], step: int) -> None:
        """`position` = (unit, done, total): after unit `done` of `total` (a step or an epoch), at a report point,
        checkpoint (rank 0; not after the last unit: the job's result takes its place), then report at `step`."""
        unit, done, total = position
        every = reporting.interval(total)
        if not every or (done % every and done != total):
            return
        if reporting.checkpoint is not None and done < total and rank == 0:
            self.write_checkpoint(reporting.checkpoint, **{unit: done})
        if reporting.report is not None:
            reporting.report(step, _unwrap(self.model))
            self.model.train()


def fit(model: nn.Module, data: TrainSet, steps: int, recipe: Recipe, loss_fn: Callable, worker: Worker = Worker(),
        reporting: Reporting = Reporting()) -> nn.Module:
    """The loop over a set in memory. `loss_fn(logits, x, labels, weights, step, rows)` on this worker's rows;
    reports and checkpoints fall on steps (`reporting`)."""
    config = recipe.config
    images, labels = image_tensor(data.images), torch.as_tensor(data.labels)
    weights = torch.as_tensor(data.weights, dtype=torch.float32)
    run = _Run(model, *make_optimizer(recipe.protocol, model, steps), torch.Generator().manual_seed(recipe.seed))
    device, norm = next(model.parameters()).device, input_norm_of(model)
    order = EpochOrder(recipe.seed, len(images), config.batch_size)
    smallest = min(b - a for a, b in zip(order.bounds, order.bounds[1:]))
    if smallest < worker.world:
        raise ValueError(f"a batch of {smallest} of the set's {len(images)} images (batch size {config.batch_size}) "
                         f"cannot be split over {worker.world} workers")
    start = int(run.resume(reporting.checkpoint).get("step", 0))
    model.train()
    mine = slice(worker.rank, None, worker.world)
    for step in range(start, steps):
        plan = plan_batch(recipe.protocol, run.generator, order.rows(step), images.shape[-1], config.flip,
                          config.cutmix)
        x, w = apply_plan(images, weights, plan, rows=mine, device=device, norm=norm)  # this worker's rows
        y = labels[plan["index"][mine]].to(device)
        run.step(Batch(on_device_layout(x), y, w), loss_fn, step, mine, config.precision)
        run.finished(reporting, worker.rank, ("step", step + 1, steps), step + 1)
    return model.eval()


def stream_steps(rows_per_worker: int, batch_size: int, world: int) -> tuple[int, int]:
    """(steps per epoch, local batch) of a streamed split: each of `world` workers reads its equal share in
    batches of batch_size / world rows, the last one of an epoch partial."""
    local = max(1, batch_size // world)
    return max(1, -(-rows_per_worker // local)), local


def timed_epochs(epoch_batches: Callable[[int], Iterable[dict]], seconds: list[float]
                 ) -> Callable[[int], Iterable[dict]]:
    """`epoch_batches`, appending each finished epoch's wall time (reading and training its batches) to `seconds`.
    A stream's first epoch also pays for starting its read and decode workers, so throughput is worth reading
    per epoch: the first (start-up included) apart from the rest (steady state)."""
    def timed(epoch: int):
        start = time.perf_counter()
        yield from epoch_batches(epoch)
        seconds.append(time.perf_counter() - start)

    return timed


def steady_images_per_s(rows: int, seconds: list[float]) -> float | None:
    """Images/s over the epochs after the first (None with fewer than two): the steady-state rate of a stream."""
    return rows * (len(seconds) - 1) / sum(seconds[1:]) if len(seconds) > 1 else None


def fit_stream(model: nn.Module, stream: Stream, recipe: Recipe, loss_fn: Callable, worker: Worker = Worker(),
               reporting: Reporting = Reporting()) -> nn.Module:
    """The loop over a streamed split (the teacher, `full`); Ray Data gives each worker its shard of the split,
    reshuffled each epoch. Every worker reads the same number of rows (Ray Train splits a dataset equally), so DDP
    steps stay in lockstep. Each row is seen once per epoch; crops, flips and CutMix are drawn per batch from a
    generator seeded by (seed, rank) and applied on the worker's device. The schedule spans the stream's epochs x
    the steps of its `rows_per_worker` (an estimate is fine: a few skipped rows end the cosine a little early).
    Reports and checkpoints fall on epoch ends, and a killed job resumes at its last checkpointed epoch."""
    config = recipe.config
    steps_per_epoch, _ = stream_steps(stream.rows_per_worker, config.batch_size, worker.world)
    run = _Run(model, *make_optimizer(recipe.protocol, model, stream.epochs * steps_per_epoch),
               torch.Generator().manual_seed(recipe.seed * 7919 + worker.rank))
    device = next(model.parameters()).device
    start = int(run.resume(reporting.checkpoint).get("epoch", 0))
    step = start * steps_per_epoch
    model.train()
    for epoch in range(start, stream.epochs):
        for batch in stream.epoch_batches(epoch):
            images = batch_tensor(batch["image"]).permute(0, 3, 1, 2)  # (b, 3, H, W) uint8, the wire's dtype
            b = len(images)
            # a stream is read once per epoch in its own order: the batch is its rows as they come
            plan = plan_batch(recipe.protocol, run.generator, torch.arange(b), images.shape[-1], config.flip,
                              config.cutmix)
            x, w = apply_plan(images, torch.ones(b), plan, device=device, norm=input_norm_of(model))
            y = torch.as_tensor(np.asarray(batch["label"]), dtype=torch.int64).to(device)
            run.step(Batch(on_device_layout(x), y, w), loss_fn, step, slice(None), config.precision)
            step += 1
        done = epoch + 1
        run.finished(reporting, worker.rank, ("epoch", done, stream.epochs), done * steps_per_epoch)
    return model.eval()


def teacher_loss(logits, _x, y, _w, _step, _rows):
    return F.cross_entropy(logits, y)


def teacher_recipe(config: EvaluateConfig, seed: int = 0) -> Recipe:
    """The teacher's training: cross-entropy, AdamW and cosine of the crop protocol, crop/flip, no CutMix."""
    return Recipe(get_protocol("rded"), dataclasses.replace(config, cutmix=False), seed)


def student_loss(protocol: Protocol, teacher: nn.Module | None, config: EvaluateConfig,
                 soft_labels: SoftLabels | None = None) -> Callable:
    """The loss of a student under `protocol`: weighted CE (hard), KD on the teacher's logits of this very
    augmented batch (rded), or on the stored logits of this step (fkd)."""
    def loss_fn(logits, x, y, w, step, rows):
        if not protocol.soft_labels:
            return weighted_ce_loss(logits, y, w)
        if protocol.stored_labels:
            target = soft_labels.logits(step)[rows].to(logits.device, torch.float32)
        else:
            with torch.no_grad():
                target = teacher(x)
        return weighted_kd_loss(logits, target, w, config.temperature)

    return loss_fn


def train_student(data: TrainSet, targets: Targets, num_classes: int, arch: str, epochs: int, recipe: Recipe,
                  worker: Worker = Worker(), reporting: Reporting = Reporting(reports=10)) -> nn.Module:
    """Train `arch` on `data` under `recipe` (`student_recipe`) for `epochs` epochs of the set, learning from
    `targets` as the protocol says: rded's teacher, fkd's stored logits (all of the run's steps), hard's labels
    alone (a teacher given is ignored). Reports fall on steps, at least one (at the end)."""
    protocol, config = recipe.protocol, recipe.config
    torch.manual_seed(recipe.seed)
    size = data.images.shape[1]
    data_norm = recipe.data_norm or dataset_norm(data.images)
    model = new_model(arch, num_classes, size, config.width, worker, student_norm(config, size, data_norm))
    steps = epochs_to_steps(len(data.labels), epochs, config.batch_size)
    teacher, soft_labels = targets.teacher, targets.soft_labels
    if protocol.stored_labels and (soft_labels is None or soft_labels.steps != steps):
        raise ValueError(f"protocol fkd needs stored soft labels for all {steps} steps (generate_soft_labels)")
    if protocol.soft_labels and not protocol.stored_labels and teacher is None:
        raise ValueError(f"protocol {protocol.name} needs a teacher")
    if teacher is not None:
        teacher.eval()
    reporting = dataclasses.replace(reporting, reports=max(1, reporting.reports))
    return fit(model, data, steps, recipe, student_loss(protocol, teacher, config, soft_labels), worker, reporting)


def load_teacher(path_or_bytes: str | Path | bytes, architecture: str, num_classes: int, image_size: int,
                 width: int, device: str | torch.device, config: EvaluateConfig | None = None) -> nn.Module:
    """A teacher from a safetensors state dict (a local path, anything with `read_bytes()` such as an object-store
    path, or the bytes themselves), in eval mode and ON `device`: the student's batches live on the worker's
    device, and a teacher left on the CPU crashes the first soft-label batch on a GPU. It reads [-1, 1] batches at
    its own input scale (engine.evaluate.protocols.teacher_norm of `config`; None: a teacher this engine trained
    under the default evaluate.input_norm)."""
    from safetensors.torch import load

    if isinstance(path_or_bytes, (bytes, bytearray)):
        blob = bytes(path_or_bytes)
    elif hasattr(path_or_bytes, "read_bytes"):
        blob = path_or_bytes.read_bytes()
    else:
        blob = Path(path_or_bytes).read_bytes()
    config = config or EvaluateConfig()
    teacher = create_student(architecture, num_classes, image_size, width, channels=teacher_channels(config))
    teacher.load_state_dict(load(blob))
    attach_input_norm(teacher, teacher_norm(config, image_size, teacher))
    return teacher.to(device).eval().requires_grad_(False)


SOFT_LABEL_CHUNK_STEPS = 256  # steps of stored logits per file: memory is one chunk, never the whole run


class SoftLabels:
    """FKD's stored labels of one (set, seed): the teacher's logits of every step's augmented batch, fp16, in
    files of SOFT_LABEL_CHUNK_STEPS steps (folder/chunk-00000.safetensors, ...) with folder/steps.json written
    last. Read one chunk at a time as the student reaches it. The batches themselves are not stored: the student
    redraws them from the same seed (`plan_batch`), and each chunk keeps the sample indices to prove it."""

    def __init__(self, folder):
        import json

        from engine.io.location import location

        self.folder = location(folder)
        meta = json.loads((self.folder / "steps.json").read_text())
        self.steps, self.chunk_steps = int(meta["steps"]), int(meta["chunk_steps"])
        self._loaded: tuple[int, dict] | None = None

    @staticmethod
    def complete(folder) -> bool:
        from engine.io.location import location

        return (location(folder) / "steps.json").exists()

    def chunk(self, step: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        number = step // self.chunk_steps
        if self._loaded is None or self._loaded[0] != number:
            self._loaded = (number, load((self.folder / f"chunk-{number:05d}.safetensors").read_bytes()))
        return self._loaded[1]

    def _rows(self, name: str, step: int) -> torch.Tensor:
        chunk, at = self.chunk(step), step % self.chunk_steps
        return chunk[name][at][: int(chunk["rows"][at])]

    def logits(self, step: int) -> torch.Tensor:
        return self._rows("logits", step)

    def index(self, step: int) -> torch.Tensor:
        return self._rows("index", step)


def padded(tensors: list[torch.Tensor], fill: float) -> torch.Tensor:
    """Tensors of up to B rows stacked as (len, B, ...), short ones filled with `fill`."""
    rows = max(len(x) for x in tensors)
    out = torch.full((len(tensors), rows, *tensors[0].shape[1:]), fill, dtype=tensors[0].dtype)
    for i, x in enumerate(tensors):
        out[i, : len(x)] = x
    return out


@torch.no_grad()
def generate_soft_labels(data: TrainSet, teacher: nn.Module, epochs: int, config: EvaluateConfig, seed: int,
                         folder) -> SoftLabels:
    """FKD: every batch plan of the run (same generator as `fit` with this seed) and the teacher's logits on it,
    written chunk by chunk into `folder` (see SoftLabels); returns the reader. Deterministic: every rank of a
    data-parallel group would write the same bytes, so rank 0 alone calls it."""
    import json

    from safetensors.torch import save as to_safetensors_bytes

    from engine.io.location import location

    folder = location(folder)
    protocol = get_protocol(config.protocol)
    generator = torch.Generator().manual_seed(seed)
    images, weights = image_tensor(data.images), torch.as_tensor(data.weights, dtype=torch.float32)
    steps = epochs_to_steps(len(data.labels), epochs, config.batch_size)
    order = EpochOrder(seed, len(images), config.batch_size)
    device = next(teacher.parameters()).device
    teacher.eval()
    for first in range(0, steps, SOFT_LABEL_CHUNK_STEPS):
        logits, indices = [], []
        for step in range(first, min(steps, first + SOFT_LABEL_CHUNK_STEPS)):
            plan = plan_batch(protocol, generator, order.rows(step), images.shape[-1], config.flip, config.cutmix)
            x, _ = apply_plan(images, weights, plan, device=device)
            with precision_context(device, config.precision):
                logits.append(teacher(on_device_layout(x)).to(torch.float16).cpu())
            indices.append(plan["index"])
        chunk = {"logits": padded(logits, 0.0), "index": padded(indices, -1),
                 "rows": torch.tensor([len(i) for i in indices])}  # a pass's last batch may be shorter
        atomic_write_bytes(folder / f"chunk-{first // SOFT_LABEL_CHUNK_STEPS:05d}.safetensors",
                           to_safetensors_bytes(chunk))
    atomic_write_bytes(folder / "steps.json",
                       json.dumps({"steps": steps, "chunk_steps": SOFT_LABEL_CHUNK_STEPS}).encode())
    return SoftLabels(folder)


@torch.no_grad()
def model_input(images, device) -> torch.Tensor:
    """uint8 images (b, H, W, 3) -> the standardized (b, 3, H, W) batch a classifier reads, on `device`."""
    return on_device_layout(standardize(batch_tensor(images).permute(0, 3, 1, 2).to(device)))


def count_correct(model: nn.Module, batches: Iterable[tuple], precision: str = "fp32") -> tuple[int, int]:
    """(correct, seen) of `model` over batches of (images (b, H, W, 3) uint8, labels (b,))."""
    model.eval()
    device = next(model.parameters()).device
    correct = seen = 0
    for images, labels in batches:
        x = model_input(images, device)
        with precision_context(device, precision):
            predicted = model(x).argmax(1).cpu()
        correct += int((predicted == torch.as_tensor(np.asarray(labels))).sum())
        seen += len(predicted)
    return correct, seen


def evaluate_top1(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 512) -> float:
    """Top-1 on images held in memory (a report slice, a test); the Ray layer streams held-out splits."""
    batches = ((images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(images), batch_size))
    correct, seen = count_correct(model, batches)
    return correct / max(1, seen)
