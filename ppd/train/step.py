"""One framework-free training step of the user adapter: PPD, the Diffusion-DPO baseline, or SFT.

A batch is a dict of precomputed tensors (B pairs):

    latents_win, latents_lose   [B, C, H, W]   Stage C latents of the preferred / rejected image
    clip_text_hidden            [B, S, C_t]    caption hidden states (CaptionEncoder.encode_captions)
    clip_text_pooled            [B, 1, C_t]    pooled caption embedding
    user_embedding              [B, L, d]      the user's few-shot embedding (float32); optional for "dpo"

Randomness (t, ε, user dropout) is drawn per pair by `draw_pair_randomness` or passed in, so that a batch split
into micro-batches sees exactly the same draws (gradient accumulation is then exact).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ppd.config import TrainConfig
from ppd.models.adapter import PersonalizedStageC
from ppd.models.schedule import add_noise
from ppd.train.loss import per_sample_error, preference_loss, sft_loss

BATCH_KEYS = ("latents_win", "latents_lose", "clip_text_hidden", "clip_text_pooled", "user_embedding")


@dataclass(frozen=True)
class PairRandomness:
    """Per-pair draws shared by the two images of a pair."""

    timestep_ratio: torch.Tensor  # [B] t ~ U(0, 1)
    noise: torch.Tensor  # [B, C, H, W] ε ~ N(0, I)
    keep_user: torch.Tensor  # [B] bool: False = this pair's user embedding is zeroed (user dropout)

    def rows(self, start: int, stop: int) -> PairRandomness:
        """The draws of pairs [start, stop) (for micro-batching)."""
        return PairRandomness(self.timestep_ratio[start:stop], self.noise[start:stop], self.keep_user[start:stop])


@dataclass(frozen=True)
class StepOutput:
    """Loss to back-propagate and detached metrics to log."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def draw_pair_randomness(
    batch_size: int,
    latent_shape: tuple[int, ...],
    user_dropout: float,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> PairRandomness:
    """Draw t, ε and the user-dropout mask for `batch_size` pairs from `generator` (on its device), then move them."""
    gen_device = generator.device
    timestep_ratio = torch.rand(batch_size, generator=generator, device=gen_device)
    noise = torch.randn((batch_size, *latent_shape), generator=generator, device=gen_device)
    keep_user = torch.rand(batch_size, generator=generator, device=gen_device) >= user_dropout
    return PairRandomness(timestep_ratio.to(device), noise.to(device), keep_user.to(device))


def slice_batch(batch: Mapping[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Pairs [start, stop) of a batch dict."""
    return {key: value[start:stop] for key, value in batch.items()}


def training_step(
    model: PersonalizedStageC,
    batch: Mapping[str, torch.Tensor],
    train: TrainConfig,
    *,
    randomness: PairRandomness | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """Loss and metrics of one (micro-)batch for `train.method`; draws randomness from `generator` if not given.

    - ppd: policy = adapter on with the (dropped-out) user embedding, reference = adapter off; preference loss.
    - dpo: the Diffusion-DPO baseline under the same code: the policy always gets the same constant embedding
      (`population_user_embedding`: every pair's "user" is the whole population), so the adapter learns a single
      population-wide shift; reference = adapter off. At inference, pass the same constant.
    - sft: user-conditioned denoising loss on the preferred images only (no loser, no reference).

    `model` is the PersonalizedStageC itself; under DeepSpeed or DDP pass the wrapped module (`engine.module`) and
    back-propagate through the engine.
    """
    latents_win = batch["latents_win"]  # [B, C, H, W]
    pairs, device = latents_win.shape[0], latents_win.device
    if randomness is None:
        if generator is None:
            raise ValueError("pass either the pre-drawn randomness or a generator to draw it from")
        randomness = draw_pair_randomness(pairs, tuple(latents_win.shape[1:]), train.user_dropout, generator, device)
    user_embedding = _policy_user_embedding(model, batch, train.method, randomness.keep_user)  # [B, L, d]
    timestep_ratio, noise = randomness.timestep_ratio, randomness.noise

    if train.method == "sft":
        noisy_win = add_noise(latents_win, noise, timestep_ratio)
        noise_pred = model(
            noisy_win,
            timestep_ratio,
            batch["clip_text_pooled"],
            batch["clip_text_hidden"],
            user_embedding=user_embedding,
        )
        loss, metrics = sft_loss(per_sample_error(noise_pred, noise))
        return StepOutput(loss, {**metrics, "user_kept": randomness.keep_user.float().mean()})

    # Winner and loser share t and ε, and go through the network together: one [2B] forward per model.
    noisy = torch.cat(
        [add_noise(latents_win, noise, timestep_ratio), add_noise(batch["latents_lose"], noise, timestep_ratio)]
    )
    timestep_ratio2 = timestep_ratio.repeat(2)  # [2B]
    noise2 = noise.repeat(2, 1, 1, 1)  # [2B, C, H, W]
    pooled2 = batch["clip_text_pooled"].repeat(2, 1, 1)  # [2B, 1, C_t]
    hidden2 = batch["clip_text_hidden"].repeat(2, 1, 1)  # [2B, S, C_t]

    policy_pred = model(noisy, timestep_ratio2, pooled2, hidden2, user_embedding=user_embedding.repeat(2, 1, 1))
    model_error_win, model_error_lose = per_sample_error(policy_pred, noise2).chunk(2)
    with torch.no_grad():
        ref_pred = model(noisy, timestep_ratio2, pooled2, hidden2, user_embedding=None)  # adapter off = base model
        ref_error_win, ref_error_lose = per_sample_error(ref_pred, noise2).chunk(2)
    loss, metrics = preference_loss(
        model_error_win, model_error_lose, ref_error_win, ref_error_lose, beta=train.beta, timesteps=train.timesteps
    )
    if train.method == "ppd":
        metrics["user_kept"] = randomness.keep_user.float().mean()
    return StepOutput(loss, metrics)


def population_user_embedding(batch: int, embedding_shape: tuple[int, int]) -> torch.Tensor:
    """The Diffusion-DPO baseline's one "user" [B, L, d]: all ones.

    Not zeros: a zero embedding projects to zero user tokens (LayerNorm of the zero bias), so K' = V' = 0 and every
    adapter gradient is exactly zero: the baseline would never move from the base model."""
    return torch.ones(batch, *embedding_shape, dtype=torch.float32)


def _policy_user_embedding(
    model: PersonalizedStageC, batch: Mapping[str, torch.Tensor], method: str, keep_user: torch.Tensor
) -> torch.Tensor:
    if method == "dpo":
        config = model.adapter.config
        pairs = batch["latents_win"].shape[0]
        return population_user_embedding(pairs, (config.embedding_layers, config.embedding_dim)).to(
            batch["latents_win"].device
        )
    if "user_embedding" not in batch:
        raise KeyError(f"method {method!r} needs batch['user_embedding'] [B, L, d]")
    user_embedding = batch["user_embedding"].float()  # [B, L, d]
    return user_embedding * keep_user.to(user_embedding.dtype).view(-1, 1, 1)
