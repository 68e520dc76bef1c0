"""Generation: the Stage C sampling loop with text guidance and user conditioning, then decoding to pixels.

- Classifier-free guidance on text only, against the encoded empty caption "" (`CaptionEncoder.unconditional_text`):
  what Stable Cascade (and the toy base) dropped captions to in training, never zeros. Both branches get the same
  user, so guidance amplifies the caption, not the user (the user's strength is the scale s).
- Users: one embedding per row, or a weighted mix of users' EMBEDDINGS (`mix_user_embeddings`): the mix enters the
  model like any embedding, so mixing needs nothing from the adapter and weights (1, 0) are exactly user 1.
- Seeds: one generator per row, so a row's image depends on its seed, not on the batch it was generated in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ppd.models.adapter import PersonalizedStageC
from ppd.models.codec import StageBADecoder, ToyCodec
from ppd.models.schedule import denoise, row_generators


def mix_user_embeddings(embeddings: torch.Tensor, weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Σ_k w_k · e_k over users: embeddings [K, L, d], weights [K] (use weights summing to 1) -> [L, d]."""
    weights = torch.as_tensor(weights, dtype=embeddings.dtype, device=embeddings.device)  # [K]
    if weights.shape != (embeddings.shape[0],):
        raise ValueError(f"{embeddings.shape[0]} embeddings but weights of shape {list(weights.shape)}")
    return torch.einsum("k,kld->ld", weights, embeddings)


@torch.no_grad()
def generate_latents(
    model: PersonalizedStageC,
    clip_text_hidden: torch.Tensor,
    clip_text_pooled: torch.Tensor,
    *,
    latent_shape: tuple[int, int, int],
    generators: list[torch.Generator],
    user_embedding: torch.Tensor | None = None,
    user_scale: float | torch.Tensor = 1.0,
    steps: int = 30,
    guidance: float = 4.0,
    clamp_x0: bool = False,
    unconditional_text: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Stage C latents [B, C, H, W] for captions [B, S, C_t] / [B, 1, C_t] and users [B, L, d] (None = base model).

    `user_scale` is s (float or [B]); `guidance` > 1 turns on text guidance against `unconditional_text`
    (hidden [1 or B, S, C_t], pooled [1 or B, 1, C_t]: the encoded empty caption), required then; `clamp_x0` clamps
    x̂₀ to [-1, 1] and re-derives ε before each step (needed for bounded latents such as the toy codec's).
    """
    batch = clip_text_hidden.shape[0]
    device = clip_text_hidden.device
    guided = guidance > 1
    users = None if user_embedding is None else user_embedding.to(device)  # stored embeddings arrive on the CPU
    hidden, pooled = clip_text_hidden, clip_text_pooled
    scale = torch.as_tensor(user_scale, dtype=torch.float32, device=device).expand(batch)  # [B]
    if guided:
        if unconditional_text is None:
            raise ValueError("text guidance needs unconditional_text: the encoded empty caption (unconditional_text())")
        uncond_hidden, uncond_pooled = (
            t.expand_as(c) for t, c in zip(unconditional_text, (hidden, pooled), strict=True)
        )
        # [text rows; unconditional rows]: one forward for both branches, the same user in both.
        hidden = torch.cat([hidden, uncond_hidden])  # [2B, S, C_t]
        pooled = torch.cat([pooled, uncond_pooled])  # [2B, 1, C_t]
        users = None if users is None else users.repeat(2, 1, 1)  # [2B, L, d]
        scale = scale.repeat(2)  # [2B]

    def predict_noise(noisy: torch.Tensor, timestep_ratio: torch.Tensor) -> torch.Tensor:
        if guided:
            noisy, timestep_ratio = noisy.repeat(2, 1, 1, 1), timestep_ratio.repeat(2)
        noise_pred = model(noisy, timestep_ratio, pooled, hidden, user_embedding=users, user_scale=scale).float()
        if not guided:
            return noise_pred
        with_text, without_text = noise_pred.chunk(2)
        return torch.lerp(without_text, with_text, guidance)

    return denoise(predict_noise, (batch, *latent_shape), generators, steps, device=device, clamp_x0=clamp_x0)


@torch.no_grad()
def generate_images(
    model: PersonalizedStageC,
    decoder: ToyCodec | StageBADecoder,
    clip_text_hidden: torch.Tensor,
    clip_text_pooled: torch.Tensor,
    *,
    seeds: Sequence[int],
    latent_shape: tuple[int, int, int],
    user_embedding: torch.Tensor | None = None,
    user_scale: float | torch.Tensor = 1.0,
    steps: int = 30,
    guidance: float = 4.0,
    unconditional_text: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1], one seed per row; Stage C sampling then the decoder (toy codec or Stage B+A)."""
    if len(seeds) != clip_text_hidden.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {clip_text_hidden.shape[0]} rows")
    generators = row_generators(seeds)  # CPU generators: the same images for a seed on any device
    latents = generate_latents(
        model,
        clip_text_hidden,
        clip_text_pooled,
        latent_shape=latent_shape,
        generators=generators,
        user_embedding=user_embedding,
        user_scale=user_scale,
        steps=steps,
        guidance=guidance,
        clamp_x0=decoder.clamp_x0,
        unconditional_text=unconditional_text,
    )
    return decoder.to_images(latents, clip_text_pooled, generators)
