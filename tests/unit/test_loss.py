"""Losses against hand-computed values; the caption-augmentation baseline."""

from __future__ import annotations

import math

import pytest
import torch

from ppd.models.text import augment_caption
from ppd.train.loss import per_sample_error, preference_loss, sft_loss


def test_per_sample_error_is_a_mean_over_latent_dims() -> None:
    prediction = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])  # [2, 1, 1, 2]
    target = torch.tensor([[[[0.0, 0.0]]], [[[3.0, -1.0]]]])
    # row 0: (1 + 4) / 2 = 2.5; row 1: (9 + 1) / 2 = 5
    assert torch.allclose(per_sample_error(prediction, target), torch.tensor([2.5, 5.0]))


def test_preference_loss_by_hand() -> None:
    """L = -log σ(-β·T·Δ), Δ = (model_win - ref_win) - (model_lose - ref_lose): the paper's β convention (Diffusion-DPO's
    code writes -0.5·β_dpo·Δ inside the sigmoid, so its β_dpo is 2·β·T here)."""
    model_win, model_lose = torch.tensor([0.5, 0.2]), torch.tensor([0.4, 0.3])
    ref_win, ref_lose = torch.tensor([0.45, 0.25]), torch.tensor([0.42, 0.28])
    # Δ₁ = (0.5 - 0.45) - (0.4 - 0.42) = 0.07, Δ₂ = (0.2 - 0.25) - (0.3 - 0.28) = -0.07; β·T = 0.01 · 1000 = 10
    # L = mean(-log σ(-0.7), -log σ(0.7)) = mean(log(1 + e^0.7), log(1 + e^-0.7))
    expected = (math.log(1 + math.exp(0.7)) + math.log(1 + math.exp(-0.7))) / 2
    loss, metrics = preference_loss(model_win, model_lose, ref_win, ref_lose, beta=0.01, timesteps=1000)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["implicit_accuracy"].item() == pytest.approx(0.5)  # only pair 2 has -Δ > 0
    assert metrics["reward_margin"].item() == pytest.approx(0.0, abs=1e-5)  # (-0.7 + 0.7) / 2
    assert metrics["model_error_win"].item() == pytest.approx(0.35)
    assert metrics["model_error_lose"].item() == pytest.approx(0.35)
    assert metrics["ref_error_win"].item() == pytest.approx(0.35)
    assert metrics["ref_error_lose"].item() == pytest.approx(0.35)


def test_preference_loss_weight_scales_the_logit() -> None:
    errors = [torch.tensor([0.3]), torch.tensor([0.1]), torch.tensor([0.2]), torch.tensor([0.2])]
    # Δ = 0.1 - (-0.1) = 0.2; β·T·ω = 0.005 · 1000 · 0.5 = 2.5 -> -log σ(-0.5) = log(1 + e^0.5)
    loss, metrics = preference_loss(*errors, beta=0.005, timesteps=1000, weight=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(0.5)), rel=1e-5)
    assert metrics["implicit_accuracy"].item() == 0.0


def test_preference_loss_at_the_reference_is_log_two() -> None:
    errors = torch.rand(8)
    loss, metrics = preference_loss(errors, errors + 0.1, errors, errors + 0.1, beta=2.0)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert metrics["implicit_accuracy"].item() == 0.0  # Δ = 0 is not "correct"


def test_preference_loss_gradient_lowers_winner_error() -> None:
    model_win = torch.tensor([0.5], requires_grad=True)
    model_lose = torch.tensor([0.5], requires_grad=True)
    loss, _ = preference_loss(model_win, model_lose, torch.tensor([0.5]), torch.tensor([0.5]), beta=0.001)
    loss.backward()
    # d/dΔ of -log σ(-bΔ) at Δ = 0 is b/2 = 0.5: push the winner's error down, the loser's up.
    assert model_win.grad.item() == pytest.approx(0.5)
    assert model_lose.grad.item() == pytest.approx(-0.5)


def test_sft_loss_is_the_mean_winner_error() -> None:
    loss, metrics = sft_loss(torch.tensor([1.0, 2.0, 6.0]))
    assert loss.item() == pytest.approx(3.0)
    assert metrics["model_error_win"].item() == pytest.approx(3.0)


def test_augment_caption_appends_a_capped_profile() -> None:
    profile = "prefers bright saturated images with a centred subject and warm colours"
    assert augment_caption("a red circle", profile, max_profile_words=3) == "a red circle. prefers bright saturated"
    assert augment_caption("a red circle.", "likes blue") == "a red circle. likes blue"
    assert augment_caption("  a red circle ", "") == "a red circle"
