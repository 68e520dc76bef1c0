"""Preparation of preference pairs: row checks, splits and leakage-free few-shot groups (pure; no Ray).

The Ray job (`ppd_ray/jobs/prepare.py`) streams shards through `scan_shard` and `write_shard`; the global decisions
(which user/caption goes where, which pairs form groups) are made once by `assign_splits` on a small metadata
table (one row per pair, no images).

Splits (paper 5.2, B.4): captions are hashed into train / validation / test; users into seen / unseen.
  seen user,   train caption      -> train
  seen user,   validation caption -> validation
  seen user,   test caption       -> test_seen
  unseen user, test caption       -> test_unseen
  unseen user, other caption      -> rejected ("held_out_user_non_test_caption"), so no test user's pair and no test
                                     caption ever reaches training.
Few-shot groups: disjoint groups of `shots` pairs, built from a seen user's train pairs or an unseen user's
test_unseen pairs. Every kept pair gets `condition_group_id`: a group of the same user that does not contain it.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image

from ppd.config import DataConfig

SPLITS: tuple[str, ...] = ("train", "validation", "test_seen", "test_unseen")
# Rejection reasons, in the order rows are checked (a row gets the first that applies).
ROW_REASONS: tuple[str, ...] = (
    "missing_field",
    "no_label",
    "not_different",
    "tie",
    "invalid_label",
    "undecodable_image",
)
PLAN_REASONS: tuple[str, ...] = ("too_few_pairs", "held_out_user_non_test_caption")
FILE_REASONS: tuple[str, ...] = ("unreadable_file", "missing_column", "wrong_type")
NULLABLE_INT = pa.int64()


# --- row checks -----------------------------------------------------------------------------------------------------


def image_decodes(data: bytes | None) -> bool:
    """True when `data` is an image PIL can fully decode (JPEG decoded at reduced size: fast, still complete)."""
    if not data:
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale; every byte is still read
            image.load()
        return True
    except Exception:  # PIL raises many types for corrupt data; any of them means "undecodable"
        return False


def row_rejections(table: pa.Table, check_images: bool = True) -> list[str | None]:
    """Per-row rejection reason (first of `ROW_REASONS` that applies) or None for a usable row."""
    required = ["caption", "jpg_0", "jpg_1", "label_0", "label_1", "user_id", "has_label", "are_different"]
    columns = {name: table.column(name).to_pylist() for name in required}
    reasons: list[str | None] = []
    for i in range(table.num_rows):
        row = {name: values[i] for name, values in columns.items()}
        if any(value is None for value in row.values()) or not str(row["caption"]).strip():
            reasons.append("missing_field")
        elif not row["has_label"]:
            reasons.append("no_label")
        elif not row["are_different"]:
            reasons.append("not_different")
        elif row["label_0"] == row["label_1"]:
            reasons.append("tie")
        elif {row["label_0"], row["label_1"]} != {0.0, 1.0}:
            reasons.append("invalid_label")
        elif check_images and not (image_decodes(row["jpg_0"]) and image_decodes(row["jpg_1"])):
            reasons.append("undecodable_image")
        else:
            reasons.append(None)
    return reasons


# --- deterministic hashing ------------------------------------------------------------------------------------------


def stable_unit(seed: int, *keys: object) -> float:
    """A uniform number in [0, 1) fixed by (seed, keys): stable across processes and Python versions."""
    digest = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def caption_split(caption: str, cfg: DataConfig) -> str:
    """'train', 'validation' or 'test' for a caption (by hash, so the same caption always lands together)."""
    u = stable_unit(cfg.seed, "caption", caption)
    if u < cfg.validation_caption_fraction:
        return "validation"
    if u < cfg.validation_caption_fraction + cfg.test_caption_fraction:
        return "test"
    return "train"


def user_is_unseen(user_id: int, cfg: DataConfig) -> bool:
    """Whether a user is held out entirely (test_unseen)."""
    return stable_unit(cfg.seed, "user", int(user_id)) < cfg.test_unseen_user_fraction


# --- the split and group assignment ----------------------------------------------------------------------------------


@dataclass
class SplitAssignment:
    """Where each pair goes and which groups exist.

    rows: one row per input pair: pair_id, split (None if rejected), reason (None if kept), context_group_id
          (the group this pair belongs to, or <NA>), condition_group_id (the group that conditions it, or <NA>).
    groups: group_id, user_id, pool ('seen' | 'unseen'), pair_ids (list, in group order).
    """

    rows: pd.DataFrame
    groups: pd.DataFrame


def assign_splits(meta: pd.DataFrame, cfg: DataConfig) -> SplitAssignment:
    """Decide splits, rejections and few-shot groups from per-pair metadata.

    `meta` columns: pair_id (unique int), user_id, caption, reason (row-check reason or None).
    """
    if meta["pair_id"].duplicated().any():
        raise ValueError("pair_id must be unique")
    rows = meta[["pair_id", "user_id", "caption", "reason"]].copy()
    rows["reason"] = rows["reason"].astype(object).where(rows["reason"].notna(), None)

    usable = rows["reason"].isna()
    pairs_per_user = rows[usable].groupby("user_id").size()
    too_few = usable & rows["user_id"].map(pairs_per_user).fillna(0).lt(cfg.shots)
    rows.loc[too_few, "reason"] = "too_few_pairs"
    usable &= ~too_few

    caption_part = {c: caption_split(c, cfg) for c in rows.loc[usable, "caption"].unique()}
    unseen = {u: user_is_unseen(u, cfg) for u in rows.loc[usable, "user_id"].unique()}
    split = pd.Series([None] * len(rows), index=rows.index, dtype=object)
    for idx in rows.index[usable]:
        part = caption_part[rows.at[idx, "caption"]]
        if unseen[rows.at[idx, "user_id"]]:
            if part == "test":
                split[idx] = "test_unseen"
            else:
                rows.at[idx, "reason"] = "held_out_user_non_test_caption"
        else:
            split[idx] = {"train": "train", "validation": "validation", "test": "test_seen"}[part]
    rows["split"] = split

    groups = _build_groups(rows, cfg)
    member_of = {pid: gid for gid, pids in zip(groups["group_id"], groups["pair_ids"], strict=True) for pid in pids}
    rows["context_group_id"] = pd.array([member_of.get(p) for p in rows["pair_id"]], dtype="Int64")
    rows["condition_group_id"] = pd.array(_condition_groups(rows, groups, cfg), dtype="Int64")
    return SplitAssignment(
        rows=rows[["pair_id", "split", "reason", "context_group_id", "condition_group_id"]], groups=groups
    )


def _build_groups(rows: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    """Disjoint groups of `shots` pairs per user, from the user's context pool (train if seen, test_unseen if not)."""
    pool_rows = rows[rows["split"].isin(["train", "test_unseen"])]
    records = []
    for user_id, user_rows in sorted(pool_rows.groupby("user_id"), key=lambda item: item[0]):
        order = sorted(user_rows["pair_id"], key=lambda p: stable_unit(cfg.seed, "group", int(p)))
        pool = "unseen" if (user_rows["split"] == "test_unseen").any() else "seen"
        for start in range(0, len(order) - cfg.shots + 1, cfg.shots):
            records.append(
                {"user_id": int(user_id), "pool": pool, "pair_ids": [int(p) for p in order[start : start + cfg.shots]]}
            )
    groups = pd.DataFrame(records, columns=["user_id", "pool", "pair_ids"])
    groups.insert(0, "group_id", np.arange(len(groups), dtype=np.int64))
    return groups


def _condition_groups(rows: pd.DataFrame, groups: pd.DataFrame, cfg: DataConfig) -> list[int | None]:
    """For each kept pair, a same-user group that does not contain it (None when the user has no such group)."""
    groups_of_user: dict[int, list[int]] = {}
    for gid, uid in zip(groups["group_id"], groups["user_id"], strict=True):
        groups_of_user.setdefault(int(uid), []).append(int(gid))
    chosen: list[int | None] = []
    for pair_id, user_id, split, own in zip(
        rows["pair_id"], rows["user_id"], rows["split"], rows["context_group_id"], strict=True
    ):
        if split is None:
            chosen.append(None)
            continue
        eligible = [g for g in groups_of_user.get(int(user_id), []) if pd.isna(own) or g != own]
        if not eligible:
            chosen.append(None)
            continue
        chosen.append(eligible[int(stable_unit(cfg.seed, "condition", int(pair_id)) * len(eligible))])
    return chosen


def accounting(input_rows: int, assignment: SplitAssignment, file_rejections: dict[str, int]) -> dict:
    """{"input_rows", "kept": {split: n}, "rejected": {reason: n}, ...} with input_rows == kept + rejected."""
    kept = {s: int((assignment.rows["split"] == s).sum()) for s in SPLITS}
    rejected = {r: 0 for r in (*FILE_REASONS, *ROW_REASONS, *PLAN_REASONS)}
    for reason, n in assignment.rows["reason"].dropna().value_counts().items():
        rejected[str(reason)] += int(n)
    for reason, n in file_rejections.items():
        rejected[reason] += n
    unconditioned = {
        s: int(((assignment.rows["split"] == s) & assignment.rows["condition_group_id"].isna()).sum()) for s in SPLITS
    }
    return {
        "input_rows": int(input_rows),
        "kept": kept,
        "rejected": rejected,
        "groups": {p: int((assignment.groups["pool"] == p).sum()) for p in ("seen", "unseen")},
        "unconditioned_pairs": unconditioned,
    }


def preferred_index(label_0: np.ndarray) -> np.ndarray:
    """0 when the user preferred jpg_0, 1 when jpg_1 (for kept rows: labels are exactly 1/0)."""
    return np.where(np.asarray(label_0) == 1.0, 0, 1).astype(np.int8)


def assemble_group(members: pd.DataFrame, order: dict[int, list[int]], pools: dict[int, str]) -> pd.DataFrame:
    """The member pairs of one group -> one row with lists in the group's order."""
    group_id = int(members["context_group_id"].iloc[0])
    members = members.set_index("pair_id").loc[order[group_id]]
    return pd.DataFrame(
        {
            "group_id": [group_id],
            "user_id": [int(members["user_id"].iloc[0])],
            "pool": [pools[group_id]],
            "pair_ids": [list(map(int, members.index))],
            "captions": [list(members["caption"])],
            "jpg_0": [list(members["jpg_0"])],
            "jpg_1": [list(members["jpg_1"])],
            "preferred": [list(map(int, members["preferred"]))],
        }
    )
