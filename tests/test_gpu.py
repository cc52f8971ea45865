"""The `gpu` tier: what only a CUDA device can show. Skipped cleanly without one (and deselected by `make test`).

Tolerances, stated because bf16 keeps 8 bits of mantissa (a relative step of 2^-8 = 0.4 %):
- encode, the same images twice: bit-identical expected (same kernels, same shapes); allowed 1e-2 absolute.
- encode, in batches of 2 rather than 6 (other kernel shapes): within 2e-2 absolute + 2e-2 relative.
- encode, bf16 against float32 weights: within 0.1 absolute + 5 % relative (a few bf16 roundings per layer).
- decode, the same centroids and keys twice: at most 1 grey level apart (uint8).
- decode, one batch of 6 against batches of 2 and 4: mean difference <= 1 level, max <= 16 levels (a random-weight
  UNet amplifies rounding over the denoising steps; the noise itself is per row and batch-independent).
- torch quantizer on CUDA against the CPU paths: objective within 1 %.
"""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import DecodeConfig, EvaluateConfig, QuantizeConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_sections_at_small_size_on_cuda():
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--device", "cuda"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    last = out.stdout.strip().splitlines()[-1]
    assert re.match(r"^encode_mfu=\S+ decode_s_per_img=\S+ quantize_classes_per_s=\S+ train_img_per_s=\S+ "
                    r"device=\S+$", last) and "device=cpu" not in last and "nan" not in last, last


@pytest.fixture
def cuda_prior(tiny_prior):
    return tiny_prior.to("cuda", "bfloat16")


def test_encode_is_deterministic_in_bf16(tiny_prior, images_u8):
    reference = tiny_prior.encode(images_u8, 6)  # float32 on the CPU
    prior = tiny_prior.to("cuda", "bfloat16")
    once, again, split = prior.encode(images_u8, 6), prior.encode(images_u8, 6), prior.encode(images_u8, 2)
    assert once.dtype == np.float32 and once.shape == reference.shape
    np.testing.assert_allclose(again, once, atol=1e-2, rtol=0)
    np.testing.assert_allclose(split, once, atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(once, reference, atol=0.1, rtol=0.05)


def test_decode_is_deterministic_in_bf16(cuda_prior):
    latents = np.random.default_rng(0).standard_normal((6, *cuda_prior.latent_shape)).astype(np.float32)
    labels, keys = np.arange(6) % 3, np.arange(100, 106)
    config = DecodeConfig(strength=0.6, num_steps=10, guidance_scale=2.0)
    once = cuda_prior.decode(latents, labels, config, keys)
    again = cuda_prior.decode(latents, labels, config, keys)
    assert once.dtype == np.uint8 and np.abs(once.astype(int) - again).max() <= 1
    split = np.concatenate([cuda_prior.decode(latents[:2], labels[:2], config, keys[:2]),
                            cuda_prior.decode(latents[2:], labels[2:], config, keys[2:])])
    difference = np.abs(once.astype(int) - split)
    assert difference.mean() <= 1.0 and difference.max() <= 16


@pytest.mark.parametrize("k", [5, 20])
def test_torch_quantizer_on_cuda_matches_the_cpu(k):
    from sklearn.datasets import make_blobs

    from engine.quantize.quantizer import quantize_class, quantize_device

    points, _ = make_blobs(n_samples=1300, centers=12, n_features=256, cluster_std=6.0, random_state=0)
    points = points.astype(np.float32)
    config = QuantizeConfig(seed=0)
    device = quantize_device(1.0)
    on_gpu = quantize_class(torch.as_tensor(points, device=device), k, config, device, backend="torch")
    on_cpu = quantize_class(points, k, config, "cpu", backend="torch")
    assert on_gpu.distortion == pytest.approx(on_cpu.distortion, rel=0.01)
    assert on_gpu.distortion == pytest.approx(quantize_class(points, k, config).distortion, rel=0.01)
    assert on_gpu.counts.sum() == 1300
    routed = quantize_class(points, k, config, device="cuda")  # faiss-gpu if installed, else the torch path
    assert routed.distortion == pytest.approx(on_gpu.distortion, rel=0.01)


def test_soft_label_student_with_a_teacher_from_disk_trains_on_cuda(tmp_path):
    """The crash this tier exists for: a teacher read from a file must be on the worker's device."""
    from safetensors.torch import save_file

    from engine.evaluate.students import create_student
    from engine.evaluate.train import Targets, TrainSet, Worker, load_teacher, student_recipe, train_student

    torch.manual_seed(0)
    save_file(create_student("convnet3", 3, 16, 8).state_dict(), str(tmp_path / "teacher.safetensors"))
    teacher = load_teacher(tmp_path / "teacher.safetensors", "convnet3", 3, 16, 8, "cuda")
    assert all(p.is_cuda for p in teacher.parameters())
    rng = np.random.default_rng(0)
    data = TrainSet(rng.integers(0, 256, (24, 16, 16, 3), np.uint8), rng.integers(0, 3, 24), np.ones(24))
    config = EvaluateConfig(protocol="rded", width=8, batch_size=8)
    student = train_student(data, Targets(teacher), 3, "convnet3", 2, student_recipe(config, seed=0),
                            worker=Worker(wrap_model=lambda m: m.to("cuda")))
    assert all(p.is_cuda for p in student.parameters())


@pytest.mark.skipif(__import__("importlib").util.find_spec("ray") is None, reason="the engine's job needs Ray")
def test_the_smoke_run_on_gpu_actors_and_a_gpu_trainer(tmp_path):
    """jobs/distill.py --smoke-test with every stage placed on the GPU (encode/decode actors, a GPU quantize actor,
    the Ray Train worker), teacher trained and then re-loaded from disk on the second run: no device mismatch."""
    command = [sys.executable, "jobs/distill.py", "--smoke-test", f"runs_dir={tmp_path / 'runs'}",
               f"cache_dir={tmp_path / 'cache'}", "runtime.gpus_per_actor=0.25", "runtime.quantize_gpus_per_actor=0.25",
               "runtime.train_use_gpu=true", "runtime.train_cpus_per_worker=1", "runtime.prior_dtype=bfloat16"]
    for attempt, name in (("trains the teacher", "smoke"), ("loads it from disk", "smoke-again")):
        # Another run name: its students train again, against the teacher the first run cached in cache_dir.
        out = subprocess.run(command + [f"name={name}"], cwd=ROOT, capture_output=True, text=True, timeout=1500)
        assert out.returncode == 0, f"{attempt}: " + out.stdout[-3000:] + out.stderr[-3000:]
        assert "top1 (mean ± std)" in out.stdout
