"""Stable Cascade's continuous cosine noise schedule: ᾱ(t), forward noising and the reverse (sampling) loop."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from diffusers import DDPMWuerstchenScheduler
from diffusers.utils.torch_utils import randn_tensor

# Offset s of the cosine schedule and the clamp of ᾱ, as in DDPMWuerstchenScheduler's defaults (Stable Cascade).
COSINE_OFFSET = 0.008
ALPHA_CUMPROD_RANGE = (1e-4, 0.9999)


def alpha_cumprod(timestep_ratio: torch.Tensor) -> torch.Tensor:
    """ᾱ(t) = cos²((t+s)/(1+s)·π/2) / cos²(s/(1+s)·π/2), clamped to [1e-4, 0.9999]; t in [0, 1], any shape."""
    s = COSINE_OFFSET
    at_zero = math.cos(s / (1 + s) * math.pi / 2) ** 2
    abar = torch.cos((timestep_ratio.float() + s) / (1 + s) * math.pi / 2) ** 2 / at_zero
    return abar.clamp(*ALPHA_CUMPROD_RANGE)


def add_noise(clean: torch.Tensor, noise: torch.Tensor, timestep_ratio: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x₀ + √(1-ᾱ_t) ε, with one t per row (`timestep_ratio` is [B])."""
    abar = alpha_cumprod(timestep_ratio).view(-1, *([1] * (clean.dim() - 1)))  # [B, 1, 1, 1]
    return (abar.sqrt() * clean.float() + (1 - abar).sqrt() * noise.float()).to(clean.dtype)


def clamp_noise_prediction(noisy: torch.Tensor, noise_pred: torch.Tensor, timestep_ratio: torch.Tensor) -> torch.Tensor:
    """Re-derive ε after clamping the implied x̂₀ to [-1, 1] (keeps a bounded-range sample from drifting)."""
    abar = alpha_cumprod(timestep_ratio).view(-1, *([1] * (noisy.dim() - 1)))  # [B, 1, 1, 1]
    noisy32, pred32 = noisy.float(), noise_pred.float()
    clean = ((noisy32 - (1 - abar).sqrt() * pred32) / abar.sqrt()).clamp(-1, 1)
    return ((noisy32 - abar.sqrt() * clean) / (1 - abar).sqrt()).to(noise_pred.dtype)


def row_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per row, so that a row's noise does not depend on what else is in the batch."""
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


def denoise(
    predict_noise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: tuple[int, ...],
    generators: list[torch.Generator],
    steps: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    clamp_x0: bool = False,
) -> torch.Tensor:
    """Ancestral DDPMWuerstchen sampling from pure noise; `predict_noise(x_t [B,...], t [B]) -> ε [B,...]`."""
    if len(generators) != shape[0]:
        raise ValueError(f"need one generator per row: {len(generators)} generators for batch {shape[0]}")
    scheduler = DDPMWuerstchenScheduler()
    scheduler.set_timesteps(steps, device=device)  # linspace(1, 0, steps + 1)
    latents = randn_tensor(shape, generator=generators, device=torch.device(device), dtype=dtype)
    # The last timestep (0) is only the target of the final step, never a model input.
    for t in scheduler.timesteps[:-1]:
        timestep_ratio = t.expand(shape[0])  # [B], float32: the schedule is computed in full precision
        noise_pred = predict_noise(latents, timestep_ratio)
        if clamp_x0:
            noise_pred = clamp_noise_prediction(latents, noise_pred, timestep_ratio)
        latents = scheduler.step(noise_pred, timestep_ratio, latents, generator=generators).prev_sample
    return latents
