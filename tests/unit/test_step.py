"""The training step: schedule, shared noise, which parameters learn, accumulation invariance, the three methods."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMWuerstchenScheduler

from ppd.config import TrainConfig
from ppd.models.adapter import AdapterConfig, PersonalizedStageC, UserAdapter
from ppd.models.schedule import add_noise, alpha_cumprod
from ppd.models.stage_c import build_stage_c
from ppd.train.step import (
    PairRandomness,
    draw_pair_randomness,
    population_user_embedding,
    slice_batch,
    training_step,
)

EMBEDDING_SHAPE = (3, 16)  # [L, d]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _model(seed: int = 0) -> PersonalizedStageC:
    torch.manual_seed(seed)
    base = build_stage_c("tiny")
    config = AdapterConfig(
        embedding_layers=EMBEDDING_SHAPE[0], embedding_dim=EMBEDDING_SHAPE[1], user_tokens=4, conditioning_dim=64
    )
    return PersonalizedStageC(base, UserAdapter(config, base))


def _batch(pairs: int, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "latents_win": torch.rand(pairs, 12, 8, 8, generator=generator) * 2 - 1,
        "latents_lose": torch.rand(pairs, 12, 8, 8, generator=generator) * 2 - 1,
        "clip_text_hidden": torch.randn(pairs, 10, 32, generator=generator),
        "clip_text_pooled": torch.randn(pairs, 1, 32, generator=generator),
        "user_embedding": torch.randn(pairs, *EMBEDDING_SHAPE, generator=generator),
    }


def _train(method: str = "ppd", user_dropout: float = 0.0, pairs: int = 8) -> TrainConfig:
    return TrainConfig(method=method, beta=0.5, user_dropout=user_dropout, micro_batch=pairs, effective_batch=pairs)


def _randomise_values(model: PersonalizedStageC) -> None:
    with torch.no_grad():
        for user_kv in model.adapter.user_kv.values():
            user_kv.to_v.weight.normal_(std=0.2)


def test_alpha_cumprod_matches_the_formula_and_the_scheduler() -> None:
    t = torch.linspace(0, 1, 101)
    s = 0.008
    by_hand = [
        min(
            max(math.cos((x + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2, 1e-4), 0.9999
        )
        for x in t.tolist()
    ]
    assert torch.allclose(alpha_cumprod(t), torch.tensor(by_hand), atol=1e-6)
    # The scheduler's own noising: add_noise(x0 = 1, ε = 0) = √ᾱ, add_noise(x0 = 0, ε = 1) = √(1-ᾱ).
    scheduler = DDPMWuerstchenScheduler()
    ones, zeros = torch.ones(101, 1, 1, 1), torch.zeros(101, 1, 1, 1)
    assert torch.allclose(scheduler.add_noise(ones, zeros, t).flatten() ** 2, alpha_cumprod(t), atol=1e-6)
    clean, noise = torch.randn(101, 2, 3, 3), torch.randn(101, 2, 3, 3)
    assert torch.allclose(add_noise(clean, noise, t), scheduler.add_noise(clean, noise, t), atol=1e-5)


def test_pair_randomness_is_reproducible_and_dropout_follows_p() -> None:
    first = draw_pair_randomness(16, (12, 8, 8), 0.0, torch.Generator().manual_seed(7))
    again = draw_pair_randomness(16, (12, 8, 8), 0.0, torch.Generator().manual_seed(7))
    assert torch.equal(first.noise, again.noise) and torch.equal(first.timestep_ratio, again.timestep_ratio)
    assert bool(first.keep_user.all())
    assert not bool(draw_pair_randomness(16, (12, 8, 8), 1.0, torch.Generator().manual_seed(7)).keep_user.any())
    assert ((first.timestep_ratio >= 0) & (first.timestep_ratio < 1)).all()


def test_identical_images_give_zero_delta_so_noise_and_t_are_shared() -> None:
    model = _model()
    _randomise_values(model)
    batch = _batch(4)
    batch["latents_lose"] = batch["latents_win"].clone()
    output = training_step(model, batch, _train(pairs=4), generator=torch.Generator().manual_seed(0))
    # With the same x₀, t and ε for both images every term of Δ cancels: L = log 2 exactly, accuracy 0.
    assert output.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert output.metrics["implicit_accuracy"].item() == 0.0


def test_only_adapter_parameters_learn() -> None:
    model = _model()
    frozen_before = {name: p.detach().clone() for name, p in model.base.named_parameters()}
    trainable_before = {name: p.detach().clone() for name, p in model.adapter.named_parameters()}
    optimiser = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):  # zero-init W'_v: W'_k and the projection receive gradients from the second step on
        optimiser.zero_grad()
        output = training_step(model, _batch(4), _train(pairs=4), generator=generator)
        output.loss.backward()
        assert all(p.grad is None for p in model.base.parameters())
        optimiser.step()
    unchanged = [name for name, p in model.adapter.named_parameters() if torch.equal(p, trainable_before[name])]
    assert unchanged == []
    assert all(torch.equal(p, frozen_before[name]) for name, p in model.base.named_parameters())


def test_accumulating_eight_micro_batches_equals_one_batch_of_eight() -> None:
    model = _model()
    _randomise_values(model)
    batch, train = _batch(8), _train(user_dropout=0.25)
    randomness = draw_pair_randomness(8, (12, 8, 8), train.user_dropout, torch.Generator().manual_seed(3))

    model.zero_grad()
    whole = training_step(model, batch, train, randomness=randomness)
    whole.loss.backward()
    whole_grads = [p.grad.clone() for p in model.trainable_parameters()]

    model.zero_grad()
    micro_losses = []
    for pair in range(8):
        micro = training_step(
            model, slice_batch(batch, pair, pair + 1), train, randomness=randomness.rows(pair, pair + 1)
        )
        (micro.loss / 8).backward()
        micro_losses.append(micro.loss.detach())
    assert torch.stack(micro_losses).mean().item() == pytest.approx(whole.loss.item(), rel=1e-5)
    for accumulated, reference in zip((p.grad for p in model.trainable_parameters()), whole_grads, strict=True):
        # fp32 sums in a different order: equal up to ~1e-5 of the gradient's scale (β·T = 500 amplifies rounding).
        assert (accumulated - reference).abs().max() <= 1e-4 * reference.abs().max()


def test_user_dropout_zeroes_the_embedding() -> None:
    model = _model()
    _randomise_values(model)
    batch = _batch(4)
    randomness = draw_pair_randomness(4, (12, 8, 8), 0.0, torch.Generator().manual_seed(5))
    all_dropped = PairRandomness(randomness.timestep_ratio, randomness.noise, torch.zeros(4, dtype=torch.bool))
    dropped = training_step(model, batch, _train(pairs=4), randomness=all_dropped)
    zero_users = training_step(
        model, {**batch, "user_embedding": torch.zeros(4, *EMBEDDING_SHAPE)}, _train(pairs=4), randomness=randomness
    )
    kept = training_step(model, batch, _train(pairs=4), randomness=randomness)
    assert dropped.loss.item() == pytest.approx(zero_users.loss.item(), abs=1e-7)
    assert abs(kept.loss.item() - dropped.loss.item()) > 1e-6


def test_dpo_baseline_ignores_user_embeddings() -> None:
    model = _model()
    _randomise_values(model)
    batch = _batch(4)
    randomness = draw_pair_randomness(4, (12, 8, 8), 0.0, torch.Generator().manual_seed(5))
    dpo = training_step(model, batch, _train("dpo", pairs=4), randomness=randomness)
    other_users = training_step(
        model,
        {**batch, "user_embedding": torch.randn(4, *EMBEDDING_SHAPE)},
        _train("dpo", pairs=4),
        randomness=randomness,
    )
    no_users = {key: value for key, value in batch.items() if key != "user_embedding"}
    without_key = training_step(model, no_users, _train("dpo", pairs=4), randomness=randomness)
    # The DPO policy is the adapter with one constant "population" user: PPD where every pair has that user.
    as_ppd_population = training_step(
        model,
        {**batch, "user_embedding": population_user_embedding(4, EMBEDDING_SHAPE)},
        _train("ppd", pairs=4),
        randomness=PairRandomness(randomness.timestep_ratio, randomness.noise, torch.ones(4, dtype=torch.bool)),
    )
    assert dpo.loss.item() == other_users.loss.item() == without_key.loss.item()
    assert dpo.loss.item() == pytest.approx(as_ppd_population.loss.item(), abs=1e-7)


def test_dpo_baseline_learns_from_the_zero_initialised_adapter() -> None:
    # Regression: with a zero "user" the zero-initialised adapter sits at a saddle (zero tokens, zero values) where
    # every gradient is exactly zero, so the baseline never left the base model.
    model = _model()
    batch = _batch(4)
    randomness = draw_pair_randomness(4, (12, 8, 8), 0.0, torch.Generator().manual_seed(6))
    training_step(model, batch, _train("dpo", pairs=4), randomness=randomness).loss.backward()
    value_grads = [kv.to_v.weight.grad for kv in model.adapter.user_kv.values()]
    assert all(g is not None for g in value_grads)
    assert sum(float(g.abs().sum()) for g in value_grads) > 0


def test_sft_is_the_denoising_error_on_winners_only() -> None:
    model = _model()
    _randomise_values(model)
    batch = _batch(4)
    randomness = draw_pair_randomness(4, (12, 8, 8), 0.0, torch.Generator().manual_seed(5))
    output = training_step(model, batch, _train("sft", pairs=4), randomness=randomness)
    other_losers = training_step(
        model, {**batch, "latents_lose": torch.zeros(4, 12, 8, 8)}, _train("sft", pairs=4), randomness=randomness
    )
    assert output.loss.item() == other_losers.loss.item()

    # Independently: x_t from the scheduler, the policy's ε prediction, mean squared error over all elements.
    noisy = DDPMWuerstchenScheduler().add_noise(batch["latents_win"], randomness.noise, randomness.timestep_ratio)
    with torch.no_grad():
        predicted = model(
            noisy,
            randomness.timestep_ratio,
            batch["clip_text_pooled"],
            batch["clip_text_hidden"],
            user_embedding=batch["user_embedding"],
        )
    expected = ((predicted - randomness.noise) ** 2).mean()
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-5)
