"""benchmarks/gpu_check.py stays runnable without a GPU: its dry run (every section at tiny sizes on the CPU)
prints no error and the last line docs/gpu.md quotes; it needs neither Ray, faiss nor POT, and names the wheel of
anything else missing; its rows measure what they say (fp32 without autocast, the agreement check in its own
time, the 2^31 boundary batches); and the pieces it checks on a GPU behave here: load_teacher places the teacher,
the decode speed keys apply."""

import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.config import ConfigError, DecodeConfig, load_config
from engine.evaluate.students import create_student
from engine.evaluate.train import load_teacher

ROOT = Path(__file__).resolve().parents[1]
LAST_LINE = re.compile(r"^encode_mfu=(\S+) decode_s_per_img=(\S+) quantize_classes_per_s=(\S+) "
                       r"train_img_per_s=(\S+) device=(\S+)$")


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"})


@pytest.fixture
def gpu_check(monkeypatch):
    """benchmarks/gpu_check.py as a module (it is a script, not a package member)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_dry_run_runs_every_section_without_error():
    start = time.perf_counter()
    out = run(["benchmarks/gpu_check.py", "--dry-run"])
    seconds = time.perf_counter() - start
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert "ERROR" not in out.stdout and "0 error(s)" in out.stdout
    match = LAST_LINE.match(lines[-1])
    assert match, lines[-1]
    values = [float(v) for v in match.groups()[:4]]
    assert all(np.isfinite(v) and v > 0 for v in values), lines[-1]  # every section delivered its figure
    assert match.group(5) == "cpu"
    for section in ("peak", "encode", "boundary", "quantize", "train", "dit", "sd15"):
        assert re.search(rf"^\s+{section}\s+section wall time", out.stdout, re.M), section
    assert "objective vs faiss-cpu" in out.stdout and "compile=eager" in out.stdout
    assert re.search(r"^\s+section\s+item\s+value\s+peak GiB\s+note$", out.stdout, re.M)
    assert re.search(r"train\s+resnet18 .*, rded, fp32\s", out.stdout) and re.search(r"rded, bf16\s", out.stdout)
    for part in ("encode", "decode"):
        for layout in ("contiguous", "channels_last"):
            assert re.search(rf"boundary\s+vae.{part} B=8 {layout}\s.*img/s.*same images", out.stdout), (part, layout)
    assert "transformers" in lines[0] and "huggingface_hub" in lines[0]  # the versions the numbers depend on
    print(f"dry run: {seconds:.1f} s")


def test_runs_where_ray_faiss_and_pot_are_missing():
    """A GPU machine with torch alone has none of the three: the check's modules import without them, and the quantize
    section compares against the torch path on the CPU instead of faiss."""
    code = ("import sys, runpy; sys.modules.update(ray=None, faiss=None, ot=None); "
            "import engine.priors.sd15, engine.priors.dit, engine.evaluate.train, engine.quantize.quantizer, engine.quantize.lloyd_torch; "
            "sys.argv = ['gpu_check.py', '--dry-run', '--sections', 'peak,quantize']; "
            "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')")
    out = run(["-c", code])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "objective vs torch on the CPU (faiss not installed)" in out.stdout and "ERROR" not in out.stdout
    assert LAST_LINE.match(out.stdout.strip().splitlines()[-1])


def test_a_failing_section_is_reported_and_fails_the_run():
    code = ("import sys, runpy; sys.argv = ['gpu_check.py', '--dry-run', '--sections', 'peak,train']; "
            "import engine.evaluate.train; engine.evaluate.train.load_teacher = lambda *a, **k: 1 / 0; "
            "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')")
    out = run(["-c", code])
    assert out.returncode == 1
    assert re.search(r"train\s+section\s+ERROR\s+-\s+ZeroDivisionError", out.stdout)
    assert re.search(r"peak\s+bf16 matmul", out.stdout)  # the other section still ran
    assert "train_img_per_s=nan" in out.stdout.strip().splitlines()[-1]


def test_a_missing_wheel_is_named_before_anything_runs():
    missing = {"timm": "timm", "huggingface_hub": "huggingface_hub", "yaml": "pyyaml"}  # module: its wheel
    code = (f"import sys, runpy; sys.modules.update(dict.fromkeys({list(missing)!r})); "
            "sys.argv = ['gpu_check.py', '--dry-run']; runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')")
    out = run(["-c", code])
    assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-2000:]
    for wheel in missing.values():
        assert f"install the {wheel} wheel" in out.stderr, wheel
    assert "section" not in out.stdout


def test_the_fp32_row_fails_if_autocast_comes_back_on():
    """The engine's "auto" precision turns bf16 autocast on inside each CUDA step: were the fp32 row to run under
    autocast again (as "auto" does on a GPU; here the step's context is forced on), its hooks stop it."""
    code = ("import sys, runpy, torch, engine.evaluate.train as t; "
            "t.precision_context = lambda device, precision: torch.autocast('cpu', dtype=torch.bfloat16); "
            "sys.argv = ['gpu_check.py', '--dry-run', '--sections', 'peak,train']; "
            "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')")
    out = run(["-c", code])
    assert out.returncode == 1
    assert re.search(r"train\s+section\s+ERROR\s+-\s+AssertionError: the student ran with autocast on", out.stdout)


def test_the_watch_checks_device_autocast_and_counts(gpu_check):
    watch = gpu_check.BatchWatch(torch.device("cpu"), autocast=False)
    model = watch.wrap(torch.nn.Conv2d(3, 4, 3))
    model(torch.zeros(1, 3, 8, 8))
    assert watch.seen["student"] == 1
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(AssertionError, match="autocast on"):
        model(torch.zeros(1, 3, 8, 8))
    with pytest.raises(AssertionError, match="not cuda"):
        gpu_check.BatchWatch(torch.device("cuda"), autocast=False).hook("teacher")(None, (torch.zeros(1),))


def test_the_agreement_check_keeps_its_reserved_time(gpu_check):
    """Far more classes than the section's time allows: the throughput loop stops early enough for the check."""
    sizes = replace(gpu_check.DRY, classes=10**6, check_seconds=4.0,
                    budgets={**gpu_check.DRY.budgets, "quantize": 7})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on 2 shared cores: far faster on one thread
    try:
        report = gpu_check.run_check(torch.device("cpu"), sizes, ["quantize"], budget=60)
    finally:
        torch.set_num_threads(threads)
    items = [row.item for row in report.rows if row.section == "quantize"]
    assert any(item.startswith("classes ") for item in items)  # the rest of the classes: skipped
    assert sum("objective vs" in item for item in items) == 2 * sizes.check_classes, items
    assert report.errors == []


def test_the_default_budget_leaves_90_s_of_8_minutes_and_the_boundary_rows_sit_on_2_31(gpu_check):
    from engine.encode import vae_peak_elements
    from engine.priors.sd15 import SD15_VAE

    sizes = gpu_check.Sizes()
    assert sum(sizes.budgets.values()) <= gpu_check.DEFAULT_BUDGET <= 8 * 60 - 90
    assert set(sizes.budgets) == set(gpu_check.SECTIONS)
    vae = SimpleNamespace(**SD15_VAE)
    assert sizes.boundary_batches == (32, 64)
    assert 64 * vae_peak_elements(vae, 512, "encoder") >= 2**31 > 63 * vae_peak_elements(vae, 512, "encoder")
    assert 32 * vae_peak_elements(vae, 512, "decoder") >= 2**31 > 31 * vae_peak_elements(vae, 512, "decoder")


def test_the_docs_speak_to_a_user_with_a_gpu(gpu_check):
    assert not re.search(r"\blent\b|\bloan|borrow|\bcarry\b|device tool|\.whl", gpu_check.__doc__, re.I)


def test_the_alarm_bounds_a_step_and_is_disarmed_after(gpu_check):
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match="still running"):
        with gpu_check.alarm(0.2):
            time.sleep(5)
    assert time.perf_counter() - start < 2
    with gpu_check.alarm(0.2):
        pass
    time.sleep(0.3)  # no stray alarm fires once the block has ended


@pytest.fixture
def teacher_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = create_student("convnet3", 3, 16, 8)
    save_file(model.state_dict(), str(tmp_path / "teacher.safetensors"))
    return tmp_path / "teacher.safetensors", model


def test_load_teacher_from_a_path_or_bytes(teacher_file):
    path, model = teacher_file
    for source in (path, str(path), path.read_bytes()):
        teacher = load_teacher(source, "convnet3", 3, 16, 8, "cpu")
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        for (name, a), b in zip(teacher.state_dict().items(), model.state_dict().values()):
            torch.testing.assert_close(a, b, msg=name)


def test_load_teacher_places_every_parameter_on_the_device(teacher_file):
    # The "meta" device stands in for a GPU here: the teacher must land wherever it is told, not stay on the CPU.
    teacher = load_teacher(teacher_file[0], "convnet3", 3, 16, 8, "meta")
    assert {p.device.type for p in teacher.parameters()} | {b.device.type for b in teacher.buffers()} <= {"meta"}


def test_load_teacher_rejects_another_architecture(teacher_file):
    with pytest.raises(RuntimeError, match="size mismatch|Missing key|Unexpected key"):
        load_teacher(teacher_file[0], "convnet3", 5, 16, 8, "cpu")


def test_decode_speed_keys_are_config_keys():
    config = load_config(overrides=["decode.channels_last=true", "decode.sdpa=false", "decode.compile=inductor"])
    assert (config.decode.channels_last, config.decode.sdpa, config.decode.compile) == (True, False, "inductor")
    assert (DecodeConfig().channels_last, DecodeConfig().sdpa, DecodeConfig().compile) == (False, True, "none")
    with pytest.raises(ConfigError, match="decode.compile"):
        load_config(overrides=["decode.compile=true"])


def test_decode_speed_keys_apply_to_the_networks(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on 2 shared cores: far faster on one thread
    try:
        check_speed_keys(tmp_path)
    finally:
        torch.set_num_threads(threads)


def check_speed_keys(tmp_path):
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    from engine.priors.sd15 import build_sd15_prior
    from tests.priors_small import SD15_SMALL

    torch.manual_seed(0)
    prior = build_sd15_prior(("a", "b"), tmp_path / "tokenizer", **SD15_SMALL)
    latents = np.random.default_rng(0).standard_normal((2, *prior.latent_shape)).astype(np.float32)
    base = DecodeConfig(strength=0.5, num_steps=2)
    images = {}
    for name, keys in [("default", {}), ("classic", dict(sdpa=False)), ("nhwc", dict(channels_last=True)),
                       ("eager", dict(channels_last=True, compile="eager"))]:
        config = replace(base, **keys)
        images[name] = prior.decode(latents, np.array([0, 1]), config, np.arange(2))
        attention = [m for network in (prior.unet, prior.vae) for m in network.modules() if isinstance(m, Attention)]
        processors = {type(m.processor) for m in attention}
        assert processors == {AttnProcessor2_0 if config.sdpa else AttnProcessor}
        assert prior.unet.conv_in.weight.is_contiguous(
            memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
        assert (prior.tuning.compiled is not None) == (config.compile != "none")
    compiled = prior.tuning.compiled
    prior.decode(latents, np.array([0, 1]), replace(base, channels_last=True, compile="eager"), np.arange(2))
    assert prior.tuning.compiled is compiled  # the same setting again: no new compile
    for name in ("classic", "nhwc", "eager"):  # same math, float32 on the CPU: a level of rounding at most
        assert np.abs(images[name].astype(int) - images["default"]).max() <= 1, name
