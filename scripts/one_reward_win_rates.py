"""Win rates of PPD adapters for the toy world's one-reward users against the base, on the (caption, seed) requests a
finished `ppd demo` evaluated: every adapter side by side on the same images of the base (for runs of the same data
with other training seeds; numbers for docs/results_investigation.md).

    python scripts/one_reward_win_rates.py runs/demo runs/demo/runs/ppd/adapter /tmp/ppd-seed1/adapter

For each adapter and each one-reward user (its one-hot embedding, as the evaluation builds it), the share of requests
where the user's image has more of each attribute than the base's image of the same caption and seed (`win_outcomes`
on raw attribute values, exact ties only: the evaluation's tie tolerance is on its z-scores, another scale). With the
demo's own PPD adapter this gives the win rates of its RESULTS.md. Beside them, the share of each user's images with an
object (`find_objects`, the quality gate's measure) against the base's.
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
from ppd.eval.base_quality import find_objects
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
    base_images = VariantGenerator(cfg, None, device="cpu").generate(captions, seeds)
    base = measure_attributes(base_images)
    print(f"base: images with an object {find_objects(base_images).present.mean():.2f}")
    table = {}
    for adapter in args.adapters:
        generator = VariantGenerator(cfg, adapter, device="cpu")
        rows, objects = {}, {}
        for attribute, user in zip(ATTRIBUTES, users.user_ids, strict=True):
            embedding = np.repeat(users.one_hot({user: 1.0})[None], len(captions), axis=0)  # [B, 1, K]
            images = generator.generate(captions, seeds, embedding)
            drawn = measure_attributes(images)
            rows[attribute] = {
                a: round(float(win_outcomes(drawn[a], base[a], tie_tolerance=0.0).mean()), 2) for a in ATTRIBUTES
            }
            objects[attribute] = round(float(find_objects(images).present.mean()), 2)
        table[str(adapter)] = {"win_rates": rows, "object_rates": objects}
        own = ", ".join(f"{a} {rows[a][a]:.2f}" for a in ATTRIBUTES)
        print(f"{adapter}: each user's win rate on its own attribute: {own}")
        print(f"{adapter}: each user's images with an object: {objects}")
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
