"""Pretraining of the toy-world base: the tiny Stage C learns to generate the toy distribution from captions.

Plain ε-prediction denoising on freshly rendered images every step (no fixed dataset: the base cannot memorise),
captions from the toy grammar through the tiny CLIP text encoder, caption dropout to zeros (the sampler's
unconditional text), and an EMA of the weights, which is what gets saved. The result plays the role of the
pretrained Stable Cascade: frozen during preference fine-tuning, and the DPO reference.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import StableCascadeUNet

from ppd.config import PPDConfig
from ppd.data.toyworld import caption_grammar, render, sample_scene_params
from ppd.models.codec import ToyCodec
from ppd.models.factory import load_caption_encoder, load_stage_c
from ppd.models.schedule import add_noise


@dataclass(frozen=True)
class PretrainSettings:
    """How long and how hard to pretrain the toy base."""

    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    ema_decay: float = 0.998
    caption_dropout: float = 0.1
    seed: int = 0
    resume_from: Path | None = None  # a saved base to continue training (None: the random tiny init)


def images_to_unit_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1] (the toy codec's input)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def pretrain_toy_base(
    cfg: PPDConfig,
    settings: PretrainSettings,
    out: Path,
    progress: Callable[[int, float], None] | None = None,
) -> dict:
    """Train the tiny Stage C (from its random init) on the toy world and save the EMA weights to `out`."""
    if cfg.model.architecture != "tiny":
        raise ValueError("the toy base is the tiny architecture (model.architecture=tiny)")
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng([settings.seed, 23])
    resume = None if settings.resume_from is None else str(settings.resume_from)
    start_model = cfg.model.model_copy(update={"stage_c_path": resume})  # random tiny init unless resuming
    unet: StableCascadeUNet = load_stage_c(start_model).train().requires_grad_(True)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    encoder = load_caption_encoder(start_model)
    codec = ToyCodec()
    captions = caption_grammar()
    caption_hidden, caption_pooled = encoder.encode_captions(captions)  # [N, 77, C], [N, 1, C]: once, not per step
    clip_img = torch.zeros(settings.batch_size, 1, unet.config.clip_image_in_channels)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.lr, weight_decay=0.0)
    losses: list[float] = []
    began = time.monotonic()
    for step in range(1, settings.steps + 1):
        index = rng.integers(0, len(captions), settings.batch_size)
        images = render(
            [captions[i] for i in index], sample_scene_params(rng, settings.batch_size), cfg.data.toy.image_size
        )
        latents = codec.encode(images_to_unit_range(images))  # [B, 12, 8, 8]
        keep_caption = torch.from_numpy(rng.random(settings.batch_size) >= settings.caption_dropout).float()
        hidden = caption_hidden[index] * keep_caption.view(-1, 1, 1)  # [B, 77, C]; dropped = zeros
        pooled = caption_pooled[index] * keep_caption.view(-1, 1, 1)  # [B, 1, C]
        timestep_ratio = torch.rand(settings.batch_size)
        noise = torch.randn_like(latents)
        noise_pred = unet(
            sample=add_noise(latents, noise, timestep_ratio),
            timestep_ratio=timestep_ratio,
            clip_text_pooled=pooled,
            clip_text=hidden,
            clip_img=clip_img,
            return_dict=False,
        )[0]
        loss = torch.nn.functional.mse_loss(noise_pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for ema_param, param in zip(ema.parameters(), unet.parameters(), strict=True):
                ema_param.lerp_(param, 1 - settings.ema_decay)
        losses.append(loss.item())
        if progress is not None and (step % 100 == 0 or step == settings.steps):
            progress(step, float(np.mean(losses[-100:])))
    out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(out, safe_serialization=True)
    return {
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "final_loss": float(np.mean(losses[-100:])),
        "seconds": time.monotonic() - began,
    }
