"""Win rates of PPD adapters for the toy world's one-reward users against the base, on the (caption, seed) requests a
finished `ppd demo` evaluated: every adapter side by side on the same images of the base (for runs of the same data
with other training seeds; numbers for docs/results_investigation.md).

    python scripts/one_reward_win_rates.py runs/demo runs/demo/runs/ppd/adapter /tmp/ppd-seed1/adapter

For each adapter and each one-reward user (its one-hot embedding, as the evaluation builds it), the share of requests
where the user's image has more of each attribute than the base's image of the same caption and seed (`win_outcomes`
on raw attribute values, exact ties only: the evaluation's tie tolerance is on its z-scores, another scale). With the
demo's own PPD adapter this gives the win rates of its RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ppd.config import ATTRIBUTES, load_config
from ppd.data.toyworld import measure_attributes
from ppd.eval.generate import VariantGenerator
from ppd.eval.stats import win_outcomes
from ppd.eval.toy_experiments import OneRewardUsers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path, help="a finished demo's --workdir (eval/scores.parquet, toy/)")
    parser.add_argument("adapters", type=Path, nargs="+", help="PPD adapter folders trained on its one-reward users")
    parser.add_argument("--seed", type=int, default=0, help="the demo's seed (data.seed)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("tiny_cpu", ["model.stage_c_path=assets/toy_base", f"data.seed={args.seed}"])
    scores = pd.read_parquet(args.workdir / "eval" / "scores.parquet")
    requests = scores[(scores.experiment == "one_reward") & (scores.variant == "base")]
    captions, seeds = requests.caption.tolist(), [int(s) for s in requests.seed]
    # reward -> its one-reward user, as the toy world wrote it
    user_of = json.loads((args.workdir / "toy" / "manifest.json").read_text())["one_reward_users"]
    users = OneRewardUsers([int(user_of[attribute]) for attribute in ATTRIBUTES])
    base = measure_attributes(VariantGenerator(cfg, None, device="cpu").generate(captions, seeds))
    table = {}
    for adapter in args.adapters:
        generator = VariantGenerator(cfg, adapter, device="cpu")
        rows = {}
        for attribute, user in zip(ATTRIBUTES, users.user_ids, strict=True):
            embedding = np.repeat(users.one_hot({user: 1.0})[None], len(captions), axis=0)  # [B, 1, K]
            drawn = measure_attributes(generator.generate(captions, seeds, embedding))
            rows[attribute] = {
                a: round(float(win_outcomes(drawn[a], base[a], tie_tolerance=0.0).mean()), 2) for a in ATTRIBUTES
            }
        table[str(adapter)] = rows
        own = ", ".join(f"{a} {rows[a][a]:.2f}" for a in ATTRIBUTES)
        print(f"{adapter}: each user's win rate on its own attribute: {own}")
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
