"""The GPU check: encode, decode, quantize and training throughput of the engine's pure modules, in one command.

    python benchmarks/gpu_check.py                  # CUDA: the real architectures at random weights, <= 8 min
    python benchmarks/gpu_check.py --dry-run        # the same code at tiny sizes on the CPU (the default test tier)
    python benchmarks/gpu_check.py --dry-run --device cuda   # tiny sizes on a GPU (the `gpu` test tier)

It prints one table (a failing section prints its error there and the others still run; the exit status is 1 if
any did) and a last line
    encode_mfu=<f> decode_s_per_img=<s> quantize_classes_per_s=<r> train_img_per_s=<r> device=<name>
Sections, each with its own time budget (an item that would start past it is listed as skipped):
  peak      bf16 matmul TFLOP/s, measured here: the denominator of every MFU (no spec sheet)
  encode    sd15 VAE encoder at 512^2, bf16, batches 8..64: images/s through prior.encode (uint8 in host memory,
            as the engine feeds it) and through vae.encode on a device tensor; TFLOP/s counted by
            torch.utils.flop_counter.FlopCounterMode on one batch; encode_mfu = best prior.encode TFLOP/s / peak
  sd15      img2img at D4M's settings (strength 0.7 of 50 steps = 35 run, CFG 8, batched CFG, negative prompt),
            batches 8..32, s/image; then at the best batch: classic attention, SDPA, + channels_last,
            + torch.compile of the UNet (the decode.* keys); decode_s_per_img = the best of these
  dit       DiT-XL/2-256, 50 steps from noise (strength 1.0), CFG 4, batches 8..32, s/image
  quantize  1000 synthetic classes (Gaussian mixtures) of 1300 x 4096 on the device, IPC 1/10/50 each, through
            engine.quantize.quantize_class(device="cuda") (faiss-gpu if present, else engine/quantize_torch.py):
            classes/s; and its objective against a CPU quantizer on a few classes, which must agree within 1 %
            (faiss-cpu when it imports, else the torch path on the CPU: the lent machine has no faiss)
  train     ResNet-18 student, protocol rded, teacher LOADED FROM A SAFETENSORS FILE (engine.train.load_teacher),
            50 steps at 224^2, images/s without and with bf16 autocast; every parameter of teacher and student and
            every batch either sees is asserted to be on the device (the teacher-left-on-CPU crash)

On a lent GPU (the `device` tool's `run`; rules in /work/.library/device/README.md). That machine has torch 2.11
(CUDA 13), timm, transformers, safetensors, pyarrow, numpy, scipy, scikit-learn, but no diffusers, ray, faiss or
POT, and a call carries at most 64 MiB of the tree. This script imports only pure engine modules (no Ray, faiss or
POT at import), so diffusers is the one wheel to carry. Here, once, in the repository root:
    echo /.whl/ >> .git/info/exclude
    python3 -m pip download diffusers==0.42.1 --no-deps -d .whl     # 6.4 MB, py3-none-any: fits Python 3.12 there
    python benchmarks/gpu_check.py --dry-run                        # here first: must print no ERROR
then ONE device call with carry [".whl"] and a timeout that leaves room to rerun (the check itself is budgeted to
about 7 minutes plus imports; --budget changes that):
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \\
    PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py 2>&1 | tee $OUT/gpu_check.log
and give the machine back (`give_back`) unless you rerun at once. Never quote a number from a dry run as a GPU one.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.config import DecodeConfig, EvaluateConfig, QuantizeConfig  # noqa: E402

CLASS_NAMES = ("tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray", "stingray",
               "cock", "hen", "ostrich")
D4M = DecodeConfig(strength=0.7, num_steps=50, guidance_scale=8.0, negative_prompt="cartoon, anime, painting")
DIT = DecodeConfig(strength=1.0, num_steps=50, guidance_scale=4.0)

# Tiny stand-ins for the dry run: the same classes and block types as SD v1.5 / DiT-XL/2, small widths.
_SMALL_VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, sample_size=32)


def _small_sd15() -> dict:
    from engine.priors.sd15 import SD15_TEXT_ENCODER, SD15_UNET, SD15_VAE

    return dict(
        vae={**SD15_VAE, **_SMALL_VAE},
        unet={**SD15_UNET, "sample_size": 16, "block_out_channels": (16, 32), "layers_per_block": 1,
              "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
              "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32,
              "attention_head_dim": 4, "norm_num_groups": 4},
        text_encoder={**SD15_TEXT_ENCODER, "vocab_size": 514, "hidden_size": 32, "intermediate_size": 37,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "projection_dim": 32})


def _small_dit() -> dict:
    from engine.priors.dit import DIT_XL2_256, SD_VAE_FT_MSE

    return dict(vae={**SD_VAE_FT_MSE, **_SMALL_VAE},
                transformer={**DIT_XL2_256, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2,
                             "sample_size": 16})


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the real check and the dry run."""
    matmul: int = 8192
    encode_batches: tuple[int, ...] = (8, 16, 32, 64)
    sd15_batches: tuple[int, ...] = (8, 16, 32)
    dit_batches: tuple[int, ...] = (8, 16, 32)
    decode_steps: int = 50
    compile_backend: str = "inductor"
    compile_seconds: float = 120.0  # what an inductor compile of the SD UNet may take: skipped if less is left
    classes: int = 1000
    points: int = 1300
    dim: int = 4096
    ipc: tuple[int, ...] = (1, 10, 50)
    check_classes: int = 2
    train_size: int = 224
    train_images: int = 640
    train_batch: int = 128
    train_epochs: int = 10  # 640 / 128 = 5 steps an epoch: 50 steps
    small_models: bool = False
    # seconds per section; the whole run is also cut at --budget
    budgets: dict = field(default_factory=lambda: dict(peak=15, encode=45, quantize=60, train=60, dit=45, sd15=200))


DRY = Sizes(matmul=256, encode_batches=(2, 4), sd15_batches=(1, 2), dit_batches=(1, 2), decode_steps=4,
            compile_backend="eager", compile_seconds=0.0, classes=6, points=60, dim=16, ipc=(1, 5),
            check_classes=2, train_size=64, train_images=16, train_batch=8, train_epochs=2, small_models=True,
            budgets=dict(peak=10, encode=20, quantize=20, train=30, dit=20, sd15=40))


class Report:
    """Table rows (section, item, value, note), errors, and the figures of the last line."""

    def __init__(self):
        self.rows: list[tuple[str, str, str, str]] = []
        self.errors: list[str] = []
        self.summary: dict[str, float] = {}

    def add(self, section: str, item: str, value: str, note: str = "") -> None:
        print(f"  {section:<9} {item:<42} {value:>16}  {note}", flush=True)
        self.rows.append((section, item, value, note))

    def error(self, section: str, item: str, error: BaseException | str) -> None:
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        if not isinstance(error, str):
            traceback.print_exception(error, file=sys.stderr)
        self.add(section, item, "ERROR", text.splitlines()[0][:200] if text else "")
        self.errors.append(f"{section}/{item}: {text}")

    def best(self, key: str, value: float, lower: bool = False) -> None:
        old = self.summary.get(key)
        if old is None or (value < old if lower else value > old):
            self.summary[key] = value


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    report: Report
    tmp: Path
    deadline: float = math.inf  # of the running section
    peak_flops: float = math.nan

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def over(self, section: str, item: str, needed: float = 0.0) -> bool:
        """True (and a `skipped` row) when the section's budget cannot fit `item` any more."""
        if time.perf_counter() + needed <= self.deadline:
            return False
        self.report.add(section, item, "skipped", "time budget spent")
        return True


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise TimeoutError in the main thread after `seconds` (POSIX): bounds a torch.compile whose duration cannot
    be known in advance, so the rest of the table and the last line still print inside the device call."""
    def expire(_signum, _frame):
        raise TimeoutError(f"still running after the section's remaining {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def on_device(tensor: torch.Tensor, device: torch.device) -> bool:
    return tensor.device.type == device.type


def build(ctx: Context, kind: str):
    """The prior at its real config (or the dry run's small one), random weights, bf16 on CUDA. Initialised on the
    device when it can be: the random init of ~1 B parameters on the CPU would eat into the section's budget."""
    from engine.priors.dit import build_dit_prior
    from engine.priors.sd15 import build_sd15_prior

    def make():
        torch.manual_seed(0)
        if kind == "sd15":
            small = _small_sd15() if ctx.sizes.small_models else {}
            return build_sd15_prior(CLASS_NAMES, ctx.tmp / "tokenizer", **small)
        return build_dit_prior(CLASS_NAMES, **(_small_dit() if ctx.sizes.small_models else {}))

    dtype = "bfloat16" if ctx.device.type == "cuda" else "float32"
    try:
        with ctx.device:
            prior = make()
        # The scheduler's tables were made on the device too; the engine's live on the CPU: rebuild it there.
        prior.scheduler = type(prior.scheduler).from_config(prior.scheduler.config)
    except Exception as error:  # noqa: BLE001  an init that insists on the CPU: slower, same model
        print(f"  ({kind}: init on {ctx.device} failed ({error}); initialising on the CPU)", file=sys.stderr)
        prior = make()
    return prior.to(str(ctx.device), dtype).eval()


def free(ctx: Context) -> None:
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- sections


def section_peak(ctx: Context) -> None:
    n = ctx.sizes.matmul
    dtype = torch.bfloat16
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    for _ in range(10):  # warm-up: the clocks ramp up from idle
        a @ b
    repeats = 50
    seconds = ctx.timed(lambda: [a @ b for _ in range(repeats)])
    ctx.peak_flops = 2 * n**3 * repeats / seconds
    ctx.report.add("peak", f"bf16 matmul {n}^3 (mean of {repeats})", f"{ctx.peak_flops / 1e12:.4g} TFLOP/s")


def section_encode(ctx: Context) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    prior = build(ctx, "sd15")
    size, rng = prior.image_size, np.random.default_rng(0)
    first = ctx.sizes.encode_batches[0]
    with FlopCounterMode(display=False) as counter:
        prior.encode(rng.integers(0, 256, (first, size, size, 3), dtype=np.uint8), first)
    per_image = counter.get_total_flops() / first
    ctx.report.add("encode", f"FLOPs per {size}^2 image (FlopCounterMode)", f"{per_image / 1e9:.4g} GFLOP")
    best = (0.0, first)

    def rate(item: str, n: int, fn) -> float:
        fn()  # warm-up: kernels chosen, memory allocated
        seconds = min(ctx.timed(fn) for _ in range(2))
        per_s = n / seconds
        tflops = per_image * per_s
        ctx.report.add("encode", item, f"{per_s:.1f} img/s",
                       f"{tflops / 1e12:.4g} TFLOP/s, {tflops / ctx.peak_flops:.1%} of peak")
        return per_s

    for b in ctx.sizes.encode_batches:
        if ctx.over("encode", f"prior.encode B={b}"):
            continue
        try:
            images = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
            per_s = rate(f"prior.encode B={b} (uint8 on host)", b, lambda: prior.encode(images, b))
            best = max(best, (per_s, b))
            ctx.report.best("encode_mfu", per_image * per_s / ctx.peak_flops)
            parameter = next(prior.vae.parameters())
            pixels = torch.rand(b, 3, size, size, device=ctx.device, dtype=parameter.dtype) * 2 - 1
            rate(f"vae.encode B={b} (input on device)", b, lambda: prior.vae.encode(pixels).latent_dist.mean)
        except Exception as error:  # noqa: BLE001  e.g. out of memory at the largest batch: the others stand
            ctx.report.error("encode", f"B={b}", error)
            free(ctx)
    if not ctx.over("encode", "channels_last VAE"):
        b = best[1]
        prior.vae.to(memory_format=torch.channels_last)
        images = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
        rate(f"prior.encode B={b}, channels_last VAE", b, lambda: prior.encode(images, b))


def _decode_rows(ctx: Context, section: str, prior, config: DecodeConfig, batches, summary_key: str) -> tuple:
    """s/image of prior.decode at each batch size (one warm-up of a 2-step schedule first); (best s/img, batch)."""
    rng = np.random.default_rng(0)
    best = (math.inf, batches[0])
    calls = len(_timesteps(prior, config))  # denoiser calls: SD's PNDM makes one more than the steps it runs
    for b in batches:
        if ctx.over(section, f"B={b}"):
            continue
        try:
            seconds = _decode_seconds(ctx, prior, config, b, rng)
            ctx.report.add(section, f"B={b}, {config.strength:g} x {config.num_steps} steps ({calls} calls), "
                                    f"CFG {config.guidance_scale:g}",
                           f"{seconds / b:.4f} s/img", f"{seconds:.2f} s a batch")
            best = min(best, (seconds / b, b))
            ctx.report.best(summary_key, seconds / b, lower=True)
        except Exception as error:  # noqa: BLE001  e.g. out of memory at the largest batch: the others stand
            ctx.report.error(section, f"B={b}", error)
            free(ctx)
    return best


def _timesteps(prior, config: DecodeConfig):
    from engine.decode import img2img_timesteps

    return img2img_timesteps(prior.scheduler, config.num_steps, config.strength)


def _decode_seconds(ctx: Context, prior, config: DecodeConfig, b: int, rng: np.random.Generator) -> float:
    latents = rng.standard_normal((b, *prior.latent_shape)).astype(np.float32)
    labels, keys = np.arange(b) % len(CLASS_NAMES), np.arange(b)
    prior.decode(latents, labels, replace(config, num_steps=2), keys)  # warm-up (and the compile, if any)
    return ctx.timed(lambda: prior.decode(latents, labels, config, keys))


def section_sd15(ctx: Context) -> None:
    prior = build(ctx, "sd15")
    config = replace(D4M, num_steps=ctx.sizes.decode_steps)
    _, b = _decode_rows(ctx, "sd15", prior, config, ctx.sizes.sd15_batches, "decode_s_per_img")
    rng = np.random.default_rng(1)
    # Against the sweep's row at this batch (sdpa, the default): classic attention, then the keys added in turn.
    variants = [("classic attention (sdpa=false)", dict(sdpa=False)),
                ("sdpa + channels_last", dict(sdpa=True, channels_last=True)),
                (f"sdpa + channels_last + compile={ctx.sizes.compile_backend}",
                 dict(sdpa=True, channels_last=True, compile=ctx.sizes.compile_backend))]
    for name, keys in variants:
        compiling = keys.get("compile", "none") != "none"
        if ctx.over("sd15", f"B={b} {name}", ctx.sizes.compile_seconds if compiling else 0.0):
            continue
        variant = replace(config, **keys)
        try:
            start = time.perf_counter()
            with alarm(ctx.deadline - start):  # a compile that outruns the budget ends here, as a skipped row
                seconds = _decode_seconds(ctx, prior, variant, b, rng)
            note = f"{seconds:.2f} s a batch"
            if compiling:
                note += f"; compile + warm-up {time.perf_counter() - start - seconds:.0f} s"
            ctx.report.add("sd15", f"B={b} {name}", f"{seconds / b:.4f} s/img", note)
            ctx.report.best("decode_s_per_img", seconds / b, lower=True)
        except TimeoutError as error:  # the budget, not the code: a longer --budget would measure it
            ctx.report.add("sd15", f"B={b} {name}", "skipped", str(error))
        except Exception as error:  # noqa: BLE001  one variant failing (a compile error) leaves the others
            ctx.report.error("sd15", f"B={b} {name}", error)
            free(ctx)


def section_dit(ctx: Context) -> None:
    prior = build(ctx, "dit")
    _decode_rows(ctx, "dit", prior, replace(DIT, num_steps=ctx.sizes.decode_steps), ctx.sizes.dit_batches,
                 "dit_s_per_img")


def _mixture(index: int, sizes: Sizes, device: torch.device) -> torch.Tensor:
    """One synthetic class on the device: 20 Gaussian clusters, noise of the same scale as the spread of their
    centres (overlapping, as latent classes are, so Lloyd needs real iterations)."""
    generator = torch.Generator(device=device).manual_seed(index)
    centres = torch.randn(20, sizes.dim, generator=generator, device=device)
    member = torch.randint(0, 20, (sizes.points,), generator=generator, device=device)
    return centres[member] + torch.randn(sizes.points, sizes.dim, generator=generator, device=device)


def section_quantize(ctx: Context) -> None:
    from engine.quantize import faiss_sees_gpu, quantize_class
    from engine.quantize_torch import quantize_class_torch

    config, sizes = QuantizeConfig(), ctx.sizes
    if ctx.device.type == "cuda" and faiss_sees_gpu():  # faiss takes host arrays
        name = "faiss-gpu"
        quantizer = lambda x, k: quantize_class(x.cpu().numpy(), k, config, device="cuda")  # noqa: E731
    elif ctx.device.type == "cuda":  # the engine's route without faiss-gpu: the tensor stays on the device
        name = "torch (engine/quantize_torch.py)"
        quantizer = lambda x, k: quantize_class(x, k, config, device="cuda")  # noqa: E731
    else:  # the dry run: the torch path on the CPU, the one the GPU run takes without faiss-gpu
        name = "torch on the CPU (dry run)"
        quantizer = lambda x, k: quantize_class_torch(x, k, config, device="cpu")  # noqa: E731
    try:
        import faiss  # noqa: F401

        reference, reference_name = (lambda x, k: quantize_class(x, k, config, device="cpu")), "faiss-cpu"
    except ImportError:
        reference = lambda x, k: quantize_class_torch(x, k, config, device="cpu")  # noqa: E731
        reference_name = "torch on the CPU (faiss not installed)"
    seconds, done = 0.0, 0
    for index in range(sizes.classes):
        if time.perf_counter() > ctx.deadline:
            ctx.report.add("quantize", f"classes {done}..{sizes.classes - 1}", "skipped", "time budget spent")
            break
        points = _mixture(index, sizes, ctx.device)
        seconds += ctx.timed(lambda: [quantizer(points, k) for k in sizes.ipc])
        done += 1
    if done:
        ctx.report.add("quantize", f"{done} classes {sizes.points}x{sizes.dim}, IPC {list(sizes.ipc)}",
                       f"{done / seconds:.2f} classes/s", f"{name}; nredo {config.nredo}, niter {config.niter}")
        ctx.report.best("quantize_classes_per_s", done / seconds)
    for index in range(sizes.check_classes):
        points = _mixture(index, sizes, ctx.device)
        for k in sizes.ipc[-2:]:
            if ctx.over("quantize", f"class {index} K={k} vs {reference_name}", 5.0):
                continue
            mine, cpu = quantizer(points, k).distortion, reference(points.cpu().numpy(), k).distortion
            gap = abs(mine - cpu) / cpu
            item = f"class {index} K={k}: objective vs {reference_name}"
            if gap <= 0.01:
                ctx.report.add("quantize", item, f"{gap:+.3%}", f"{mine:.4g} vs {cpu:.4g}")
            else:
                ctx.report.error("quantize", item, f"objective {mine:.6g} vs {cpu:.6g}: {gap:.2%} > 1 %")


def section_train(ctx: Context) -> None:
    from safetensors.torch import save_file

    from engine.students import create_student
    from engine.train import TrainSet, Worker, load_teacher, train_student

    sizes, device, classes = ctx.sizes, ctx.device, 1000
    config = EvaluateConfig(protocol="rded", teacher="resnet18", students=("resnet18",), batch_size=sizes.train_batch,
                            flip=True)
    torch.manual_seed(0)
    teacher_file = ctx.tmp / "teacher.safetensors"
    save_file(create_student("resnet18", classes, sizes.train_size).state_dict(), str(teacher_file))
    teacher = load_teacher(teacher_file, "resnet18", classes, sizes.train_size, config.width, device)
    misplaced = [n for n, p in teacher.named_parameters() if not on_device(p, device)]
    assert not misplaced, f"load_teacher left {len(misplaced)} teacher parameters off {device}: {misplaced[:3]}"
    rng = np.random.default_rng(0)
    data = TrainSet(rng.integers(0, 256, (sizes.train_images, sizes.train_size, sizes.train_size, 3), np.uint8),
                    rng.integers(0, classes, sizes.train_images), np.ones(sizes.train_images))
    seen = {"teacher": 0, "student": 0}

    def check_batch(name: str):
        def hook(_module, inputs):
            assert on_device(inputs[0], device), f"a {name} batch is on {inputs[0].device}, not {device}"
            seen[name] += 1
        return hook

    teacher.register_forward_pre_hook(check_batch("teacher"))

    def wrap(model: torch.nn.Module) -> torch.nn.Module:  # what ray.train.torch.prepare_model does for placement
        model = model.to(device)
        model.register_forward_pre_hook(check_batch("student"))
        return model

    for autocast in (False, True):
        item = f"resnet18 {sizes.train_size}^2 B={sizes.train_batch}, rded" + (", bf16 autocast" if autocast else "")
        if ctx.over("train", item):
            continue
        marks: list[tuple[int, float]] = []

        def report(step: int, _model) -> None:
            ctx.sync()
            marks.append((step, time.perf_counter()))

        seen.update(teacher=0, student=0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            student = train_student(data, teacher, classes, "resnet18", sizes.train_epochs, config, seed=0,
                                    worker=Worker(wrap_model=wrap), report=report, reports=10)
        steps = marks[-1][0]
        misplaced = [n for n, p in student.named_parameters() if not on_device(p, device)]
        assert not misplaced, f"student parameters off {device}: {misplaced[:3]}"
        assert seen["student"] == seen["teacher"] == steps, f"batches seen {seen} for {steps} steps"
        (first_step, first_time), (last_step, last_time) = marks[0], marks[-1]  # the first report ends the warm-up
        per_s = (last_step - first_step) * sizes.train_batch / (last_time - first_time)
        ctx.report.add("train", item, f"{per_s:.1f} img/s",
                       f"steps {first_step}..{last_step} timed of {steps}; teacher from safetensors, on {device}")
        ctx.report.best("train_img_per_s", per_s)


# In this order: sd15 last, since its compile is the one step whose length cannot be bounded in advance.
SECTIONS = {"peak": section_peak, "encode": section_encode, "quantize": section_quantize, "train": section_train,
            "dit": section_dit, "sd15": section_sd15}


def run_check(device: torch.device, sizes: Sizes, sections: list[str], budget: float) -> Report:
    report = Report()
    end = time.perf_counter() + budget
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(device, sizes, report, Path(tmp))
        for name in sections:
            start = time.perf_counter()
            ctx.deadline = min(start + sizes.budgets[name], end)
            if name != "peak" and math.isnan(ctx.peak_flops):
                ctx.peak_flops = _quiet_peak(ctx)
            try:
                SECTIONS[name](ctx)
            except Exception as error:  # noqa: BLE001  one failing section must not cost the others
                report.error(name, "section", error)
            free(ctx)
            report.add(name, "section wall time", f"{time.perf_counter() - start:.1f} s",
                       f"budget {sizes.budgets[name]} s")
    return report


def _quiet_peak(ctx: Context) -> float:
    """The peak when the `peak` section is not selected (MFU needs a denominator)."""
    saved = ctx.report
    ctx.report = Report()
    try:
        section_peak(ctx)
    finally:
        ctx.report = saved
    return ctx.peak_flops


def last_line(report: Report, device: torch.device) -> str:
    name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).replace(" ", "_")
    value = lambda key, fmt: format(report.summary[key], fmt) if key in report.summary else "nan"  # noqa: E731
    return (f"encode_mfu={value('encode_mfu', '.4f')} decode_s_per_img={value('decode_s_per_img', '.4g')} "
            f"quantize_classes_per_s={value('quantize_classes_per_s', '.4g')} "
            f"train_img_per_s={value('train_img_per_s', '.4g')} device={name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny models and sizes (default device: cpu)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda, or cpu for --dry-run)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {list(SECTIONS)}")
    parser.add_argument("--budget", type=float, default=430.0, help="seconds for the whole check (default 430)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of torch and faiss (default: 1 on a "
                        "CPU device, where tiny ops on a shared machine run far slower on 2 threads; else torch's)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device is visible: run with --dry-run for the CPU version", file=sys.stderr)
        return 2
    threads = args.threads or (1 if device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
        with contextlib.suppress(ImportError):
            import faiss

            faiss.omp_set_num_threads(threads)
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {list(SECTIONS)}")
    import diffusers

    print(f"gpu_check{' --dry-run' if args.dry_run else ''}: device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, torch "
          f"{torch.__version__} (CUDA {torch.version.cuda}), diffusers {diffusers.__version__}, Python "
          f"{sys.version.split()[0]}, {torch.get_num_threads()} threads", flush=True)
    print(f"  {'section':<9} {'item':<42} {'value':>16}  note")
    start = time.perf_counter()
    report = run_check(device, DRY if args.dry_run else Sizes(), sections, args.budget)
    print(f"total {time.perf_counter() - start:.1f} s, {len(report.errors)} error(s)")
    for error in report.errors:
        print(f"  ERROR {error.splitlines()[0][:300]}")
    print(last_line(report, device))
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
