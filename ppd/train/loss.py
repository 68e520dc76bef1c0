"""Training objectives as pure functions of per-sample denoising errors: PPD / Diffusion-DPO, and SFT."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_error(noise_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """‖ε - ε_θ‖² as a per-sample MEAN over all non-batch dims, in float32: [B, ...] -> [B]."""
    squared = (noise_pred.float() - noise.float()) ** 2
    return squared.flatten(start_dim=1).mean(dim=1)


def preference_loss(
    model_error_win: torch.Tensor,
    model_error_lose: torch.Tensor,
    ref_error_win: torch.Tensor,
    ref_error_lose: torch.Tensor,
    *,
    beta: float,
    timesteps: int = 1000,
    weight: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPD loss (paper Eq. 6) = Diffusion-DPO's loss; all errors are per-sample means, shape [B].

        Δ = (model_error_win - ref_error_win) - (model_error_lose - ref_error_lose)
        L = mean_B( -log σ(-β · T · ω · Δ) )

    PPD and the Diffusion-DPO baseline share this function; they differ only in what the policy is conditioned on
    (PPD: the user's embedding; DPO: none). Mapping to Diffusion-DPO's code, `-logsigmoid(-0.5 * beta_dpo *
    (model_diff - ref_diff))` with `model_diff = model_error_win - model_error_lose` (and likewise ref_diff): that
    expression equals Δ there, so with b = β·T this loss equals theirs with beta_dpo = 2b (their beta_dpo = 5000
    corresponds to β·T = 2500, diffusers' example without the 0.5 uses beta_dpo = β·T directly).

    Returns the loss and detached health metrics: implicit accuracy (fraction of pairs with -Δ > 0), mean model and
    reference errors on winners and losers, and the reward margin mean(-β·T·ω·Δ).
    """
    delta = (model_error_win - ref_error_win) - (model_error_lose - ref_error_lose)  # [B]
    logits = -beta * timesteps * weight * delta  # [B]: implicit reward of the winner minus the loser's
    loss = -F.logsigmoid(logits).mean()
    metrics = {
        "loss": loss.detach(),
        "implicit_accuracy": (-delta > 0).float().mean().detach(),
        "model_error_win": model_error_win.mean().detach(),
        "model_error_lose": model_error_lose.mean().detach(),
        "ref_error_win": ref_error_win.mean().detach(),
        "ref_error_lose": ref_error_lose.mean().detach(),
        "reward_margin": logits.mean().detach(),
    }
    return loss, metrics


def sft_loss(model_error_win: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SFT baseline: the denoising loss on preferred images only, mean_B(model_error_win); errors [B]."""
    loss = model_error_win.mean()
    return loss, {"loss": loss.detach(), "model_error_win": loss.detach()}
