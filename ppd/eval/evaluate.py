"""The toy-world evaluation as data: inputs -> generation requests; generated images -> scores -> results.

Executors (the Ray Data job, or a plain loop in tests) call `VariantGenerator.generate` on the requests; everything
before and after is here and pure.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from ppd.config import ATTRIBUTES, PPDConfig
from ppd.data.prepare import stable_unit
from ppd.eval.rewards import ToyRewards
from ppd.eval.toy_experiments import (
    OneRewardUsers,
    interpolation_requests,
    one_reward_requests,
    population_requests,
    summarise_interpolation,
    summarise_one_reward,
    summarise_population,
)

POPULATION_VARIANT = "ppd_population"


def upper_bound_variant(attribute: str) -> str:
    """Variant name of the DPO model trained on one reward only."""
    return f"dpo_upper_{attribute}"


def read_split(prepared: Path, split: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """One split of a prepared folder (empty frame when the split has no rows)."""
    files = sorted((Path(prepared) / split).glob("*.parquet"))
    if not files:
        return pd.DataFrame(columns=list(columns or []))
    return pq.read_table(files, columns=list(columns) if columns else None).to_pandas()


def evaluation_captions(prepared: Path, count: int, seed: int) -> list[str]:
    """`count` held-out captions (test_seen) in a seed-fixed order."""
    captions = read_split(prepared, "test_seen", ["caption"])["caption"].unique().tolist()
    return sorted(captions, key=lambda c: stable_unit(seed, "eval-caption", c))[:count]


def population_users(
    prepared: Path, embeddings: dict[tuple[int, int], np.ndarray], users_per_split: int, seed: int
) -> pd.DataFrame:
    """Evaluated users per test split: their held-out captions and the embedding of one of their few-shot groups.

    A test_seen user is conditioned on a group of its training pairs, a test_unseen user on a group of its own
    held-out pairs that does not contain the evaluated pair's caption row (the preparation's condition group).
    """
    records = []
    for split in ("test_seen", "test_unseen"):
        rows = read_split(prepared, split, ["user_id", "caption", "condition_group_id"])
        rows = rows[rows["condition_group_id"].notna()]
        chosen = sorted(rows["user_id"].unique(), key=lambda u: stable_unit(seed, "eval-user", int(u)))[
            :users_per_split
        ]
        for user_id in chosen:
            own = rows[rows["user_id"] == user_id]
            for group_id in sorted(own["condition_group_id"].astype(int).unique()):
                if (int(user_id), group_id) in embeddings:
                    captions = sorted(own["caption"].unique(), key=lambda c: stable_unit(seed, "eval-caption", c))
                    records.append(
                        {
                            "user_id": int(user_id),
                            "split": split,
                            "group_id": group_id,
                            "captions": captions,
                            "embedding": embeddings[(int(user_id), group_id)],
                        }
                    )
                    break
    return pd.DataFrame(records, columns=["user_id", "split", "group_id", "captions", "embedding"])


def build_requests(
    cfg: PPDConfig,
    one_reward_prepared: Path | None,
    one_reward_user_ids: Sequence[int],
    upper_bounds: dict[str, str],
    population: pd.DataFrame | None,
    seed: int,
) -> list[dict]:
    """Every generation of the evaluation, each with a unique `request_id`, sorted by variant (batches share models)."""
    seeds = [seed * 1000 + s for s in range(cfg.eval.seeds_per_caption)]
    requests: list[dict] = []
    if one_reward_prepared is not None:
        users = OneRewardUsers(list(one_reward_user_ids))
        captions = evaluation_captions(one_reward_prepared, cfg.eval.captions, seed)
        requests += one_reward_requests(users, captions, seeds, upper_bounds)
        requests += interpolation_requests(users, captions[: max(1, cfg.eval.captions // 2)], seeds)
    if population is not None and len(population):
        requests += population_requests(population, cfg.eval.captions_per_user, seeds, POPULATION_VARIANT)
    requests.sort(key=lambda r: r["variant"])
    for index, request in enumerate(requests):
        request["request_id"] = index
    return requests


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def score(requests: pd.DataFrame, images: np.ndarray, rewards: ToyRewards) -> pd.DataFrame:
    """Add every attribute's standardised score and the row's user's hidden reward to each generated row."""
    scored = requests.copy()
    for attribute, values in rewards.attribute_scores(images).items():
        scored[attribute] = values
    user_reward = np.full(len(scored), np.nan)
    for user_id in scored["user_id"].unique():
        if int(user_id) in rewards.hidden.weights:
            rows = (scored["user_id"] == user_id).to_numpy()
            user_reward[rows] = rewards.user_reward(int(user_id), images[rows])
    scored["user_reward"] = user_reward
    return scored


def summarise(
    cfg: PPDConfig,
    scored: pd.DataFrame,
    one_reward_user_ids: Sequence[int],
    upper_bounds: dict[str, str],
    seed: int,
) -> dict:
    """The numbers of results.json (without classifier and runtime, which the caller adds)."""
    samples = cfg.eval.bootstrap_samples
    results: dict = {}
    if (scored.experiment == "one_reward").any():
        results["one_reward"] = summarise_one_reward(
            scored, OneRewardUsers(list(one_reward_user_ids)), upper_bounds, samples, seed
        )
        results["interpolation"] = summarise_interpolation(scored)
    if (scored.experiment == "population").any():
        results["population"] = summarise_population(scored, POPULATION_VARIANT, samples, seed)
    return results


def object_diagnostics(variants: Sequence[str], images: np.ndarray, image_size: int, seed: int) -> dict:
    """Does each model draw the toy world's object? Share of images with an object (`find_objects`, the validated
    measure of the base's quality gate) and the mean object size, beside the toy world's own renders."""
    from ppd.eval.base_quality import find_objects, gate_captions, render_references

    def summary(rendered: np.ndarray) -> dict[str, float]:
        fit = find_objects(rendered)
        return {"object_rate": float(fit.present.mean()), "mean_size": float(np.mean(fit.area * fit.present))}

    labels = np.asarray(variants)
    per_variant = {str(v): summary(images[labels == v]) for v in sorted(set(variants))}
    reference = render_references(gate_captions(256, seed), image_size, seed)
    return {"toy_world": summary(reference), **per_variant}


def base_gate(variants: Sequence[str], captions: Sequence[str], images: np.ndarray, image_size: int, seed: int) -> dict:
    """The base's quality gate on the base images of this evaluation, against renders of the same captions."""
    from ppd.eval.base_quality import quality_gate, render_references

    rows = np.asarray(variants) == "base"
    base_captions = [c for c, keep in zip(captions, rows, strict=True) if keep]
    return quality_gate(images[rows], base_captions, render_references(base_captions, image_size, seed))


__all__ = ["ATTRIBUTES", "build_requests", "population_users", "score", "summarise", "upper_bound_variant"]
