"""Ray job: score trained adapters on the validation split, for model selection (the β sweep of `ppd sweep beta`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m ppd_ray.jobs.validate \
        --world $PWD/runs/demo/toy --prepared $PWD/runs/demo/prepared/one_reward \
        --adapters $PWD/runs/demo/sweep/adapters.json --out $PWD/runs/demo/sweep/validation

Each adapter generates images for the one-reward users on validation captions (never a test caption), scored by
each user's reward: the toy world's analogue of the paper's validation PickScore (supplementary B.1). Generation runs
on a Ray Data actor pool, as in the evaluate job; writes `validation.json` {variant: mean_reward, win rate vs base,
share of images with an object}.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from ppd.config import ATTRIBUTES, PPDConfig
from ppd.eval.evaluate import decode_png, object_diagnostics, read_split, score
from ppd.eval.rewards import ToyRewards
from ppd.eval.toy_experiments import OneRewardUsers, summarise_validation, validation_requests
from ppd_ray.console import JobError
from ppd_ray.jobs.common import config_from_args, generate_images, job_arg_parser, read_json_file, run_job

logger = logging.getLogger(__name__)

VALIDATION_FILE = "validation.json"


def run(cfg: PPDConfig, world: Path, prepared: Path, adapters: dict[str, str], out: Path, seed: int = 0) -> dict:
    """Score every adapter on `prepared`'s validation split; returns (and writes) {variant: scores}."""
    import numpy as np

    if not (world / "hidden" / "rewards.json").is_file():
        raise JobError(f"{world} is not a toy world (no hidden/rewards.json)")
    missing = [v for v, path in adapters.items() if not Path(path, "adapter_config.json").is_file()]
    if missing:
        raise JobError(f"adapter folder(s) without adapter_config.json: {', '.join(missing)}")
    manifest = json.loads((world / "manifest.json").read_text())
    users = OneRewardUsers([manifest["one_reward_users"][a] for a in ATTRIBUTES])
    captions = sorted(read_split(prepared, "validation", ["caption"])["caption"].unique())[: cfg.eval.captions]
    if not captions:
        raise JobError(f"{prepared} has no validation captions")
    seeds = [seed * 1000 + 500 + s for s in range(cfg.eval.seeds_per_caption)]  # not the evaluation's seeds
    requests = validation_requests(users, captions, seeds, list(adapters))
    for index, request in enumerate(requests):
        request["request_id"] = index
    logger.info(
        f"validate: {len(requests)} images of {len(adapters)} adapter(s) + the base on {len(captions)} captions"
    )
    frame = generate_images(cfg, requests, adapters)
    images = np.stack([decode_png(p) for p in frame["png"]])
    scored = score(frame.drop(columns=["png", "embedding"]), images, ToyRewards(world))
    results = summarise_validation(scored, cfg.eval.bootstrap_samples, seed)
    # Does the model still draw the toy world? A β can raise the pixel rewards by dropping the object (a background
    # that is not uniform scores as a large, centred object): the sweep reports this beside each score.
    objects = object_diagnostics(frame["variant"].tolist(), images, cfg.data.toy.image_size, seed)
    for variant, entry in results.items():
        entry["object_rate"] = objects[variant]["object_rate"]
        entry["base_object_rate"] = objects["base"]["object_rate"]
    out.mkdir(parents=True, exist_ok=True)
    (out / VALIDATION_FILE).write_text(json.dumps(results, indent=2) + "\n")
    for variant, entry in results.items():
        logger.info(
            f"validate: {variant}: mean reward {entry['mean_reward']:.3f} (base {entry['base_mean_reward']:.3f}), "
            f"object drawn {entry['object_rate']:.0%} (base {entry['base_object_rate']:.0%})"
        )
    return results


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = job_arg_parser(__name__, prog)
    parser.add_argument("--world", required=True, type=Path, help="the toy world folder (its hidden rewards score)")
    parser.add_argument("--prepared", required=True, type=Path, help="prepared one-reward users (validation split)")
    parser.add_argument("--adapters", required=True, type=Path, help="JSON {variant: adapter folder}")
    parser.add_argument("--out", "-o", required=True, type=Path, help="folder for validation.json")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generation")

    def job(args) -> str:
        adapters = read_json_file(args.adapters, "--adapters")
        run(config_from_args(args), args.world, args.prepared, adapters, args.out, args.seed)
        return f"wrote {args.out / VALIDATION_FILE}"

    return run_job(parser, argv, job)


if __name__ == "__main__":
    sys.exit(main())
