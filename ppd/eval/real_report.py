"""Plots of a real-data evaluation (`ppd.eval.real_data`): sample images per user and variant, win rates per reward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ppd.eval.real_data import BASE
from ppd.eval.report import _matplotlib, image_grid


def user_variant_grid(scored: pd.DataFrame, images: np.ndarray, path: Path, users: int = 6) -> Path | None:
    """Rows: evaluated users (first caption, first seed of each); columns: the base, then every variant."""
    if scored.empty:
        return None
    variants = [BASE, *sorted(set(scored["variant"]) - {BASE})]
    first = scored.sort_values(["split", "user_id", "caption", "seed"]).drop_duplicates("user_id")[: max(1, users)]
    cells = []
    for user in first.itertuples():
        same_prompt = scored[
            (scored["user_id"] == user.user_id) & (scored["caption"] == user.caption) & (scored["seed"] == user.seed)
        ]
        matches = [same_prompt[same_prompt["variant"] == variant] for variant in variants]
        cells.append([images[match.index[0]] if len(match) else None for match in matches])
    labels = [f"{user.split}\nuser {user.user_id}" for user in first.itertuples()]
    return image_grid(cells, labels, variants, path, cell_inches=1.5)


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
