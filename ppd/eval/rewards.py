"""Reward functions that score generated images: the toy world's hidden user rewards (evaluation only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ppd.config import ATTRIBUTES
from ppd.data.toyworld import HiddenRewards, load_hidden_rewards, measure_attributes


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """Images [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3] (what the toy world's attribute measures read)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class ToyRewards:
    """Scores images with the hidden reward of any toy-world user, and with each single attribute."""

    def __init__(self, world_dir: str | Path) -> None:
        self.hidden: HiddenRewards = load_hidden_rewards(Path(world_dir))

    def user_reward(self, user_id: int, images: np.ndarray) -> np.ndarray:
        """Hidden reward of `user_id` for uint8 images [B, H, W, 3] -> [B]."""
        return self.hidden.reward(user_id, images)

    def attribute_scores(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Standardised attributes (the one-reward users' rewards) of uint8 images: name -> [B]."""
        z = self.hidden.scale.standardise(measure_attributes(images))  # [B, A]
        return {name: z[:, k] for k, name in enumerate(ATTRIBUTES)}
