"""Train the `tiny` prior on an image set: first the AutoencoderKL, then a class-conditional UNet on its latents.

images (N, H, W, 3) uint8 + labels (N,) -> TinyPrior. Seeded and CPU-sized: for digits at 16x16 it takes a
couple of minutes on 2 cores. The VAE scaling factor is set to 1 / std of the training latents, so the
diffusion model sees unit-variance inputs like Stable Diffusion's (0.18215 is the same idea).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from engine.config import PriorConfig
from engine.encode import encode_images, images_to_tensor
from engine.priors.checkpoint import Checkpointer
from engine.priors.ema import EmaWeights
from engine.priors.tiny import TinyPrior, build_tiny_prior


def _resume_step(checkpoint: Checkpointer | None, phase: str, prior: TinyPrior, optimizer, lr_schedule,
                 generator: torch.Generator, log: Callable, ema: EmaWeights | None = None) -> int:
    """The step to start `phase` at: 0, or the last checkpoint's step with weights/optimizer/RNG (and the UNet's
    moving average) restored."""
    state = checkpoint.state() if checkpoint else None
    if state is None or state["phase"] != phase or state["step"] == 0:
        return 0
    checkpoint.restore(prior, optimizer, lr_schedule, generator, ema)
    log(f"  resuming the {phase} at step {state['step']} from {checkpoint.folder}")
    return int(state["step"])


def train_vae(prior: TinyPrior, pixels: torch.Tensor, config: PriorConfig, generator, log: Callable,
              checkpoint: Checkpointer | None = None) -> float:
    optimizer = torch.optim.AdamW(prior.vae.parameters(), lr=config.learning_rate)
    start = _resume_step(checkpoint, "vae", prior, optimizer, None, generator, log)
    prior.vae.train()
    loss_value = float("nan")
    for step in range(start, config.vae_steps):
        index = torch.randint(0, len(pixels), (config.batch_size,), generator=generator)
        x = pixels[index]  # (B, 3, H, W)
        posterior = prior.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = prior.vae.decode(z).sample
        loss = F.mse_loss(recon, x) + config.kl_weight * posterior.kl().mean() / x[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        if step % 250 == 0 or step == config.vae_steps - 1:
            log(f"  vae step {step + 1}/{config.vae_steps} loss {loss_value:.4f}")
        if checkpoint and checkpoint.due(step + 1, config.vae_steps):
            checkpoint.save("vae", step + 1, prior, optimizer, None, generator)
    prior.vae.eval()
    return loss_value


def one_cycle(optimizer, learning_rate: float, steps: int):
    """OneCycleLR with a 5% warm-up. It divides by (warm-up steps - 1) and by the steps after the warm-up, so a
    warm-up of exactly one step (5% of 20) or of every step would divide by zero: at least two, or none at all."""
    warmup = max(2, round(0.05 * steps)) if steps >= 3 else 0
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=warmup / steps)


def denoising_loss(prior: TinyPrior, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, output: torch.Tensor,
                   config: PriorConfig) -> torch.Tensor:
    """The UNet's loss on one batch: MSE to its target (the noise, or v), per sample weighted by min-SNR."""
    target = noise if config.prediction == "epsilon" else prior.scheduler.get_velocity(z0, noise, t)
    per_sample = F.mse_loss(output, target, reduction="none").flatten(1).mean(1)
    if config.min_snr_gamma > 0:
        alpha_bar = prior.scheduler.alphas_cumprod.to(z0.device)[t]
        snr = alpha_bar / (1 - alpha_bar)
        weight = snr.clamp(max=config.min_snr_gamma) / (snr if config.prediction == "epsilon" else snr + 1)
        per_sample = per_sample * weight
    return per_sample.mean()


def train_unet(prior: TinyPrior, latents: torch.Tensor, labels: torch.Tensor, config: PriorConfig, generator,
               log: Callable, checkpoint: Checkpointer | None = None) -> float:
    """Trains prior.unet; with prior.ema_decay the UNet left in the prior (saved, sampled from) holds the
    moving average of its weights, not the last step's."""
    optimizer = torch.optim.AdamW(prior.unet.parameters(), lr=config.learning_rate)
    schedule = one_cycle(optimizer, config.learning_rate, config.unet_steps)
    ema = EmaWeights(prior.unet, config.ema_decay) if config.ema_decay > 0 else None
    start = _resume_step(checkpoint, "unet", prior, optimizer, schedule, generator, log, ema)
    prior.unet.train()
    loss_value = float("nan")
    for step in range(start, config.unet_steps):
        index = torch.randint(0, len(latents), (config.batch_size,), generator=generator)
        z0, y = latents[index], labels[index].clone()
        # Classifier-free guidance: sometimes train the null class on the same images.
        drop = torch.rand(len(y), generator=generator) < config.class_dropout
        y[drop] = prior.null_class
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, config.num_train_timesteps, (len(z0),), generator=generator)
        output = prior.unet(prior.scheduler.add_noise(z0, noise, t), t, class_labels=y).sample
        loss = denoising_loss(prior, z0, noise, t, output, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if ema is not None:
            ema.update(prior.unet)
        loss_value = loss.item()
        if step % 500 == 0 or step == config.unet_steps - 1:
            log(f"  unet step {step + 1}/{config.unet_steps} loss {loss_value:.4f}")
        if checkpoint and checkpoint.due(step + 1, config.unet_steps):
            checkpoint.save("unet", step + 1, prior, optimizer, schedule, generator, ema)
    if ema is not None:
        ema.copy_to(prior.unet)  # what the saved prior samples with
    prior.unet.eval()
    return loss_value


def train_tiny_prior(config: PriorConfig, images: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...],
                     log: Callable = print, checkpoint: Checkpointer | None = None) -> TinyPrior:
    """With a checkpointer, training saves every `checkpoint.every` steps and resumes from its last checkpoint: the
    result equals an uninterrupted run's (weights, optimizer, LR schedule and RNG state are all restored)."""
    if len(images) == 0:
        raise ValueError("cannot train a prior on an empty image set")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    prior = build_tiny_prior(config, images.shape[1], class_names)
    pixels = images_to_tensor(images)
    start = time.perf_counter()
    state = checkpoint.state() if checkpoint else None
    if state is None or state["phase"] == "vae":
        train_vae(prior, pixels, config, generator, log, checkpoint)
        with torch.no_grad():
            mean_latents = encode_images(prior.vae, images) / prior.vae.config.scaling_factor
        prior.vae.register_to_config(scaling_factor=float(1.0 / mean_latents.std()))
        if checkpoint:  # the finished VAE: a resume from here skips straight to the UNet
            checkpoint.save("unet", 0, prior, None, None, generator)
    else:
        checkpoint.restore(prior, None, None, generator)
        prior.vae.eval()  # as after train_vae: train mode encodes differently in the last bits
        log(f"  vae restored from {checkpoint.folder}")
    # Latents through the (scaled) VAE the same way whether or not the run resumed, so both give identical weights.
    with torch.no_grad():
        latents = torch.tensor(encode_images(prior.vae, images))
    log(f"  vae done in {time.perf_counter() - start:.0f}s, scaling factor {prior.vae.config.scaling_factor:.4f}")
    train_unet(prior, latents, torch.as_tensor(labels, dtype=torch.long), config, generator, log, checkpoint)
    log(f"  prior trained in {time.perf_counter() - start:.0f}s")
    return prior.eval()
