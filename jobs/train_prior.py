"""Train the `tiny` prior of a dataset, with progress lines and checkpoints that resume after a kill, then measure it.

    python jobs/train_prior.py --config configs/fashion_mnist.yaml [dotted overrides]

Writes the very folder `engine.priors.load_or_train_prior` reads (so jobs/distill.py picks the prior up), or
prior.path when set. A folder that already holds a trained prior is only measured. Beside the prior it writes
quality.json and samples.png (rows = classes: first column a real validation image, then its reconstruction, then
samples generated from noise at the config's decode.guidance_scale / num_steps). quality.json, all on the
validation split (engine/data/splits.py), never on test:
  val       VAE reconstruction MSE / PSNR;
  samples   --quality-samples per class generated from pure noise (strength 1, the config's guidance), judged by
            the evaluation's teacher (engine/evaluate/quality.py): the share it classifies as their class, the Fréchet
            distance of its features to real validation images', k-NN precision / recall;
  real      the same figures for as many real validation images against the rest: what a perfect prior scores
            at this sample size (the Fréchet distance is biased upwards for small samples);
and the training time. The teacher is the engine's cached one (trained through Ray Train when missing, as
jobs/distill.py would), or evaluate.teacher_path; --no-teacher measures the reconstruction only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.config import load_config  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@torch.no_grad()
def reconstruct(prior, images: np.ndarray) -> np.ndarray:
    """uint8 images -> VAE posterior mean -> decoded uint8 images (what encode + decode at strength 0 would give)."""
    from engine.encode import images_to_tensor, tensor_to_images

    return tensor_to_images(prior.vae.decode(prior.vae.encode(images_to_tensor(images)).latent_dist.mean).sample)


def reconstruction_quality(prior, images: np.ndarray, batch_size: int = 500) -> dict:
    """MSE of VAE reconstructions on [0, 1] pixels, and PSNR in dB (of the mean MSE, and mean over images)."""
    squared = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        recon = reconstruct(prior, batch)
        squared.append(((recon.astype(np.float64) - batch) / 255.0) ** 2)
    per_image = np.concatenate(squared).reshape(len(images), -1).mean(1)
    mse = float(per_image.mean())
    return {"images": len(images), "mse": mse, "psnr_db": float(10 * np.log10(1.0 / mse)),
            "psnr_db_mean_per_image": float(np.mean(10 * np.log10(1.0 / np.maximum(per_image, 1e-12))))}


def sample_grid(prior, test, decode, per_class: int) -> np.ndarray:
    """(classes x (2 + per_class)) tiles: real, reconstruction, generated samples (strength 1 from noise)."""
    import dataclasses

    from engine.decode import decode_latents

    rows = []
    shape = prior.latent_shape
    for label in range(prior.num_classes):
        real = test.images[np.flatnonzero(test.labels == label)[:1]]
        recon = reconstruct(prior, real)
        samples = decode_latents(prior, np.zeros((per_class, *shape), np.float32), np.full(per_class, label),
                                 dataclasses.replace(decode, strength=1.0), keys=label * 1000 + np.arange(per_class))
        rows.append(np.concatenate([*real, *recon, *samples], axis=1))  # (H, W * tiles, 3)
    return np.concatenate(rows, axis=0)


QUALITY_IMAGES = 10_000  # validation images the figures are measured on (a seeded sample beyond that)


def generate_samples(prior, decode, per_class: int, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """per_class images of every class from pure noise (strength 1), in batches -> (images, labels)."""
    import dataclasses

    from engine.decode import decode_latents

    labels = np.repeat(np.arange(prior.num_classes), per_class)
    keys = 10**6 + np.arange(len(labels))  # other noise than samples.png's
    decode = dataclasses.replace(decode, strength=1.0)
    zeros = np.zeros((batch, *prior.latent_shape), np.float32)
    images = [decode_latents(prior, zeros[: len(labels[i : i + batch])], labels[i : i + batch], decode,
                             keys=keys[i : i + batch]) for i in range(0, len(labels), batch)]
    return np.concatenate(images), labels


def sample_quality(config, prior, val, per_class: int) -> dict:
    """quality.json's `samples` and `real` figures (see the module), with the evaluation's teacher."""
    from engine import pipeline
    from engine.data.images import has_colour
    from engine.data.sources import class_names
    from engine.evaluate.quality import set_quality, teacher_outputs
    from engine.evaluate.train import load_teacher

    # evaluate.channels=auto as a run decides it, from the validation sample here (a run counts every image)
    config = pipeline.resolve_channels(config, not has_colour(val.images).any())
    teacher_path = pipeline.teacher_cache_path(config)
    if not teacher_path.exists():
        log(f"no teacher at {teacher_path}: training it through Ray Train, as jobs/distill.py would")
        pipeline.prepare_teacher(config, config.run_dir / "results" / "prior-quality")
    e = config.evaluate
    teacher = load_teacher(teacher_path, e.teacher, len(class_names(config.data)), config.data.image_size, e.width,
                           "cuda" if torch.cuda.is_available() else "cpu", e)
    # The reference: half of the validation sample; the other half is the real set judged like the samples.
    order = np.random.default_rng(0).permutation(len(val))
    reference, held = order[: len(order) // 2], order[len(order) // 2 :]
    features, _ = teacher_outputs(teacher, val.images[reference])
    images, labels = generate_samples(prior, config.decode, per_class)
    held = held[: len(images)]
    return {"teacher": str(teacher_path), "reference_images": int(len(reference)),
            "samples": set_quality(teacher, images, labels, features),
            "real": set_quality(teacher, val.images[held], val.labels[held], features)}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--checkpoint-every", type=int, default=200, help="optimizer steps between checkpoints")
    parser.add_argument("--samples-per-class", type=int, default=8, help="samples per class in samples.png")
    parser.add_argument("--quality-samples", type=int, default=100, help="samples per class judged by the teacher")
    parser.add_argument("--no-teacher", action="store_true", help="reconstruction figures only (no teacher)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. prior.unet_steps=3000")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    if config.prior.kind != "tiny":
        raise SystemExit(f"prior.kind={config.prior.kind}: only the tiny prior is trained by the engine")

    from engine.data.images import sample_split
    from engine.io.store import atomic_write_json, write_png
    from engine.priors import prior_folder, save_prior_atomically
    from engine.priors.checkpoint import Checkpointer
    from engine.priors.tiny import load_tiny_prior
    from engine.priors.train_tiny import train_tiny_prior

    folder = prior_folder(config.prior, config.data, config.cache_path)
    if not isinstance(folder, Path):
        raise SystemExit(f"prior.path={config.prior.path}: train_prior writes a local folder; train into one, copy it "
                         f"to the object store (e.g. `aws s3 sync`), and give distill runs that URI as prior.path")
    seconds = None
    if folder.exists():
        log(f"{folder} already holds a trained prior: measuring it only")
    else:
        checkpoint = Checkpointer(folder.with_name(folder.name + ".checkpoints"), args.checkpoint_every)
        train = sample_split(config.data, "train", config.prior.train_images, config.prior.seed)  # bounded
        log(f"training the tiny prior on {len(train)} {config.data.name} images at {config.data.image_size}px "
            f"({config.prior.vae_steps} VAE + {config.prior.unet_steps} UNet steps, checkpoints every "
            f"{args.checkpoint_every} in {checkpoint.folder})")
        start = time.perf_counter()
        prior = train_tiny_prior(config.prior, train.images, train.labels, train.class_names, log, checkpoint)
        seconds = time.perf_counter() - start
        folder.parent.mkdir(parents=True, exist_ok=True)
        save_prior_atomically(prior, folder)
        checkpoint.clear()
        log(f"saved {folder}")

    prior = load_tiny_prior(folder)
    # Scored on the validation split (engine/data/splits.py), never on test: the quality figures choose priors.
    val = sample_split(config.data, "val", QUALITY_IMAGES, 0)  # bounded
    quality = {"prior": str(folder), "data": config.data.name, "train_seconds_this_run": seconds,
               "val": reconstruction_quality(prior, val.images)}
    log(f"VAE reconstruction on {len(val)} validation images: MSE {quality['val']['mse']:.5f} "
        f"PSNR {quality['val']['psnr_db']:.2f} dB")
    if not args.no_teacher:
        quality.update(sample_quality(config, prior, val, args.quality_samples))
        s, r = quality["samples"], quality["real"]
        log(f"samples judged by the teacher: class agreement {s['class_agreement']:.3f} (real {r['class_agreement']:.3f})"
            f", Fréchet distance {s['frechet_distance']:.2f} (real {r['frechet_distance']:.2f}), precision "
            f"{s['precision']:.3f} / recall {s['recall']:.3f} (real {r['precision']:.3f} / {r['recall']:.3f})")
    grid = sample_grid(prior, val, config.decode, args.samples_per_class)
    write_png(folder / "samples.png", grid)  # atomic, like every output of the engine
    atomic_write_json(folder / "quality.json", quality)
    log(f"wrote {folder / 'samples.png'} and {folder / 'quality.json'}")
    return folder


if __name__ == "__main__":
    main()
