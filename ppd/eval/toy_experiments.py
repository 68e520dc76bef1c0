"""The toy-world replication of the paper's experiments: which images to generate, and what the scores mean.

Requests are plain rows (variant, caption, seed, user embedding, ...) so any executor can generate them (the
evaluate job fans them out over a Ray Data actor pool); `summarise_*` turn the scored rows into the numbers of
`results.json`. Generation uses the same seeds for every variant, so comparisons are paired.

- one_reward (paper Sec. 5.1, Table 1, Fig. 3): each one-reward user k is conditioned one-hot; per reward, mean
  reward of base / Diffusion-DPO / SFT / PPD / the DPO upper bound trained on that reward only, and PPD's win
  rate against the base.
- interpolation (Fig. 4): PPD conditioned on w·e_k + (1-w)·e_j; the rank correlation between w and reward k.
- population (Sec. 5.2, Fig. 5): test_seen / test_unseen users conditioned on one of their few-shot groups;
  win rate of PPD against the base under each user's hidden reward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ppd.config import ATTRIBUTES
from ppd.embed.onehot import one_hot_embedding, one_hot_index
from ppd.eval.stats import bootstrap_mean, spearman, win_rate

INTERPOLATION_WEIGHTS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class OneRewardUsers:
    """The one-reward users and their one-hot embeddings [1, K] (the same layout the training data used)."""

    user_ids: Sequence[int]  # user_ids[k] rewards ATTRIBUTES[k]

    def one_hot(self, weights: dict[int, float]) -> np.ndarray:
        """Σ w_u e_u as a [1, K] embedding."""
        return one_hot_embedding(one_hot_index(list(self.user_ids)), weights)


def _request(variant: str, caption: str, seed: int, embedding: np.ndarray | None, **keys) -> dict:
    return {
        "variant": variant,
        "caption": caption,
        "seed": int(seed),
        "embedding": None if embedding is None else embedding.astype(np.float32).ravel().tolist(),
        "embedding_shape": None if embedding is None else list(embedding.shape),
        **keys,
    }


def one_reward_requests(
    users: OneRewardUsers, captions: Sequence[str], seeds: Sequence[int], upper_bound_variants: dict[str, str]
) -> list[dict]:
    """Base and DPO once per (caption, seed); SFT and PPD per user; the DPO upper bound of each reward.

    `upper_bound_variants` maps attribute -> variant name of the DPO model trained on that reward only.
    """
    rows = []
    for caption in captions:
        for seed in seeds:
            rows.append(_request("base", caption, seed, None, experiment="one_reward", user_id=-1))
            rows.append(_request("dpo", caption, seed, None, experiment="one_reward", user_id=-1))
            for attribute, user_id in zip(ATTRIBUTES, users.user_ids, strict=True):
                one_hot = users.one_hot({user_id: 1.0})
                rows.append(_request("sft", caption, seed, one_hot, experiment="one_reward", user_id=user_id))
                rows.append(_request("ppd", caption, seed, one_hot, experiment="one_reward", user_id=user_id))
                if attribute in upper_bound_variants:
                    rows.append(
                        _request(
                            upper_bound_variants[attribute],
                            caption,
                            seed,
                            None,
                            experiment="one_reward",
                            user_id=user_id,
                        )
                    )
    return rows


def interpolation_requests(users: OneRewardUsers, captions: Sequence[str], seeds: Sequence[int]) -> list[dict]:
    """PPD between each reward's user k and the next user j = k+1 (mod K), at `INTERPOLATION_WEIGHTS` on k."""
    rows = []
    ids = list(users.user_ids)
    for k, attribute in enumerate(ATTRIBUTES):
        toward, away = ids[k], ids[(k + 1) % len(ids)]
        for weight in INTERPOLATION_WEIGHTS:
            embedding = users.one_hot({toward: weight, away: 1.0 - weight})
            for caption in captions:
                for seed in seeds:
                    rows.append(
                        _request(
                            "ppd",
                            caption,
                            seed,
                            embedding,
                            experiment="interpolation",
                            user_id=toward,
                            attribute=attribute,
                            weight=weight,
                        )
                    )
    return rows


def population_requests(
    users: pd.DataFrame, captions_per_user: int, seeds: Sequence[int], variant: str = "ppd_population"
) -> list[dict]:
    """Base and PPD per (user, caption, seed); `users` has user_id, split, captions (list), embedding [L, d]."""
    rows = []
    for user in users.itertuples():
        for caption in list(user.captions)[:captions_per_user]:
            for seed in seeds:
                keys = {"experiment": "population", "user_id": int(user.user_id), "split": user.split}
                rows.append(_request("base", caption, seed, None, **keys))
                rows.append(_request(variant, caption, seed, np.asarray(user.embedding), **keys))
    return rows


# --- scoring --------------------------------------------------------------------------------------------------------


def _paired(frame: pd.DataFrame, variant: str, baseline: str, score: str, keys: list[str]) -> pd.DataFrame:
    left = frame[frame.variant == variant][[*keys, score]]
    right = frame[frame.variant == baseline][[*keys, score]]
    return left.merge(right, on=keys, suffixes=("", "_baseline"))


def summarise_one_reward(
    scored: pd.DataFrame, users: OneRewardUsers, upper_bound_variants: dict[str, str], samples: int, seed: int
) -> dict:
    """Per reward: mean reward of every model and PPD's win rate vs the base (rows carry one column per attribute)."""
    out: dict[str, dict] = {}
    rows = scored[scored.experiment == "one_reward"]
    for attribute, user_id in zip(ATTRIBUTES, users.user_ids, strict=True):
        shared = rows[rows.variant.isin(["base", "dpo"])]
        own = rows[
            (rows.user_id == user_id) & rows.variant.isin(["sft", "ppd", upper_bound_variants.get(attribute, "-")])
        ]
        frame = pd.concat([shared, own])
        means = {v: float(frame[frame.variant == v][attribute].mean()) for v in ("base", "dpo", "sft", "ppd")}
        upper = upper_bound_variants.get(attribute)
        means["dpo_upper"] = float(frame[frame.variant == upper][attribute].mean()) if upper else float("nan")
        ppd_vs_base = _paired(frame, "ppd", "base", attribute, ["caption", "seed"])
        dpo_vs_base = _paired(frame, "dpo", "base", attribute, ["caption", "seed"])
        out[attribute] = {
            "mean": means,
            "win_rate_vs_base": win_rate(
                ppd_vs_base[attribute], ppd_vs_base[f"{attribute}_baseline"], samples, seed
            ).as_dict(),
            "dpo_win_rate_vs_base": win_rate(
                dpo_vs_base[attribute], dpo_vs_base[f"{attribute}_baseline"], samples, seed
            ).as_dict(),
        }
    return out


def summarise_interpolation(scored: pd.DataFrame) -> dict:
    """Per reward: mean reward at each weight, and Spearman(weight, mean reward) over the weights.

    The correlation is taken over the per-weight means (5 points), as a sweep is read: does turning the weight up
    turn the reward up? The per-image correlation is reported beside it (noisier: it includes seed variation).
    """
    out = {}
    rows = scored[scored.experiment == "interpolation"]
    for attribute in ATTRIBUTES:
        sweep = rows[rows.attribute == attribute]
        if sweep.empty:
            continue
        means = sweep.groupby("weight")[attribute].mean()
        out[attribute] = {
            "weights": [float(w) for w in means.index],
            "mean_reward": [float(m) for m in means.values],
            "spearman": spearman(means.index.to_numpy(), means.to_numpy()),
            "spearman_per_image": spearman(sweep["weight"].to_numpy(), sweep[attribute].to_numpy()),
        }
    return out


def summarise_population(scored: pd.DataFrame, variant: str, samples: int, seed: int) -> dict:
    """Per split: win rate of PPD vs the base under each user's own hidden reward, CI resampling users."""
    out = {}
    rows = scored[scored.experiment == "population"]
    for split in ("test_seen", "test_unseen"):
        frame = rows[rows.split == split]
        paired = _paired(frame, variant, "base", "user_reward", ["user_id", "caption", "seed"])
        estimate = win_rate(
            paired["user_reward"], paired["user_reward_baseline"], samples, seed, groups=paired["user_id"]
        )
        out[split] = {
            "win_rate_vs_base": estimate.as_dict(),
            "users": int(paired["user_id"].nunique()),
            "mean_reward": {
                "base": float(paired["user_reward_baseline"].mean()) if len(paired) else float("nan"),
                "ppd": float(paired["user_reward"].mean()) if len(paired) else float("nan"),
            },
            "reward_gain": bootstrap_mean(
                paired["user_reward"] - paired["user_reward_baseline"], samples, seed
            ).as_dict(),
        }
    return out


# --- model selection on the validation split (the β sweep) ----------------------------------------------------------


def validation_requests(
    users: OneRewardUsers, captions: Sequence[str], seeds: Sequence[int], variants: Sequence[str]
) -> list[dict]:
    """Every variant (and the base) for every one-reward user, validation caption and seed.

    User-conditioned variants read the user's one-hot embedding; Diffusion-DPO variants ignore it (one model for
    everyone), so their score is how well one model serves all of these users."""
    rows = []
    for variant in ("base", *variants):
        for user_id in users.user_ids:
            one_hot = users.one_hot({user_id: 1.0})
            for caption in captions:
                for seed in seeds:
                    rows.append(_request(variant, caption, seed, one_hot, experiment="validation", user_id=user_id))
    return rows


def summarise_validation(scored: pd.DataFrame, samples: int, seed: int) -> dict:
    """Per variant: mean hidden reward of each row's own user (the toy world's analogue of the paper's validation
    PickScore) and the win rate against the base on the same (user, caption, seed)."""
    out = {}
    rows = scored[scored.experiment == "validation"]
    for variant in sorted(set(rows.variant) - {"base"}):
        paired = _paired(rows, variant, "base", "user_reward", ["user_id", "caption", "seed"])
        out[variant] = {
            "mean_reward": float(paired["user_reward"].mean()),
            "base_mean_reward": float(paired["user_reward_baseline"].mean()),
            "win_rate_vs_base": win_rate(
                paired["user_reward"], paired["user_reward_baseline"], samples, seed, groups=paired["user_id"]
            ).as_dict(),
        }
    return out
