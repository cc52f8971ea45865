"""The GPU check: encode, decode, quantize and training throughput of the engine's pure modules, in one command.

    python benchmarks/gpu_check.py                  # CUDA: the real architectures at random weights, < 8 min
    python benchmarks/gpu_check.py --dry-run        # the same code at tiny sizes on the CPU (the default test tier)
    python benchmarks/gpu_check.py --dry-run --device cuda   # tiny sizes on a GPU (the `gpu` test tier)

It needs torch with CUDA, diffusers, transformers, huggingface_hub, timm, safetensors and pyyaml (not Ray, faiss
or POT: it drives the pure modules); it first imports what it needs and names the wheel of anything missing.
It prints one table (a failing section prints its error there and the others still run; the exit status is 1 if
any did), each measured row with the peak GPU memory it allocated (torch.cuda.max_memory_allocated, weights
included: what a card needs for that row), and a last line
    encode_mfu=<f> decode_s_per_img=<s> quantize_classes_per_s=<r> train_img_per_s=<r> device=<name>
Sections, each with its own time budget (an item that would start past it is listed as skipped); the whole run is
budgeted to 360 s (--budget), which leaves 2 minutes of an 8-minute slot for imports and the last items' overrun:
  peak      bf16 matmul TFLOP/s, measured here: the denominator of every MFU (no spec sheet)
  encode    sd15 VAE encoder at 512^2, bf16, batches 8..64: images/s through prior.encode (uint8 in host memory,
            as the engine feeds it; it splits a batch that would reach 2^31 elements) and through vae.encode on a
            device tensor; TFLOP/s counted by torch.utils.flop_counter.FlopCounterMode on one batch;
            encode_mfu = best prior.encode TFLOP/s / peak
  quantize  1000 synthetic classes (Gaussian mixtures) of 1300 x 4096 on the device, IPC 1/10/50 each, through
            engine.quantize.quantizer.quantize_class(device="cuda") (faiss-gpu if present, else engine/quantize/lloyd_torch.py):
            classes/s, until the time reserved for the next check; then its objective against a CPU quantizer
            on a few classes, which must agree within 1 % (faiss-cpu when it imports, else the torch path)
  train     ResNet-18 student, protocol rded, teacher LOADED FROM A SAFETENSORS FILE (engine.evaluate.train.load_teacher),
            50 steps at 224^2, images/s in fp32 (autocast asserted off) and in bf16 autocast; every parameter of
            teacher and student and every batch either sees is asserted to be on the device, and on CUDA the
            student's batches are asserted channels_last (the engine's training layout)
  dit       DiT-XL/2-256, 50 steps from noise (strength 1.0), CFG 4, batches 8..32, s/image
  sd15      img2img at D4M's settings (strength 0.7 of 50 steps = 35 run, CFG 8, batched CFG, negative prompt),
            batches 16 and the engine's largest at 512^2 (31: decode.batch_size 32 capped below 2^31), s/image;
            then at the best batch: SDPA + channels_last, + torch.compile of the UNet (the decode.* keys);
            decode_s_per_img = the best of these
  boundary  the sd15 VAE alone at 512^2, batches 32 and 64, contiguous and channels_last: encode at 64 and decode
            at 32 are the first batches whose largest activation reaches 2^31 elements, where some kernels fail
            or overflow. Each row: images/s, or how it failed, and its outputs against the same images in a batch
            of 4; a raw VAE failing here is what the engine's batch caps avoid (informational, not an error).
            Last, since an overflow can leave the CUDA context unusable
Run it on the GPU you will distill on; never quote a number from a dry run as a GPU one.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import math
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

STARTED = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

CLASS_NAMES = ("tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray", "stingray",
               "cock", "hen", "ostrich")
# What the check imports, in dependency order: a machine with torch alone lacks several, and a bare traceback from
# deep inside diffusers does not say which wheel to install. The engine modules come last to catch the rest.
NEEDED = ("yaml", "safetensors", "huggingface_hub", "transformers", "diffusers", "timm", "engine.priors.sd15",
          "engine.priors.dit", "engine.evaluate.train", "engine.quantize.lloyd_torch")
WHEELS = {"yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn", "cv2": "opencv-python"}


def missing_wheels() -> list[str]:
    """One line per module that does not import: the wheel to install, or the version conflict it reported
    (diffusers checks its huggingface_hub version on import)."""
    lines = []
    for module in NEEDED:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            wheel = WHEELS.get((error.name or module).split(".")[0], (error.name or module).split(".")[0])
            lines.append(f"cannot import {module}: no module {error.name!r}: install the {wheel} wheel")
        except ImportError as error:
            lines.append(f"cannot import {module}: {str(error).splitlines()[0]}")
    return lines


def d4m_config(steps: int):
    """D4M's img2img settings (strength 0.7 of 50 steps, CFG 8, negative prompt)."""
    from engine.config import DecodeConfig

    return DecodeConfig(strength=0.7, num_steps=steps, guidance_scale=8.0,
                        negative_prompt="cartoon, anime, painting")


def dit_config(steps: int):
    """DiT's own sampling: from noise, CFG 4."""
    from engine.config import DecodeConfig

    return DecodeConfig(strength=1.0, num_steps=steps, guidance_scale=4.0)

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
    boundary_batches: tuple[int, ...] = (32, 64)  # at 512^2: 2^31 elements (encode at 64, decode at 32)
    sd15_batches: tuple[int, ...] = (16, 32)  # 32 is capped to the engine's largest (31 at 512^2)
    dit_batches: tuple[int, ...] = (8, 16, 32)
    decode_steps: int = 50
    compile_backend: str = "inductor"
    compile_seconds: float = 90.0  # what an inductor compile of the SD UNet may take: skipped if less is left
    classes: int = 1000
    points: int = 1300
    dim: int = 4096
    ipc: tuple[int, ...] = (1, 10, 50)
    check_classes: int = 2
    check_seconds: float = 25.0  # reserved at the end of the quantize section for the agreement check
    train_size: int = 224
    train_images: int = 640
    train_batch: int = 128
    train_epochs: int = 10  # 640 / 128 = 5 steps an epoch: 50 steps
    small_models: bool = False
    # seconds per section (they add up to the default --budget, 360); the whole run is also cut at --budget
    budgets: dict = field(default_factory=lambda: dict(peak=10, encode=35, boundary=35, quantize=45, train=45,
                                                       dit=30, sd15=160))


DRY = Sizes(matmul=256, encode_batches=(2, 4), boundary_batches=(4, 8), sd15_batches=(1, 2), dit_batches=(1, 2),
            decode_steps=4, compile_backend="eager", compile_seconds=0.0, classes=6, points=60, dim=16, ipc=(1, 5),
            check_classes=2, check_seconds=5.0, train_size=64, train_images=16, train_batch=8, train_epochs=2,
            small_models=True, budgets=dict(peak=10, encode=20, boundary=20, quantize=20, train=40, dit=20, sd15=40))
DEFAULT_BUDGET = 360.0


@dataclass(frozen=True)
class Row:
    section: str
    item: str
    value: str
    note: str = ""
    peak_gib: float | None = None  # torch.cuda.max_memory_allocated during the row; None on the CPU


class Report:
    """Table rows, errors, and the figures of the last line."""

    def __init__(self):
        self.rows: list[Row] = []
        self.errors: list[str] = []
        self.summary: dict[str, float] = {}

    def add(self, section: str, item: str, value: str, note: str = "", peak_gib: float | None = None) -> None:
        memory = "-" if peak_gib is None else f"{peak_gib:.2f}"
        print(f"  {section:<9} {item:<46} {value:>16} {memory:>8}  {note}", flush=True)
        self.rows.append(Row(section, item, value, note, peak_gib))

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

    def reset_peak(self) -> None:
        """Start a row's memory count from what is allocated now (the weights stay counted)."""
        if self.device.type == "cuda":
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None


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

    from engine.encode import largest_vae_batch

    prior = build(ctx, "sd15")
    size, rng = prior.image_size, np.random.default_rng(0)
    first = ctx.sizes.encode_batches[0]
    with FlopCounterMode(display=False) as counter:
        prior.encode(rng.integers(0, 256, (first, size, size, 3), dtype=np.uint8), first)
    per_image = counter.get_total_flops() / first
    ctx.report.add("encode", f"FLOPs per {size}^2 image (FlopCounterMode)", f"{per_image / 1e9:.4g} GFLOP")
    cap = largest_vae_batch(prior.vae.config, size, "encoder")  # the raw VAE beyond it: the boundary section
    best = (0.0, first)

    def rate(item: str, n: int, fn) -> float:
        ctx.reset_peak()
        fn()  # warm-up: kernels chosen, memory allocated
        seconds = min(ctx.timed(fn) for _ in range(2))
        per_s = n / seconds
        tflops = per_image * per_s
        ctx.report.add("encode", item, f"{per_s:.1f} img/s",
                       f"{tflops / 1e12:.4g} TFLOP/s, {tflops / ctx.peak_flops:.1%} of peak", ctx.peak_gib())
        return per_s

    for b in ctx.sizes.encode_batches:
        if ctx.over("encode", f"prior.encode B={b}"):
            continue
        try:
            images = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
            split = f", split at {cap}" if b > cap else ""
            per_s = rate(f"prior.encode B={b} (uint8 on host{split})", b, lambda: prior.encode(images, b))
            best = max(best, (per_s, b))
            ctx.report.best("encode_mfu", per_image * per_s / ctx.peak_flops)
            if b <= cap:
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


def section_boundary(ctx: Context) -> None:
    """The raw sd15 VAE at the batches whose largest activation reaches 2^31 elements (diffusers' channels_last
    upsample guard undercounts there): does each run, and does it give the images a batch of 4 gives?"""
    from engine.encode import vae_peak_elements

    prior = build(ctx, "sd15")
    vae, size = prior.vae, prior.image_size
    dtype = next(vae.parameters()).dtype
    generator = torch.Generator(ctx.device).manual_seed(0)
    inputs = {"encode": torch.rand(max(ctx.sizes.boundary_batches), 3, size, size, generator=generator,
                                   device=ctx.device, dtype=dtype) * 2 - 1,
              "decode": torch.randn(max(ctx.sizes.boundary_batches), *prior.latent_shape, generator=generator,
                                    device=ctx.device, dtype=dtype)}
    run = {"encode": lambda x: vae.encode(x).latent_dist.mean, "decode": lambda z: vae.decode(z).sample}
    for part, network in (("encode", "encoder"), ("decode", "decoder")):
        per_image = vae_peak_elements(vae.config, size, network)
        for layout in (torch.contiguous_format, torch.channels_last):
            vae.to(memory_format=layout)
            with torch.no_grad():
                reference = run[part](inputs[part][:4]).float()  # (4, ...) the same images in a small batch
            for b in ctx.sizes.boundary_batches:
                item = f"vae.{part} B={b} {'channels_last' if layout == torch.channels_last else 'contiguous'}"
                if ctx.over("boundary", item):
                    continue
                _boundary_row(ctx, item, lambda b=b: run[part](inputs[part][:b]), reference, b, b * per_image)
                free(ctx)


def _boundary_row(ctx: Context, item: str, fn, reference: torch.Tensor, b: int, elements: int) -> None:
    note = f"largest activation {elements / 2**31:.3g} x 2^31 elements"
    ctx.reset_peak()
    try:
        with torch.no_grad():
            out = fn()  # warm-up: kernels chosen, memory allocated
            seconds = ctx.timed(fn)
    except Exception as error:  # noqa: BLE001  a raw VAE failing here is the finding (the engine caps below it)
        traceback.print_exception(error, file=sys.stderr)
        ctx.report.add("boundary", item, "fails", f"{note}; {type(error).__name__}: {str(error).splitlines()[0][:120]}",
                       ctx.peak_gib())
        return
    delta = (out[:4].float() - reference).abs().max().item()
    # bf16 kernels may pick other algorithms at another batch size: a rounding step, not an overflow's garbage
    verdict = "same images" if math.isfinite(delta) and delta < 0.1 else "WRONG images (overflow)"
    ctx.report.add("boundary", item, f"{b / seconds:.1f} img/s",
                   f"{note}; {verdict}: max |diff| vs B=4 {delta:.3g}", ctx.peak_gib())


def _decode_rows(ctx: Context, section: str, prior, config, batches, summary_key: str) -> tuple:
    """s/image of prior.decode at each batch size (one warm-up of a 2-step schedule first); (best s/img, batch)."""
    rng = np.random.default_rng(0)
    best = (math.inf, batches[0])
    calls = len(_timesteps(prior, config))  # denoiser calls: SD's PNDM makes one more than the steps it runs
    for b in batches:
        if ctx.over(section, f"B={b}"):
            continue
        try:
            ctx.reset_peak()
            seconds = _decode_seconds(ctx, prior, config, b, rng)
            ctx.report.add(section, f"B={b}, {config.strength:g} x {config.num_steps} steps ({calls} calls), "
                                    f"CFG {config.guidance_scale:g}",
                           f"{seconds / b:.4f} s/img", f"{seconds:.2f} s a batch", ctx.peak_gib())
            best = min(best, (seconds / b, b))
            ctx.report.best(summary_key, seconds / b, lower=True)
        except Exception as error:  # noqa: BLE001  e.g. out of memory at the largest batch: the others stand
            ctx.report.error(section, f"B={b}", error)
            free(ctx)
    return best


def _timesteps(prior, config):
    from engine.decode import img2img_timesteps

    return img2img_timesteps(prior.scheduler, config.num_steps, config.strength)


def _decode_seconds(ctx: Context, prior, config, b: int, rng: np.random.Generator) -> float:
    latents = rng.standard_normal((b, *prior.latent_shape)).astype(np.float32)
    labels, keys = np.arange(b) % len(CLASS_NAMES), np.arange(b)
    prior.decode(latents, labels, replace(config, num_steps=2), keys)  # warm-up (and the compile, if any)
    return ctx.timed(lambda: prior.decode(latents, labels, config, keys))


def section_sd15(ctx: Context) -> None:
    from engine.decode import denoiser_batch_size

    prior = build(ctx, "sd15")
    config = d4m_config(ctx.sizes.decode_steps)
    # The batches the engine runs: decode.batch_size capped where the VAE decoder would reach 2^31 elements (the
    # boundary section measures the raw VAE beyond it).
    batches = sorted({denoiser_batch_size(prior, replace(config, batch_size=b)) for b in ctx.sizes.sd15_batches})
    _, b = _decode_rows(ctx, "sd15", prior, config, batches, "decode_s_per_img")
    rng = np.random.default_rng(1)
    # Against the sweep's row at this batch (sdpa, the default): the speed keys added in turn.
    variants = [("sdpa + channels_last", dict(sdpa=True, channels_last=True)),
                (f"sdpa + channels_last + compile={ctx.sizes.compile_backend}",
                 dict(sdpa=True, channels_last=True, compile=ctx.sizes.compile_backend))]
    for name, keys in variants:
        compiling = keys.get("compile", "none") != "none"
        if ctx.over("sd15", f"B={b} {name}", ctx.sizes.compile_seconds if compiling else 0.0):
            continue
        variant = replace(config, **keys)
        try:
            start = time.perf_counter()
            ctx.reset_peak()
            with alarm(ctx.deadline - start):  # a compile that outruns the budget ends here, as a skipped row
                seconds = _decode_seconds(ctx, prior, variant, b, rng)
            note = f"{seconds:.2f} s a batch"
            if compiling:
                note += f"; compile + warm-up {time.perf_counter() - start - seconds:.0f} s"
            ctx.report.add("sd15", f"B={b} {name}", f"{seconds / b:.4f} s/img", note, ctx.peak_gib())
            ctx.report.best("decode_s_per_img", seconds / b, lower=True)
        except TimeoutError as error:  # the budget, not the code: a longer --budget would measure it
            ctx.report.add("sd15", f"B={b} {name}", "skipped", str(error))
        except Exception as error:  # noqa: BLE001  one variant failing (a compile error) leaves the others
            ctx.report.error("sd15", f"B={b} {name}", error)
            free(ctx)


def section_dit(ctx: Context) -> None:
    prior = build(ctx, "dit")
    _decode_rows(ctx, "dit", prior, dit_config(ctx.sizes.decode_steps), ctx.sizes.dit_batches, "dit_s_per_img")


def _mixture(index: int, sizes: Sizes, device: torch.device) -> torch.Tensor:
    """One synthetic class on the device: 20 Gaussian clusters, noise of the same scale as the spread of their
    centres (overlapping, as latent classes are, so Lloyd needs real iterations)."""
    generator = torch.Generator(device=device).manual_seed(index)
    centres = torch.randn(20, sizes.dim, generator=generator, device=device)
    member = torch.randint(0, 20, (sizes.points,), generator=generator, device=device)
    return centres[member] + torch.randn(sizes.points, sizes.dim, generator=generator, device=device)


def section_quantize(ctx: Context) -> None:
    quantizer, name, reference, reference_name = _quantizers(ctx)
    sizes = ctx.sizes
    throughput_end = ctx.deadline - sizes.check_seconds  # the agreement check keeps its own time
    seconds, done = 0.0, 0
    ctx.reset_peak()
    for index in range(sizes.classes):
        if time.perf_counter() > throughput_end:
            ctx.report.add("quantize", f"classes {done}..{sizes.classes - 1}", "skipped", "time budget spent")
            break
        points = _mixture(index, sizes, ctx.device)
        seconds += ctx.timed(lambda: [quantizer(points, k) for k in sizes.ipc])
        done += 1
    if done:
        ctx.report.add("quantize", f"{done} classes {sizes.points}x{sizes.dim}, IPC {list(sizes.ipc)}",
                       f"{done / seconds:.2f} classes/s", f"{name}; nredo 3, niter 50", ctx.peak_gib())
        ctx.report.best("quantize_classes_per_s", done / seconds)
    for index in range(sizes.check_classes):
        points = _mixture(index, sizes, ctx.device)
        for k in sizes.ipc[-2:]:
            if ctx.over("quantize", f"class {index} K={k} vs {reference_name}", 1.0):
                continue
            mine, cpu = quantizer(points, k).distortion, reference(points.cpu().numpy(), k).distortion
            gap = abs(mine - cpu) / cpu
            item = f"class {index} K={k}: objective vs {reference_name}"
            if gap <= 0.01:
                ctx.report.add("quantize", item, f"{gap:+.3%}", f"{mine:.4g} vs {cpu:.4g}")
            else:
                ctx.report.error("quantize", item, f"objective {mine:.6g} vs {cpu:.6g}: {gap:.2%} > 1 %")


def _quantizers(ctx: Context) -> tuple:
    """(quantizer, its name, the CPU reference, its name): the engine's device route and what it must agree with."""
    from engine.config import QuantizeConfig
    from engine.quantize.quantizer import faiss_sees_gpu, quantize_class

    config = QuantizeConfig()
    assert (config.nredo, config.niter) == (3, 50), "the row's note quotes the defaults"
    if ctx.device.type == "cuda" and faiss_sees_gpu():  # faiss takes host arrays
        name = "faiss-gpu"
        quantizer = lambda x, k: quantize_class(x.cpu().numpy(), k, config, device="cuda")  # noqa: E731
    elif ctx.device.type == "cuda":  # the engine's route without faiss-gpu: the tensor stays on the device
        name = "torch (engine/quantize/lloyd_torch.py)"
        quantizer = lambda x, k: quantize_class(x, k, config, device="cuda")  # noqa: E731
    else:  # the dry run: the torch path on the CPU, the one the GPU run takes without faiss-gpu
        name = "torch on the CPU (dry run)"
        quantizer = lambda x, k: quantize_class(x, k, config, device="cpu", backend="torch")  # noqa: E731
    try:
        import faiss  # noqa: F401

        reference, reference_name = (lambda x, k: quantize_class(x, k, config, device="cpu")), "faiss-cpu"
    except ImportError:
        reference = lambda x, k: quantize_class(x, k, config, device="cpu", backend="torch")  # noqa: E731
        reference_name = "torch on the CPU (faiss not installed)"
    return quantizer, name, reference, reference_name


def section_train(ctx: Context) -> None:
    from engine.config import EvaluateConfig
    from engine.evaluate.train import TrainSet, Worker

    sizes, device, classes = ctx.sizes, ctx.device, 1000
    config = EvaluateConfig(protocol="rded", teacher="resnet18", students=("resnet18",), batch_size=sizes.train_batch,
                            flip=True)
    teacher = _teacher(ctx, classes, config.width)
    rng = np.random.default_rng(0)
    data = TrainSet(rng.integers(0, 256, (sizes.train_images, sizes.train_size, sizes.train_size, 3), np.uint8),
                    rng.integers(0, classes, sizes.train_images), np.ones(sizes.train_images))
    for precision in ("fp32", "bf16"):
        item = f"resnet18 {sizes.train_size}^2 B={sizes.train_batch}, rded, {precision}"
        if ctx.over("train", item):
            continue
        # precision is the engine's own key: "auto" would turn bf16 autocast on inside each CUDA step, so the
        # fp32 row names fp32, and the hooks below assert what each forward actually ran under.
        watch = BatchWatch(device, autocast=precision == "bf16")
        worker = Worker(wrap_model=watch.wrap, device=device)  # the device: new_model's channels_last on CUDA
        ctx.reset_peak()
        per_s, first, last, steps = _train_rate(ctx, data, teacher, classes, replace(config, precision=precision),
                                                worker, watch)
        ctx.report.add("train", item, f"{per_s:.1f} img/s",
                       f"steps {first}..{last} timed of {steps}; teacher from safetensors, on {device}"
                       f"{', channels_last' if device.type == 'cuda' else ''}", ctx.peak_gib())
        ctx.report.best("train_img_per_s", per_s)


def _teacher(ctx: Context, classes: int, width: int) -> torch.nn.Module:
    """A ResNet-18 teacher through engine.evaluate.train.load_teacher from a safetensors file, asserted on the device."""
    from safetensors.torch import save_file

    from engine.evaluate.students import create_student
    from engine.evaluate.train import load_teacher

    torch.manual_seed(0)
    teacher_file = ctx.tmp / "teacher.safetensors"
    save_file(create_student("resnet18", classes, ctx.sizes.train_size).state_dict(), str(teacher_file))
    teacher = load_teacher(teacher_file, "resnet18", classes, ctx.sizes.train_size, width, ctx.device)
    misplaced = [n for n, p in teacher.named_parameters() if not on_device(p, ctx.device)]
    assert not misplaced, f"load_teacher left {len(misplaced)} teacher parameters off {ctx.device}: {misplaced[:3]}"
    return teacher


class BatchWatch:
    """Forward pre-hooks on the teacher and the student: every batch on the device, autocast on or off as the row
    says, the student's batches channels_last on CUDA; counts the batches each saw."""

    def __init__(self, device: torch.device, autocast: bool):
        self.device, self.autocast = device, autocast
        self.seen = {"teacher": 0, "student": 0}

    def hook(self, name: str):
        def check(_module, inputs):
            x = inputs[0]
            assert on_device(x, self.device), f"a {name} batch is on {x.device}, not {self.device}"
            assert torch.is_autocast_enabled(self.device.type) == self.autocast, \
                f"the {name} ran with autocast {'off' if self.autocast else 'on'}"
            if name == "student" and self.device.type == "cuda":
                assert x.is_contiguous(memory_format=torch.channels_last), "a student batch is not channels_last"
            self.seen[name] += 1
        return check

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:  # where ray.train.torch.prepare_model would wrap
        model.register_forward_pre_hook(self.hook("student"))
        return model


def _train_rate(ctx: Context, data, teacher, classes: int, config, worker, watch: BatchWatch) -> tuple:
    """(images/s after the first report, first and last timed step, steps) of one train_student run."""
    from engine.evaluate.train import Reporting, Targets, student_recipe, train_student

    marks: list[tuple[int, float]] = []

    def report(step: int, _model) -> None:
        ctx.sync()
        marks.append((step, time.perf_counter()))

    handle = teacher.register_forward_pre_hook(watch.hook("teacher"))
    try:
        student = train_student(data, Targets(teacher), classes, "resnet18", ctx.sizes.train_epochs,
                                student_recipe(config, seed=0), worker, Reporting(report, reports=10))
    finally:
        handle.remove()
    steps = marks[-1][0]
    misplaced = [n for n, p in student.named_parameters() if not on_device(p, ctx.device)]
    assert not misplaced, f"student parameters off {ctx.device}: {misplaced[:3]}"
    assert watch.seen["student"] == watch.seen["teacher"] == steps, f"batches seen {watch.seen} for {steps} steps"
    (first_step, first_time), (last_step, last_time) = marks[0], marks[-1]  # the first report ends the warm-up
    per_s = (last_step - first_step) * ctx.sizes.train_batch / (last_time - first_time)
    return per_s, first_step, last_step, steps


# In this order: sd15 late, since its compile is the one step whose length cannot be bounded in advance (the alarm
# ends it at its budget); boundary last, since a kernel overflowing at 2^31 elements can leave a sticky CUDA error
# that fails every later CUDA call of the process.
SECTIONS = {"peak": section_peak, "encode": section_encode, "quantize": section_quantize, "train": section_train,
            "dit": section_dit, "sd15": section_sd15, "boundary": section_boundary}


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
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                        help=f"seconds for the sections together (default {DEFAULT_BUDGET:.0f})")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of torch and faiss (default: 1 on a "
                        "CPU device, where tiny ops on a shared machine run far slower on 2 threads; else torch's)")
    args = parser.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {list(SECTIONS)}")
    missing = missing_wheels()
    if missing:
        print("\n".join(f"gpu_check: {line}" for line in missing), file=sys.stderr)
        return 3
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
    print(header(device, args.dry_run), flush=True)
    print(f"  {'section':<9} {'item':<46} {'value':>16} {'peak GiB':>8}  note")
    start = time.perf_counter()
    report = run_check(device, DRY if args.dry_run else Sizes(), sections, args.budget)
    print(f"total {time.perf_counter() - start:.1f} s of the {args.budget:.0f} s budget, "
          f"{time.perf_counter() - STARTED:.1f} s since start, {len(report.errors)} error(s)")
    for error in report.errors:
        print(f"  ERROR {error.splitlines()[0][:300]}")
    print(last_line(report, device))
    return 1 if report.errors else 0


def header(device: torch.device, dry_run: bool) -> str:
    """The device and every version the numbers depend on."""
    import diffusers
    import huggingface_hub
    import timm
    import transformers

    card = ""
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory / 2**30
        card = f" ({torch.cuda.get_device_name(device)}, {memory:.0f} GiB)"
    return (f"gpu_check{' --dry-run' if dry_run else ''}: device {device}{card}, torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), diffusers {diffusers.__version__}, "
            f"transformers {transformers.__version__}, huggingface_hub {huggingface_hub.__version__}, timm "
            f"{timm.__version__}, Python {sys.version.split()[0]}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    sys.exit(main())
