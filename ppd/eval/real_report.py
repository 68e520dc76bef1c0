"""Plots of a real-data evaluation (`ppd.eval.real_data`): sample images per user and variant, win rates per reward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ppd.eval.real_data import BASE

THUMBNAIL = 128  # px: generated images are up to 1024 px; the grid shows them small


def user_variant_grid(scored: pd.DataFrame, images: np.ndarray, path: Path, users: int = 6) -> Path | None:
    """Rows: evaluated users (first caption, first seed of each); columns: the base, then every variant."""
    if scored.empty:
        return None
    from ppd.eval.report import _matplotlib

    variants = [BASE, *sorted(set(scored["variant"]) - {BASE})]
    first = scored.sort_values(["split", "user_id", "caption", "seed"]).drop_duplicates("user_id")[: max(1, users)]
    plt = _matplotlib()
    fig, axes = plt.subplots(
        len(first), len(variants), figsize=(1.5 * len(variants) + 1, 1.5 * len(first)), squeeze=False
    )
    for r, user in enumerate(first.itertuples()):
        for c, variant in enumerate(variants):
            match = scored[
                (scored["variant"] == variant)
                & (scored["user_id"] == user.user_id)
                & (scored["caption"] == user.caption)
                & (scored["seed"] == user.seed)
            ]
            axis = axes[r][c]
            axis.set_xticks([])
            axis.set_yticks([])
            if len(match):
                thumbnail = Image.fromarray(images[match.index[0]])
                thumbnail.thumbnail((THUMBNAIL, THUMBNAIL))
                axis.imshow(np.asarray(thumbnail))
            if r == 0:
                axis.set_title(variant, fontsize=7)
            if c == 0:
                axis.set_ylabel(f"{user.split}\nuser {user.user_id}", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reward_win_bars(reward_summary: dict, path: Path, split: str = "all") -> Path | None:
    """Each variant's win rate against the base per image reward, with 95% CIs (the 50% line = no change)."""
    per_reward = reward_summary.get(split, {})
    bars = [
        (f"{reward}\n{variant}", estimate)
        for reward, entry in per_reward.items()
        for variant, estimate in entry["win_rate_vs_base"].items()
    ]
    if not bars:
        return None
    from ppd.eval.report import _matplotlib

    plt = _matplotlib()
    values = np.array([estimate["value"] for _, estimate in bars])
    low = values - np.array([estimate["ci95"][0] for _, estimate in bars])
    high = np.array([estimate["ci95"][1] for _, estimate in bars]) - values
    fig, axis = plt.subplots(figsize=(0.9 * len(bars) + 1.5, 3))
    axis.bar(range(len(bars)), values, yerr=np.nan_to_num(np.stack([low, high])), capsize=3)
    axis.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    axis.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=6)
    axis.set_ylim(0, 1)
    axis.set_ylabel(f"win rate vs base ({split})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
