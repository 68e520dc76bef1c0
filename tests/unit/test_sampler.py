"""Sampling: seeds, per-row independence, user mixing, text guidance, x̂₀ clamping, decoding to pixels."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMWuerstchenScheduler

from ppd.models.adapter import AdapterConfig, PersonalizedStageC, UserAdapter
from ppd.models.codec import ToyCodec
from ppd.models.factory import load_tiny_stage_ba_decoder
from ppd.models.schedule import alpha_cumprod, clamp_noise_prediction, row_generators
from ppd.models.stage_c import build_stage_c
from ppd.sample import generate_images, generate_latents, mix_user_embeddings

EMBEDDING_SHAPE = (2, 16)  # [L, d]
LATENT_SHAPE = (12, 8, 8)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def model() -> PersonalizedStageC:
    torch.manual_seed(0)
    base = build_stage_c("tiny")
    config = AdapterConfig(
        embedding_layers=EMBEDDING_SHAPE[0], embedding_dim=EMBEDDING_SHAPE[1], user_tokens=4, conditioning_dim=64
    )
    model = PersonalizedStageC(base, UserAdapter(config, base))
    with torch.no_grad():
        for user_kv in model.adapter.user_kv.values():
            user_kv.to_v.weight.normal_(std=0.2)  # a "trained" adapter: users change the output
    return model


def _captions(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 10, 32, generator=generator), torch.randn(rows, 1, 32, generator=generator)


def _sample(model: PersonalizedStageC, hidden, pooled, seeds, users=None, steps: int = 4, **kwargs) -> torch.Tensor:
    # Clamping x̂₀ (as for the toy codec) keeps an untrained model's samples in range, so tolerances stay meaningful.
    kwargs.setdefault("clamp_x0", True)
    kwargs.setdefault("unconditional_text", _captions(1, seed=9))  # stands in for the encoded ""
    return generate_latents(
        model,
        hidden,
        pooled,
        latent_shape=LATENT_SHAPE,
        generators=row_generators(seeds),
        user_embedding=users,
        steps=steps,
        **kwargs,
    )


def test_toy_codec_round_trip_is_exact_and_lays_out_pixels() -> None:
    codec = ToyCodec()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = codec.encode(images)
    assert latents.shape == (2, *codec.latent_shape(16)) == (2, 12, 8, 8)
    assert torch.equal(codec.decode(latents), images)
    # latent[c·4 + 2i + j, y, x] = image[c, 2y + i, 2x + j]
    assert latents[1, 2 * 4 + 2 * 1 + 0, 3, 5] == images[1, 2, 2 * 3 + 1, 2 * 5 + 0]
    assert torch.allclose(codec.to_images(latents), (images + 1) / 2)


def test_clamped_noise_prediction_implies_a_clamped_x0() -> None:
    generator = torch.Generator().manual_seed(0)
    noisy, noise_pred = torch.randn(4, 12, 8, 8, generator=generator), torch.randn(4, 12, 8, 8, generator=generator)
    t = torch.tensor([0.9, 0.5, 0.2, 0.05])
    abar = alpha_cumprod(t).view(-1, 1, 1, 1)
    x0_before = (noisy - (1 - abar).sqrt() * noise_pred) / abar.sqrt()
    clamped = clamp_noise_prediction(noisy, noise_pred, t)
    x0_after = (noisy - (1 - abar).sqrt() * clamped) / abar.sqrt()
    assert torch.allclose(x0_after, x0_before.clamp(-1, 1), atol=1e-4)
    inside = x0_before.abs() <= 1  # where x̂₀ was already in range ε is unchanged
    assert torch.allclose(clamped[inside], noise_pred[inside], atol=1e-4)


def test_sampling_is_deterministic_per_seed(model) -> None:
    hidden, pooled = _captions(2)
    users = torch.randn(2, *EMBEDDING_SHAPE)
    first = _sample(model, hidden, pooled, [3, 4], users)
    again = _sample(model, hidden, pooled, [3, 4], users)
    other = _sample(model, hidden, pooled, [5, 4], users)
    assert torch.equal(first, again)
    assert (first[0] - other[0]).abs().max() > 1e-3
    assert torch.allclose(first[1], other[1], atol=1e-5)


def test_a_row_does_not_depend_on_its_batch(model) -> None:
    hidden, pooled = _captions(3)
    users = torch.randn(3, *EMBEDDING_SHAPE)
    batched = _sample(model, hidden, pooled, [10, 11, 12], users, user_scale=torch.tensor([1.0, 0.3, 0.0]))
    alone = _sample(model, hidden[1:2], pooled[1:2], [11], users[1:2], user_scale=0.3)
    # Equal up to batch-size-dependent fp32 rounding of the CPU kernels, carried through 4 steps (latents in [-1, 1]).
    assert torch.allclose(batched[1:2], alone, atol=1e-3)


def test_mixing_users(model) -> None:
    user_a, user_b = torch.randn(*EMBEDDING_SHAPE), torch.randn(*EMBEDDING_SHAPE)
    both = torch.stack([user_a, user_b])  # [K, L, d]
    assert torch.equal(mix_user_embeddings(both, [1.0, 0.0]), user_a)
    assert torch.allclose(mix_user_embeddings(both, [0.25, 0.75]), 0.25 * user_a + 0.75 * user_b)
    hidden, pooled = _captions(1)
    mixed = mix_user_embeddings(both, [1.0, 0.0]).unsqueeze(0)
    assert torch.equal(_sample(model, hidden, pooled, [7], mixed), _sample(model, hidden, pooled, [7], user_a[None]))
    assert (
        _sample(model, hidden, pooled, [7], user_b[None]) - _sample(model, hidden, pooled, [7], mixed)
    ).abs().max() > 1e-3


def test_guidance_without_the_unconditional_text_is_refused(model) -> None:
    # No silent zeros: Stable Cascade (and the toy base) never saw a zero caption, only the encoded "".
    hidden, pooled = _captions(2)
    with pytest.raises(ValueError, match="unconditional_text"):
        _sample(model, hidden, pooled, [1, 2], steps=1, guidance=3.0, unconditional_text=None)
    _sample(
        model, hidden, pooled, [1, 2], steps=1, guidance=1.0, unconditional_text=None
    )  # unguided: nothing to guide against


def test_one_guided_step_by_hand(model) -> None:
    """steps=1 is a single scheduler step from t = 1 to 0 on uncond + g·(cond - uncond)."""
    hidden, pooled = _captions(2)
    users = torch.randn(2, *EMBEDDING_SHAPE)
    guidance = 3.0
    uncond_hidden, uncond_pooled = _captions(1, seed=9)  # as the encoded "": one row, broadcast to the batch
    given = (uncond_hidden, uncond_pooled)
    sampled = _sample(
        model, hidden, pooled, [1, 2], users, steps=1, guidance=guidance, clamp_x0=False, unconditional_text=given
    )

    start = torch.cat([torch.randn(1, *LATENT_SHAPE, generator=g) for g in row_generators([1, 2])])
    t = torch.ones(2)
    with torch.no_grad():
        with_text = model(start, t, pooled, hidden, user_embedding=users)
        without_text = model(
            start, t, uncond_pooled.expand_as(pooled), uncond_hidden.expand_as(hidden), user_embedding=users
        )
    noise_pred = without_text + guidance * (with_text - without_text)
    scheduler = DDPMWuerstchenScheduler()
    scheduler.set_timesteps(1)
    expected = scheduler.step(noise_pred, t, start).prev_sample  # the last step adds no noise
    # The t = 1 -> 0 step scales ε by ~1/√ᾱ(1) = 100, so compare relative to the largest value (~400 here).
    assert (sampled - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_toy_images_have_the_image_size_and_range(model) -> None:
    hidden, pooled = _captions(2)
    images = generate_images(
        model,
        ToyCodec(),
        hidden,
        pooled,
        seeds=[0, 1],
        latent_shape=LATENT_SHAPE,
        user_embedding=None,
        steps=3,
        unconditional_text=_captions(1, seed=9),
    )
    assert images.shape == (2, 3, 16, 16)
    assert images.min() >= 0 and images.max() <= 1


def test_stage_b_and_a_decode_to_the_expected_size(model, tmp_path_factory) -> None:
    decoder = load_tiny_stage_ba_decoder(tmp_path_factory.getbasetemp() / "ppd-models")
    decoder.steps = 2
    hidden, pooled = _captions(2)
    images = generate_images(
        model,
        decoder,
        hidden,
        pooled,
        seeds=[0, 1],
        latent_shape=LATENT_SHAPE,
        user_embedding=torch.randn(2, *EMBEDDING_SHAPE),
        steps=2,
        unconditional_text=_captions(1, seed=9),
    )
    # Stage C 8x8 -> Stage B 8 * 2.0 = 16x16 -> Stage A x4 (one stride-2 level, pixel shuffle 2) = 64x64 RGB.
    assert images.shape == (2, 3, 64, 64)
    assert images.min() >= 0 and images.max() <= 1
