"""One-hot user embeddings: the paper's Sec. 5.1 conditioning, where each known user is its own token.

Used for the one-reward users of the toy world (one user per reward). It needs only user ids (never the rewards)
and cannot generalise to new users: that is what the few-shot embedders are for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ppd.embed.base import EmbeddingIdentity, EmbeddingRow
from ppd.embed.store import write_part


def one_hot_index(user_ids: list[int]) -> dict[int, int]:
    """user_id -> position of its 1 in the embedding: users in ascending id order."""
    return {user_id: k for k, user_id in enumerate(sorted(set(user_ids)))}


def one_hot_embedding(index: dict[int, int], weights: dict[int, float]) -> np.ndarray:
    """Σ w_u e_u as float32 [1, K] (a single user is weights {u: 1.0}; a mix interpolates users)."""
    embedding = np.zeros((1, len(index)), dtype=np.float32)
    for user_id, weight in weights.items():
        embedding[0, index[user_id]] += weight
    return embedding


def write_one_hot_embeddings(groups_dir: Path, out_dir: Path) -> int:
    """One [1, K] one-hot row per few-shot group of `groups_dir`, written in the embedding store format."""
    files = sorted(Path(groups_dir).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no few-shot groups (*.parquet) under {groups_dir}")
    groups = pq.read_table(files, columns=["user_id", "group_id", "pair_ids"]).to_pylist()
    index = one_hot_index([g["user_id"] for g in groups])
    identity = EmbeddingIdentity(
        embedder="onehot", model_id="one-hot-users", prompt_hash="", layers=(0,), settings={"users": sorted(index)}
    )
    rows = [
        EmbeddingRow(
            user_id=g["user_id"],
            group_id=g["group_id"],
            pair_ids=list(g["pair_ids"]),
            embedding=one_hot_embedding(index, {g["user_id"]: 1.0}),
            layers=[0],
            model_id=identity.model_id,
            prompt_hash=identity.prompt_hash,
            settings=identity.settings_json,
        )
        for g in groups
    ]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_part(rows, out_dir, identity)
    return len(rows)
