"""Why the population's win rate stays near 70%: what the user embeddings carry, and how PPD's images move.

    python scripts/population_diagnostics.py runs/demo [--scores runs/demo/eval ...] [--write-oracle-embeddings DIR]

Diagnostics for docs/results_investigation.md; they read the toy world's hidden rewards, which nothing the demo trains
or chooses may read.

1. Embeddings (`workdir/embeddings/population`): for every few-shot group, the signed differences of the hidden
   attributes between each pair's chosen and rejected image (standardised as the rewards are). Reported: how well a
   linear read-out of one pair's token recovers each attribute's difference (R², 5-fold cross-validation over users,
   ridge), and the cosine between each user's reward direction w and a ridge read-out of it from the group's summed
   tokens, beside the same read-out from the oracle tokens (the signed attribute differences themselves: what 4 pairs
   can tell about w at best, as a linear estimate).
2. `--write-oracle-embeddings DIR`: the same groups with the oracle tokens [4, 5] in place of the embedder's, in the
   embedding store's layout, for `ppd_ray.jobs.precompute` / `train` / `evaluate` (the upper bound of the embedder).
3. `--scores EVAL_DIR`: from an evaluation's scores.parquet, the population's PPD-minus-base reward difference on the
   paired images (win rate, mean, standard deviation), the same under a placebo (each user's images scored with
   another user's reward), and the slope of each attribute's difference on the user's weight for it (how far PPD moves
   an attribute per unit of the user's interest in it).

A variant is trained and evaluated on the population alone with the demo's jobs (W = the demo's workdir; the demo's
own `--set data.seed=S --set train.seed=S --set model.stage_c_path=assets/toy_base` on each, and for the oracle
tokens a `ppd_ray.jobs.precompute --embeddings DIR` first):

    python -m ppd_ray.jobs.train --precomputed W/precomputed/population --out RUN --preset tiny_cpu \\
        --set train.method=ppd --set train.beta=1
    python -m ppd_ray.jobs.evaluate --world W/toy --population-prepared W/prepared/population \\
        --population-embeddings W/embeddings/population --adapter ppd_population=RUN/adapter --out EVAL --seed S
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ppd.config import ATTRIBUTES
from ppd.data.toyworld import HiddenRewards, load_hidden_rewards, measure_attributes
from ppd.eval.evaluate import decode_png

FOLDS = 5
RIDGE = (1e-3, 1e-2, 1e-1, 1.0)


def signed_attribute_differences(groups: pd.DataFrame, hidden: HiddenRewards) -> np.ndarray:
    """[G, N, A]: standardised attributes of each pair's chosen image minus its rejected image."""
    out = []
    for group in groups.itertuples():
        first = hidden.scale.standardise(measure_attributes(np.stack([decode_png(b) for b in group.jpg_0])))  # [N, A]
        second = hidden.scale.standardise(measure_attributes(np.stack([decode_png(b) for b in group.jpg_1])))
        chose_first = (np.asarray(group.preferred) == 0)[:, None]  # preferred: index of the chosen image
        out.append(np.where(chose_first, first - second, second - first))
    return np.stack(out)


def _user_folds(user_ids: np.ndarray) -> np.ndarray:
    users = np.unique(user_ids)
    fold_of = dict(zip(users, np.random.default_rng(0).integers(0, FOLDS, len(users)), strict=True))
    return np.array([fold_of[u] for u in user_ids])


def _ridge_cv(features: np.ndarray, targets: np.ndarray, folds: np.ndarray, strength: float) -> np.ndarray:
    """Out-of-fold ridge predictions of targets [n, k] from features [n, f] (with an intercept)."""
    predicted = np.zeros_like(targets, dtype=np.float64)
    for fold in range(FOLDS):
        train, test = folds != fold, folds == fold
        design = np.c_[features[train], np.ones(train.sum())]
        coef = np.linalg.solve(design.T @ design + strength * np.eye(design.shape[1]), design.T @ targets[train])
        predicted[test] = np.c_[features[test], np.ones(test.sum())] @ coef
    return predicted


def direction_cosine(tokens: np.ndarray, weights: np.ndarray, folds: np.ndarray) -> tuple[float, float]:
    """(mean cosine between w and its best ridge read-out from the summed tokens, the ridge strength)."""
    best = (-1.0, RIDGE[0])
    for strength in RIDGE:
        predicted = _ridge_cv(tokens.sum(axis=1), weights, folds, strength)
        cosine = float(((predicted * weights).sum(1) / np.linalg.norm(predicted, axis=1)).mean())
        best = max(best, (cosine, strength))
    return best


def attribute_r2(tokens: np.ndarray, differences: np.ndarray, folds: np.ndarray, strength: float) -> dict:
    """Per attribute: out-of-fold R² of a linear read-out of one pair's attribute difference from its token."""
    per_pair = tokens.reshape(-1, tokens.shape[-1])  # [G*N, d]
    targets = differences.reshape(-1, differences.shape[-1])  # [G*N, A]
    predicted = _ridge_cv(per_pair, targets, np.repeat(folds, tokens.shape[1]), strength)
    residual = ((predicted - targets) ** 2).mean(0) / targets.var(0)
    return {a: round(float(1 - r), 2) for a, r in zip(ATTRIBUTES, residual, strict=True)}


def write_oracle_embeddings(source: Path, out: Path, oracle: dict[int, np.ndarray]) -> None:
    """Copy the embedding store at `source` with each group's tokens replaced by its oracle tokens [N, A]."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for path in sorted(source.glob("*.parquet")):
        table = pq.read_table(path)
        ids = table.column("group_id").to_pylist()
        for name, values in (
            ("embedding", [oracle[g].astype(np.float32).ravel().tolist() for g in ids]),
            ("embedding_shape", [list(oracle[g].shape) for g in ids]),
        ):
            index = table.schema.get_field_index(name)
            table = table.set_column(index, name, pa.array(values, table.schema.field(name).type))
        pq.write_table(table, out / path.name)
    for summary in source.glob("*.json"):
        shutil.copy(summary, out)


def embedding_report(workdir: Path, hidden: HiddenRewards, oracle_out: Path | None) -> None:
    embeddings = pq.read_table(sorted((workdir / "embeddings" / "population").glob("*.parquet"))).to_pandas()
    groups = pq.read_table(sorted((workdir / "prepared" / "population" / "groups").glob("*.parquet"))).to_pandas()
    groups = groups.set_index("group_id").loc[embeddings.group_id].reset_index()
    differences = signed_attribute_differences(groups, hidden)  # [G, N, A]
    shapes = embeddings.embedding_shape
    tokens = np.stack(
        [np.asarray(e).reshape(s) for e, s in zip(embeddings.embedding, shapes, strict=True)]
    )  # [G, N, d]
    weights = np.stack([hidden.weights[int(u)] for u in embeddings.user_id])  # [G, A]
    folds = _user_folds(embeddings.user_id.to_numpy())
    cosine, strength = direction_cosine(tokens, weights, folds)
    oracle_cosine, _ = direction_cosine(differences, weights, folds)
    print(f"{len(tokens)} groups of {tokens.shape[1]} pairs, tokens of width {tokens.shape[2]}")
    print(f"cosine(w, ridge read-out of w): embedder {cosine:.3f}, oracle tokens {oracle_cosine:.3f}")
    print(
        f"R² of each pair's attribute difference from its token: {attribute_r2(tokens, differences, folds, strength)}"
    )
    if oracle_out is not None:
        oracle = {int(g): d for g, d in zip(embeddings.group_id, differences, strict=True)}
        write_oracle_embeddings(workdir / "embeddings" / "population", oracle_out, oracle)
        print(f"oracle embeddings -> {oracle_out}")


def scores_report(eval_dir: Path, hidden: HiddenRewards) -> None:
    scores = pd.read_parquet(eval_dir / "scores.parquet")
    rows = scores[scores.experiment == "population"]
    paired = rows[rows.variant != "base"].merge(
        rows[rows.variant == "base"], on=["user_id", "caption", "seed"], suffixes=("", "_base")
    )
    moved = np.stack([paired[a] - paired[f"{a}_base"] for a in ATTRIBUTES], axis=1)  # [n, A] PPD - base
    weights = np.stack([hidden.weights[int(u)] for u in paired.user_id])  # [n, A]
    users = paired.user_id.unique()
    other = dict(zip(users, np.random.default_rng(0).permutation(users), strict=True))
    placebo = np.stack([hidden.weights[int(other[u])] for u in paired.user_id])
    own, placebo_gain = (moved * weights).sum(1), (moved * placebo).sum(1)
    slopes = {a: round(float(np.polyfit(weights[:, i], moved[:, i], 1)[0]), 2) for i, a in enumerate(ATTRIBUTES)}
    split_wins = paired.assign(won=own > 0).groupby("split").won.mean().round(3).to_dict()
    print(
        f"{eval_dir}: {len(paired)} paired images; own reward: win {np.mean(own > 0):.3f} {split_wins}, "
        f"gain {own.mean():.2f} ± sd {own.std():.2f}; placebo reward: win {np.mean(placebo_gain > 0):.3f}, "
        f"gain {placebo_gain.mean():.2f}; slope of each attribute's move on the user's weight: {slopes}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path, help="a finished demo's --workdir (toy/, prepared/, embeddings/)")
    parser.add_argument("--scores", type=Path, nargs="*", default=[], help="evaluation folders with scores.parquet")
    parser.add_argument("--write-oracle-embeddings", type=Path, help="write the oracle tokens' embedding store here")
    parser.add_argument("--skip-embeddings", action="store_true", help="only the --scores reports")
    args = parser.parse_args()
    hidden = load_hidden_rewards(args.workdir / "toy")
    if not args.skip_embeddings:
        embedding_report(args.workdir, hidden, args.write_oracle_embeddings)
    for eval_dir in args.scores:
        scores_report(eval_dir, hidden)


if __name__ == "__main__":
    main()
