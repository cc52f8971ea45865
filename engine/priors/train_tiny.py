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
from engine.priors.tiny import TinyPrior, build_tiny_prior


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (batch_size,), generator=generator)


def train_vae(prior: TinyPrior, pixels: torch.Tensor, config: PriorConfig, generator, log: Callable) -> float:
    optimizer = torch.optim.AdamW(prior.vae.parameters(), lr=config.learning_rate)
    prior.vae.train()
    loss_value = float("nan")
    for step, index in enumerate(_batches(len(pixels), config.batch_size, config.vae_steps, generator)):
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
    prior.vae.eval()
    return loss_value


def train_unet(prior: TinyPrior, latents: torch.Tensor, labels: torch.Tensor, config: PriorConfig, generator,
               log: Callable) -> float:
    optimizer = torch.optim.AdamW(prior.unet.parameters(), lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate, total_steps=config.unet_steps,
                                                   pct_start=0.05)
    prior.unet.train()
    loss_value = float("nan")
    for step, index in enumerate(_batches(len(latents), config.batch_size, config.unet_steps, generator)):
        z0, y = latents[index], labels[index].clone()
        # Classifier-free guidance: sometimes train the null class on the same images.
        drop = torch.rand(len(y), generator=generator) < config.class_dropout
        y[drop] = prior.null_class
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, config.num_train_timesteps, (len(z0),), generator=generator)
        eps = prior.unet(prior.scheduler.add_noise(z0, noise, t), t, class_labels=y).sample
        loss = F.mse_loss(eps, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_value = loss.item()
        if step % 500 == 0 or step == config.unet_steps - 1:
            log(f"  unet step {step + 1}/{config.unet_steps} loss {loss_value:.4f}")
    prior.unet.eval()
    return loss_value


def train_tiny_prior(config: PriorConfig, images: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...],
                     log: Callable = print) -> TinyPrior:
    if len(images) == 0:
        raise ValueError("cannot train a prior on an empty image set")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    prior = build_tiny_prior(config, images.shape[1], class_names)
    pixels = images_to_tensor(images)
    start = time.perf_counter()
    train_vae(prior, pixels, config, generator, log)
    with torch.no_grad():
        mean_latents = encode_images(prior.vae, images) / prior.vae.config.scaling_factor
    prior.vae.register_to_config(scaling_factor=float(1.0 / mean_latents.std()))
    latents = torch.tensor(mean_latents * prior.vae.config.scaling_factor)
    log(f"  vae done in {time.perf_counter() - start:.0f}s, scaling factor {prior.vae.config.scaling_factor:.4f}")
    train_unet(prior, latents, torch.as_tensor(labels, dtype=torch.long), config, generator, log)
    log(f"  prior trained in {time.perf_counter() - start:.0f}s")
    return prior.eval()
