"""Evaluation on real preference data (Pick-a-Pic v2 schema): no hidden rewards, only what a real run can measure.

For sampled users of each evaluated split (test_seen / test_unseen, or validation when choosing an adapter), every
model variant generates images for the user's held-out captions with shared seeds; the base is generated for the
same (user, caption, seed). Then:

- image rewards (PickScore, CLIP score, LAION aesthetic, HPSv2; `ppd.eval.image_rewards`): mean per variant, and
  the win rate of each variant against the base on the same (user, caption, seed), bootstrapped over users;
- selection: the variant with the highest mean `eval.selection_reward` (PickScore in the paper, which chose beta on
  the validation split with it);
- the VLM judge (paper B.3 / Fig. 5): shown the user's few-shot group and the two generated images (variant vs base,
  both orders, inconsistent verdicts dropped), which one does the user prefer? The win rate over kept verdicts.

Executors (the Ray Data job, or a plain loop in tests) call `VariantGenerator.generate` on the requests and score the
images; everything before and after is here and pure. The embedding of each evaluated user is that of its condition
group (a few-shot group of its own pairs, chosen by the preparation job), read for those groups only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ppd.data.prepare import stable_unit
from ppd.embed.groups import FewShotGroup, groups_from_rows
from ppd.eval.evaluate import read_split
from ppd.eval.judge import JudgeQuery, Verdict, judge_pairs
from ppd.eval.stats import bootstrap_mean, win_rate

BASE = "base"
REAL_SPLITS = ("validation", "test_seen", "test_unseen")
REWARD_PREFIX = "image_reward."


def evaluated_users(
    prepared: Path, split: str, count: int, seed: int, available_groups: Mapping[tuple[int, int], object]
) -> pd.DataFrame:
    """Up to `count` users of `split` (seed-fixed order) with a usable condition group and their held-out captions.

    Columns: user_id, split, group_id (the group whose embedding conditions the user), captions (the user's
    captions in `split`, seed-fixed order, those of the group itself left out). `available_groups` is keyed by
    (user_id, group_id) (an embedding catalog): a user whose groups have no embedding is skipped.
    """
    columns = ["user_id", "split", "group_id", "captions"]
    rows = read_split(prepared, split, ["user_id", "caption", "condition_group_id"])
    rows = rows[rows["condition_group_id"].notna()]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    group_captions = _group_captions(prepared, sorted(set(rows["condition_group_id"].astype(int))))
    records = []
    for user_id in sorted(rows["user_id"].unique(), key=lambda u: stable_unit(seed, "eval-user", int(u))):
        own = rows[rows["user_id"] == user_id]
        groups = [
            g for g in sorted(own["condition_group_id"].astype(int).unique()) if (int(user_id), g) in available_groups
        ]
        if not groups:
            continue
        group_id = groups[0]
        captions = [c for c in own["caption"].unique() if c not in group_captions.get(group_id, set())]
        if not captions:
            continue
        captions = sorted(captions, key=lambda c: stable_unit(seed, "eval-caption", c))
        records.append({"user_id": int(user_id), "split": split, "group_id": group_id, "captions": captions})
        if len(records) == count:
            break
    return pd.DataFrame(records, columns=columns)


def _group_captions(prepared: Path, group_ids: Sequence[int]) -> dict[int, set[str]]:
    files = sorted((Path(prepared) / "groups").glob("*.parquet"))
    if not files or not group_ids:
        return {}
    table = pq.read_table(files, columns=["group_id", "captions"], filters=[("group_id", "in", list(group_ids))])
    return {int(row["group_id"]): set(row["captions"]) for row in table.to_pylist()}


def read_groups(prepared: Path, group_ids: Sequence[int]) -> dict[int, FewShotGroup]:
    """The few-shot groups (captions, images, choices) of `group_ids` from a prepared folder's groups/."""
    files = sorted((Path(prepared) / "groups").glob("*.parquet"))
    if not files or not group_ids:
        return {}
    table = pq.read_table(files, filters=[("group_id", "in", sorted({int(g) for g in group_ids}))])
    return {group.group_id: group for group in groups_from_rows(table.to_pylist())}


def real_requests(
    users: pd.DataFrame,
    embeddings: Mapping[tuple[int, int], np.ndarray],
    variants: Sequence[str],
    captions_per_user: int,
    seeds: Sequence[int],
) -> list[dict]:
    """Every generation: the base and each variant per (user, caption, seed), sorted by variant, with request ids.

    Each request carries the user's embedding [L, d] (flattened, with its shape); the base ignores it, and a
    Diffusion-DPO adapter replaces it by its constant population user (`VariantGenerator`)."""
    requests = []
    for user in users.itertuples():
        embedding = np.asarray(embeddings[(int(user.user_id), int(user.group_id))], np.float32)  # [L, d]
        for caption in list(user.captions)[:captions_per_user]:
            for seed in seeds:
                for variant in (BASE, *variants):
                    requests.append(
                        {
                            "experiment": "real",
                            "variant": variant,
                            "user_id": int(user.user_id),
                            "split": user.split,
                            "group_id": int(user.group_id),
                            "caption": caption,
                            "seed": int(seed),
                            "embedding": None if variant == BASE else embedding.ravel().tolist(),
                            "embedding_shape": None if variant == BASE else list(embedding.shape),
                        }
                    )
    requests.sort(key=lambda r: r["variant"])  # batches of one variant share its model
    for index, request in enumerate(requests):
        request["request_id"] = index
    return requests


def _paired(frame: pd.DataFrame, variant: str, score: str) -> pd.DataFrame:
    keys = ["user_id", "caption", "seed"]
    mine = frame[frame["variant"] == variant][[*keys, score]]
    base = frame[frame["variant"] == BASE][[*keys, score]]
    return mine.merge(base, on=keys, suffixes=("", "_base"))


def summarise_rewards(scored: pd.DataFrame, samples: int, seed: int) -> dict:
    """{split | "all": {reward: {"mean": {variant: m}, "win_rate_vs_base": {variant: Estimate dict}}}}.

    `scored` has one row per generated image with variant, user_id, split, caption, seed and one
    `image_reward.<name>` column per reward. Win rates pair each image with the base's of the same (user, caption,
    seed) and resample users for the 95% interval (a user's comparisons are not independent)."""
    rewards = [c.removeprefix(REWARD_PREFIX) for c in scored.columns if c.startswith(REWARD_PREFIX)]
    variants = sorted(set(scored["variant"]) - {BASE})
    out: dict[str, dict] = {}
    for split in [*sorted(set(scored["split"])), "all"]:
        frame = scored if split == "all" else scored[scored["split"] == split]
        per_reward = {}
        for reward in rewards:
            column = REWARD_PREFIX + reward
            means = {v: float(frame[frame["variant"] == v][column].mean()) for v in [BASE, *variants]}
            wins = {}
            for variant in variants:
                pairs = _paired(frame, variant, column)
                estimate = win_rate(
                    pairs[column].to_numpy(),
                    pairs[column + "_base"].to_numpy(),
                    samples=samples,
                    seed=seed,
                    groups=pairs["user_id"].to_numpy() if len(pairs) else None,
                )
                wins[variant] = estimate.as_dict()
            per_reward[reward] = {"mean": means, "win_rate_vs_base": wins}
        out[split] = per_reward
    return out


def select_variant(reward_summary: dict, reward: str, split: str = "all") -> dict | None:
    """The variant (never the base) with the highest mean `reward` on `split`, e.g. the beta chosen by PickScore."""
    means = reward_summary.get(split, {}).get(reward, {}).get("mean")
    candidates = {v: m for v, m in (means or {}).items() if v != BASE and not np.isnan(m)}
    if not candidates:
        return None
    best = max(sorted(candidates), key=lambda v: candidates[v])
    return {"reward": reward, "split": split, "best": best, "means": candidates, "base": means.get(BASE)}


def judge_generated(
    scored: pd.DataFrame,
    pngs: Mapping[int, bytes],
    groups: Mapping[int, FewShotGroup],
    ask: Callable[[JudgeQuery, bool], Verdict],
    samples: int,
    seed: int,
) -> dict:
    """The judge's win rate of each variant over the base: {split | "all": {variant: {win_rate, dropped_share, ...}}}.

    For every (user, caption, seed) the judge sees the user's few-shot group (the group that conditioned the
    generation) and the two images, in both orders; inconsistent verdicts are dropped and counted. Each pair is
    asked once (two calls); the splits and "all" are aggregations of the same verdicts."""
    keys = ["user_id", "caption", "seed"]
    base = scored[scored["variant"] == BASE].set_index(keys)["request_id"]
    out: dict[str, dict] = {}
    for variant in sorted(set(scored["variant"]) - {BASE}):
        rows = scored[scored["variant"] == variant].reset_index(drop=True)
        queries = []
        for row in rows.itertuples():
            group = groups[int(row.group_id)]
            queries.append(
                JudgeQuery(
                    context_captions=group.captions,
                    context_first=group.jpg_0,
                    context_second=group.jpg_1,
                    context_preferred=group.preferred,
                    caption=row.caption,
                    image_a=pngs[int(row.request_id)],
                    image_b=pngs[int(base[(row.user_id, row.caption, row.seed)])],
                    user_id=int(row.user_id),
                )
            )
        verdicts = np.array([-1 if v is None else v for v in judge_pairs(queries, ask).preferred])  # -1 = dropped
        for split in [*sorted(set(rows["split"])), "all"]:
            chosen = np.ones(len(rows), bool) if split == "all" else (rows["split"] == split).to_numpy()
            kept = chosen & (verdicts >= 0)
            wins = (verdicts[kept] == 0).astype(float)  # 0 = image_a = the variant's image
            users = rows["user_id"].to_numpy()[kept]
            estimate = bootstrap_mean(wins, samples, seed, groups=users if kept.any() else None)
            out.setdefault(split, {})[variant] = {
                "win_rate": estimate.as_dict(),
                "pairs": int(chosen.sum()),
                "kept": int(kept.sum()),
                "dropped_share": float(1 - kept.sum() / max(1, chosen.sum())),
            }
    return out
