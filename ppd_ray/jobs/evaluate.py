"""Ray job: generate evaluation images with every model variant, score them, write results and plots.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m ppd_ray.jobs.evaluate \
        --world $PWD/runs/demo/toy --one-reward-prepared $PWD/runs/demo/prepared/one_reward \
        --adapters $PWD/runs/demo/adapters.json --out $PWD/runs/demo/eval

Two modes. With `--world` (the toy world): its hidden rewards score the images; `--adapters` names the variants ppd,
dpo, sft, dpo_upper_<reward> (one-reward experiment) and ppd_population (population experiment). Without it (real
data, Pick-a-Pic schema): `--prepared` and `--embeddings` name the preparation and embedding outputs, `--splits` the
evaluated splits (test_seen,test_unseen; validation to choose an adapter, e.g. the beta), and every variant of
`--adapters` is compared with the base by the image rewards (PickScore, CLIP score, aesthetic, HPSv2) and the VLM
judge (`ppd.eval.real_data`); no hidden reward exists or is read.

Generation fans out over a Ray Data actor pool (each actor loads the base, the adapters and the reward models once,
on its GPU when `eval.gpus_per_actor` gives it one); the statistics run on the driver (small).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ppd.config import ATTRIBUTES, PPDConfig, flatten_tree
from ppd.embed.classify import classifier_summary
from ppd.eval.evaluate import (
    base_gate,
    build_requests,
    decode_png,
    object_diagnostics,
    population_users,
    score,
    summarise,
    upper_bound_variant,
)
from ppd.eval.report import interpolation_plot, sample_grid, win_rate_bars
from ppd.eval.rewards import ToyRewards
from ppd_ray.console import JobError
from ppd_ray.jobs.common import config_from_args, generate_images, job_arg_parser, read_json_file, run_job

logger = logging.getLogger(__name__)


def _check_adapters(adapters: dict[str, str]) -> None:
    missing = [v for v, path in adapters.items() if not Path(path, "adapter_config.json").exists()]
    if missing:
        raise JobError(
            f"adapter folder(s) without adapter_config.json: {', '.join(f'{v}={adapters[v]}' for v in missing)}"
        )


def run_real(
    cfg: PPDConfig,
    prepared: Path,
    embeddings_dir: Path,
    out: Path,
    adapters: dict[str, str],
    splits: tuple[str, ...] = ("test_seen", "test_unseen"),
    seed: int = 0,
) -> dict:
    """Evaluate adapters on real preference data (image rewards + the VLM judge); results also in out/results.json."""
    from ppd.embed.store import iter_embeddings, read_embedding_catalog
    from ppd.eval.real_data import (
        BASE,
        REAL_SPLITS,
        evaluated_users,
        judge_generated,
        read_groups,
        real_requests,
        select_variant,
        summarise_rewards,
    )
    from ppd.eval.real_report import reward_win_bars, user_variant_grid

    began = time.monotonic()
    unknown = sorted(set(splits) - set(REAL_SPLITS))
    if unknown:
        raise JobError(f"unknown split(s) {unknown}: evaluate {', '.join(REAL_SPLITS)}")
    if not prepared.is_dir():
        raise JobError(f"prepared data {prepared} does not exist (run `ppd prepare` first)")
    if not adapters:
        raise JobError("no adapter to evaluate: --adapters names none")
    if BASE in adapters:
        raise JobError(f"variant name {BASE!r} is the base model itself; name the adapters otherwise")
    _check_adapters(adapters)
    if cfg.eval.judge == "oracle":
        raise JobError("eval.judge=oracle reads the toy world's hidden rewards; on real data use openai or none")
    try:
        catalog = read_embedding_catalog(embeddings_dir)
    except (FileNotFoundError, ValueError) as err:
        raise JobError(f"embeddings {embeddings_dir}: {err}") from None
    users = pd.concat(
        [evaluated_users(prepared, split, cfg.eval.users_per_split, seed, catalog) for split in splits],
        ignore_index=True,
    )
    if users.empty:
        raise JobError(f"no user of {', '.join(splits)} in {prepared} has an embedded condition group")
    keys = set(zip(users["user_id"].astype(int), users["group_id"].astype(int), strict=True))
    vectors = {
        key: vector for batch in iter_embeddings(embeddings_dir, keys) for key, vector in zip(*batch, strict=True)
    }
    seeds = [seed * 1000 + s for s in range(cfg.eval.seeds_per_caption)]
    requests = real_requests(users, vectors, sorted(adapters), cfg.eval.captions_per_user, seeds)
    logger.info(
        f"evaluate (real data): {len(users)} users of {', '.join(splits)}, {len(requests)} images "
        f"({len(adapters)} variant(s) + the base), rewards {', '.join(cfg.eval.image_rewards)}"
    )
    frame = generate_images(cfg, requests, adapters)
    images = np.stack([decode_png(p) for p in frame["png"]])
    scored = frame.drop(columns=["png", "embedding"])
    rewards = summarise_rewards(scored, cfg.eval.bootstrap_samples, seed)
    results: dict = {
        "mode": "real",
        "splits": list(splits),
        "users": {split: int((users["split"] == split).sum()) for split in splits},
        "images": len(frame),
        "image_rewards": rewards,
        "selection": select_variant(rewards, cfg.eval.selection_reward)
        if cfg.eval.selection_reward in cfg.eval.image_rewards
        else None,
    }
    if cfg.eval.judge == "openai":
        from ppd.eval.judge_eval import make_judge

        try:
            judge = make_judge(cfg, None)
        except ValueError as err:
            raise JobError(str(err)) from None
        groups = read_groups(prepared, sorted(set(users["group_id"].astype(int))))
        pngs = dict(zip(frame["request_id"].astype(int), frame["png"], strict=True))
        logger.info(f"evaluate: judge {judge.backend} on {int((scored['variant'] != BASE).sum())} generated pairs")
        results["judge_generated"] = judge_generated(scored, pngs, groups, judge.ask, cfg.eval.bootstrap_samples, seed)
        results["judge"] = _judge(cfg, None, prepared, seed)  # its accuracy on held-out human labels

    out.mkdir(parents=True, exist_ok=True)
    scored.to_parquet(out / "scores.parquet", index=False)
    figures = {
        "samples": user_variant_grid(scored, images, out / "samples.png"),
        "win rates": reward_win_bars(rewards, out / "win_rates.png"),
    }
    return _finish(cfg, results, figures, out, began, seed)


def run(
    cfg: PPDConfig,
    world: Path,
    out: Path,
    adapters: dict[str, str],
    one_reward_prepared: Path | None = None,
    population_prepared: Path | None = None,
    population_embeddings: Path | None = None,
    classifier: dict | None = None,
    seed: int = 0,
) -> dict:
    """Evaluate the given adapters on the toy world; returns results (also written to out/results.json)."""

    from ppd.embed import read_embeddings

    began = time.monotonic()
    if not (world / "hidden" / "rewards.json").exists():
        raise JobError(f"{world} is not a toy world (no hidden/rewards.json)")
    _check_adapters(adapters)
    manifest = json.loads((world / "manifest.json").read_text())
    one_reward_ids = [manifest["one_reward_users"][a] for a in ATTRIBUTES]
    upper_bounds = {a: upper_bound_variant(a) for a in ATTRIBUTES if upper_bound_variant(a) in adapters}
    if one_reward_prepared is not None:
        need = {"ppd", "dpo", "sft"} - set(adapters)
        if need:
            raise JobError(f"the one-reward experiment needs adapters for {', '.join(sorted(need))}")
    population = None
    if population_prepared is not None:
        if "ppd_population" not in adapters or population_embeddings is None:
            raise JobError("the population experiment needs --population-embeddings and an adapter 'ppd_population'")
        embeddings = read_embeddings(population_embeddings)
        population = population_users(population_prepared, embeddings, cfg.eval.users_per_split, seed)
    requests = build_requests(cfg, one_reward_prepared, one_reward_ids, upper_bounds, population, seed)
    if not requests:
        raise JobError("nothing to evaluate: give --one-reward-prepared and/or --population-prepared")
    logger.info(
        f"evaluate: generating {len(requests)} images with {len({r['variant'] for r in requests})} model variants"
    )

    frame = generate_images(cfg, requests, adapters)
    images = np.stack([decode_png(p) for p in frame["png"]])
    logger.info(f"evaluate: scoring {len(frame)} images")
    scored = score(frame.drop(columns=["png", "embedding"]), images, ToyRewards(world))
    results = summarise(cfg, scored, one_reward_ids, upper_bounds, seed)
    image_reward_columns = [c for c in scored.columns if c.startswith("image_reward.")]
    if image_reward_columns:  # mean of each real-image reward per model variant
        means = scored.groupby("variant")[image_reward_columns].mean()
        results["image_rewards"] = {
            column.removeprefix("image_reward."): {v: float(x) for v, x in means[column].items()}
            for column in image_reward_columns
        }
    variants, image_size = frame["variant"].tolist(), cfg.data.toy.image_size
    results["objects"] = object_diagnostics(variants, images, image_size, seed)
    if "base" in variants:
        results["base_quality"] = base_gate(variants, frame["caption"].tolist(), images, image_size, seed)
        logger.info(f"evaluate: base quality gate {'passed' if results['base_quality']['passed'] else 'NOT passed'}")
    if population_prepared is not None:
        results["judge"] = _judge(cfg, world, population_prepared, seed)
    if classifier:
        results["classifier"] = classifier_summary(classifier, cfg.embed.embedder)

    out.mkdir(parents=True, exist_ok=True)
    scored.to_parquet(out / "scores.parquet", index=False)
    figures = {
        "sample grid": sample_grid(scored, images, out / "samples.png"),
        "win rates": win_rate_bars(results, out / "win_rates.png"),
        "interpolation": interpolation_plot(results, out / "interpolation.png"),
    }
    return _finish(cfg, results, figures, out, began, seed)


def _finish(cfg: PPDConfig, results: dict, figures: dict, out: Path, began: float, seed: int) -> dict:
    """The end both evaluations share: the figures that were drawn (None = nothing to plot), the run time,
    results.json and the MLflow run."""
    results["figures"] = {name: str(path) for name, path in figures.items() if path is not None}
    results["evaluate_seconds"] = time.monotonic() - began
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _track(cfg, results, out, seed)
    return results


def _adapter_items(items: list[str]) -> dict[str, str]:
    adapters = {}
    for item in items:
        variant, separator, folder = item.partition("=")
        if not separator or not variant or not folder:
            raise JobError(f"--adapter {item!r} is not of the form VARIANT=FOLDER")
        adapters[variant] = folder
    return adapters


def _judge(cfg: PPDConfig, world: Path | None, prepared: Path, seed: int) -> dict:
    """Supplementary B.3: the judge on held-out population pairs, each asked in both orders, against the labels."""
    from ppd.eval.judge_eval import evaluate_judge, judge_queries, make_judge

    queries, truth = judge_queries(prepared, cfg.eval.judge_split, cfg.eval.judge_pairs, seed)
    if not queries:
        logger.info(f"evaluate: no {cfg.eval.judge_split} pairs with a context group to judge; judge skipped")
        return {}
    try:
        judge = make_judge(cfg, world)
    except ValueError as err:
        raise JobError(str(err)) from None
    logger.info(
        f"evaluate: judge {judge.backend} on {len(queries)} held-out {cfg.eval.judge_split} pairs (both orders)"
    )
    report = evaluate_judge(queries, truth, judge.ask, judge.backend, cfg.eval.bootstrap_samples, seed)
    report.pop("preferred")  # per-query verdicts: long, and nothing reads them
    return report


def _track(cfg: PPDConfig, results: dict, out: Path, seed: int) -> None:
    """Log the evaluation as an MLflow run: every number of results.json as a metric, results and plots as artifacts."""
    from ppd_ray.infra.mlflow_server import tracking_uri
    from ppd_ray.tracking import log_finished_run

    metrics = {key: value for key, value in flatten_numbers(results) if key != "evaluate_seconds"}
    artifacts = [(out / "results.json", "evaluation")]
    artifacts += [(Path(path), "evaluation/figures") for path in results["figures"].values()]
    with tracking_uri(cfg.tracking.uri, Path(cfg.tracking.local_store)) as uri:
        run_id = log_finished_run(
            uri,
            cfg.tracking.experiment,
            f"evaluate-seed{seed}",
            {**cfg.flatten(), "eval.seed": str(seed)},
            metrics,
            artifacts,
            tags={"ppd.job": "evaluate"},
        )
    logger.info(f"evaluate: MLflow run {run_id} ({len(metrics)} metrics)")


def flatten_numbers(tree: dict, prefix: str = "") -> list[tuple[str, float]]:
    """Dotted keys of every number in a nested results dict (lists indexed: ci95.0, ci95.1), for MLflow metrics."""
    return [
        (name, float(value))
        for name, value in flatten_tree(tree, prefix, index_lists=True)
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = job_arg_parser(__name__, prog)
    parser.add_argument(
        "--world", type=Path, default=None, help="toy world folder (its hidden rewards score); none = real data"
    )
    parser.add_argument("--prepared", type=Path, default=None, help="real data: output folder of the preparation job")
    parser.add_argument("--embeddings", type=Path, default=None, help="real data: output folder of the embedding job")
    parser.add_argument("--splits", default="test_seen,test_unseen", help="real data: comma-separated splits")
    parser.add_argument("--out", "-o", required=True, type=Path, help="folder for results.json, scores and plots")
    parser.add_argument("--adapters", type=Path, default=None, help="JSON file {variant: adapter folder}")
    parser.add_argument(
        "--adapter",
        dest="adapter_items",
        action="append",
        default=[],
        metavar="VARIANT=FOLDER",
        help="an adapter to evaluate (repeatable; beside or instead of --adapters)",
    )
    parser.add_argument("--one-reward-prepared", type=Path, default=None, help="prepared one-reward users (Sec. 5.1)")
    parser.add_argument("--population-prepared", type=Path, default=None, help="prepared population (Sec. 5.2)")
    parser.add_argument("--population-embeddings", type=Path, default=None, help="embeddings of the population")
    parser.add_argument("--classifier", type=Path, default=None, help="classifier.json of `ppd embed classify`")
    parser.add_argument("--seed", type=int, default=0, help="seed of captions, users and generation")

    def job(args) -> str:
        cfg = config_from_args(args)
        adapters = {**read_json_file(args.adapters, "adapters file"), **_adapter_items(args.adapter_items)}
        if not adapters:
            raise JobError("name the adapters to evaluate: --adapters FILE and/or --adapter VARIANT=FOLDER")
        if args.world is None:
            if args.prepared is None or args.embeddings is None:
                raise JobError("real data needs --prepared and --embeddings (or give --world for the toy world)")
            splits = tuple(s for s in args.splits.split(",") if s)
            results = run_real(cfg, args.prepared, args.embeddings, args.out, adapters, splits, args.seed)
        else:
            results = run(
                cfg,
                args.world,
                args.out,
                adapters,
                args.one_reward_prepared,
                args.population_prepared,
                args.population_embeddings,
                read_json_file(args.classifier, "classifier results") or None,
                args.seed,
            )
        return json.dumps({k: v for k, v in results.items() if k != "figures"}, indent=1)[:4000]

    return run_job(parser, argv, job)


if __name__ == "__main__":
    sys.exit(main())
