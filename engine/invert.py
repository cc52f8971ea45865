"""Noise space (quantize.space=noise): clean latents -> diffusion states at time t by DDIM inversion, and states ->
latents by the deterministic reverse process. Pure torch; every prior (tiny, sd15, dit) takes part through two
methods: `condition(labels, config)`, its class condition for a batch (prepared once: sd15 encodes its prompts
here), and `guided_eps(x, t, condition, guidance_scale, config)`, its denoiser's classifier-free-guided noise
prediction in epsilon units, whatever it was trained to predict (`epsilon_of`).

t is where img2img at decode.strength starts: the last `strength` fraction of decode.num_steps evenly spaced
timesteps (DDIM's "leading" spacing). Inversion climbs those timesteps from the clean end, the reverse process
descends them; both are DDIM with eta 0,
    x_to = sqrt(a_to) * x0_hat + sqrt(1 - a_to) * eps,   x0_hat = (x_from - sqrt(1 - a_from) * eps) / sqrt(a_from),
with eps the guided prediction at the state being left (inversion evaluates it at the lower-noise state with the
timestep it climbs to, the usual approximation, so a round trip is close, not exact). Inversion uses
decode.inversion_guidance (1 = the class-conditional model alone, which inverts most faithfully).

Why the centroids are rescaled: a state at large t is mostly the noise the inversion recovered, nearly orthogonal
between images, so the mean of n states has a norm far below a single state's (about 1/sqrt(n) of its noise
part) and the sampler, which expects states of the norm it was trained on, would draw a washed-out image.
`match_norms` scales each centroid to the mean norm of the states it represents, which keeps its direction.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def epsilon_of(scheduler, output: torch.Tensor, x: torch.Tensor, t: int) -> torch.Tensor:
    """A denoiser's output at timestep t as the noise it implies: epsilon as is; v = sqrt(a)·eps - sqrt(1-a)·x0
    gives eps = sqrt(a)·v + sqrt(1-a)·x; a predicted sample gives eps = (x - sqrt(a)·x0) / sqrt(1-a)."""
    kind = scheduler.config.prediction_type
    a = float(scheduler.alphas_cumprod[int(t)])
    if kind == "epsilon":
        return output
    if kind == "v_prediction":
        return math.sqrt(a) * output + math.sqrt(1 - a) * x
    if kind == "sample":
        return (x - math.sqrt(a) * output) / math.sqrt(1 - a)
    raise ValueError(f"scheduler prediction_type {kind!r} is not epsilon, v_prediction or sample")


def noise_timesteps(scheduler, num_steps: int, strength: float) -> list[int]:
    """The timesteps the reverse process runs from t down, in that order (highest first)."""
    total = int(scheduler.config.num_train_timesteps)
    step = total // num_steps
    offset = int(scheduler.config.get("steps_offset", 0) or 0)
    every = [i * step + offset for i in range(num_steps)][::-1]
    return every[num_steps - max(1, int(round(num_steps * strength))):]


def clean_alpha(scheduler) -> float:
    """ᾱ at the clean end of the reverse process: 1, or the first training step's, as the scheduler sets it."""
    return 1.0 if scheduler.config.get("set_alpha_to_one", False) else float(scheduler.alphas_cumprod[0])


def ddim_move(x: torch.Tensor, eps: torch.Tensor, a_from: float, a_to: float) -> torch.Tensor:
    x0 = (x - math.sqrt(1 - a_from) * eps) / math.sqrt(a_from)
    return math.sqrt(a_to) * x0 + math.sqrt(1 - a_to) * eps


def _device_tensor(prior, values) -> tuple[torch.Tensor, torch.dtype]:
    """The states in float32 on the denoiser's device, and the denoiser's dtype: the DDIM updates accumulate over
    every step, so they stay in float32 even where the network runs in bfloat16."""
    parameter = next(prior.denoiser.parameters())
    return torch.as_tensor(np.asarray(values), dtype=torch.float32, device=parameter.device), parameter.dtype


@torch.no_grad()
def invert_latents(prior, latents: np.ndarray, labels: np.ndarray, config) -> np.ndarray:
    """Clean latents (N, C, h, w) of their classes -> their states at t (N, C, h, w) float32. `config`: the
    DecodeConfig whose strength and num_steps name t, and whose inversion_guidance guides the climb."""
    scheduler = prior.scheduler
    alphas = scheduler.alphas_cumprod
    x, dtype = _device_tensor(prior, latents)
    condition = prior.condition(np.asarray(labels), config)
    a_from = clean_alpha(scheduler)
    for t in reversed(noise_timesteps(scheduler, config.num_steps, config.strength)):
        eps = prior.guided_eps(x.to(dtype), t, condition, config.inversion_guidance, config).float()
        a_to = float(alphas[t])
        x = ddim_move(x, eps, a_from, a_to)
        a_from = a_to
    return x.float().cpu().numpy()


@torch.no_grad()
def sample_from_states(prior, states: np.ndarray, labels: np.ndarray, config) -> torch.Tensor:
    """States at t (N, C, h, w) -> clean latents, by the reverse process at decode.guidance_scale (no noise)."""
    scheduler = prior.scheduler
    alphas = scheduler.alphas_cumprod
    timesteps = noise_timesteps(scheduler, config.num_steps, config.strength)
    x, dtype = _device_tensor(prior, states)
    condition = prior.condition(np.asarray(labels), config)
    for i, t in enumerate(timesteps):
        eps = prior.guided_eps(x.to(dtype), t, condition, config.guidance_scale, config).float()
        a_to = float(alphas[timesteps[i + 1]]) if i + 1 < len(timesteps) else clean_alpha(scheduler)
        x = ddim_move(x, eps, float(alphas[t]), a_to)
    return x


def match_norms(centroids: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale each centroid (K, d) to the mean norm of the points (n, d) nearest it -> (scaled centroids, the
    factors (K,)). A centroid no point is nearest to keeps its norm."""
    from engine.quantize.transport import squared_distances

    nearest = squared_distances(points, centroids).argmin(axis=1)
    norms = np.linalg.norm(points.astype(np.float64), axis=1)
    factors = np.ones(len(centroids))
    for k in range(len(centroids)):
        members = norms[nearest == k]
        length = float(np.linalg.norm(centroids[k].astype(np.float64)))
        if len(members) and length > 0:
            factors[k] = members.mean() / length
    return (centroids * factors[:, None]).astype(np.float32), factors


@torch.no_grad()
def states_to_images(prior, states: np.ndarray, labels: np.ndarray, config, size: int | None = None) -> np.ndarray:
    """Centroid states at t -> uint8 images (N, size, size, 3): the reverse process, then the prior's VAE decoder."""
    from engine.decode import check_decode_inputs, pixels_to_images

    check_decode_inputs(states, labels, config.strength, len(prior.class_names))
    x = sample_from_states(prior, states, labels, config)
    vae_dtype = next(prior.vae.parameters()).dtype
    pixels = prior.vae.decode((x / prior.vae.config.scaling_factor).to(vae_dtype)).sample  # (N, 3, H, W), [-1, 1]
    return pixels_to_images(pixels, None if size == prior.image_size else size)
