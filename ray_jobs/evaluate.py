"""Ray job: generate evaluation images with every model variant, score them, write results and plots.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m ray_jobs.evaluate \
        --world $PWD/runs/demo/toy --one-reward-prepared $PWD/runs/demo/prepared/one_reward \
        --adapters $PWD/runs/demo/adapters.json --out $PWD/runs/demo/eval

Generation fans out over a Ray Data actor pool (each actor loads the base and the adapters once); scoring and the
statistics run on the driver (small). `--adapters` is a JSON object {variant: adapter checkpoint folder} with the
variants ppd, dpo, sft, dpo_upper_<reward> (one-reward experiment) and ppd_population (population experiment).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ppd.config import ATTRIBUTES, PPDConfig
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
from ppd.eval.generate import GenerationStage
from ppd.eval.report import interpolation_plot, sample_grid, win_rate_bars
from ppd.eval.rewards import ToyRewards
from ray_jobs.common import JobError, config_from_args, init_ray, job_arg_parser, log


def _read_json(path: Path | None, what: str) -> dict:
    if path is None:
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise JobError(f"cannot read {what} {path}: {err}") from None


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
    import ray

    from ppd.embed import read_embeddings

    began = time.monotonic()
    if not (world / "hidden" / "rewards.json").exists():
        raise JobError(f"{world} is not a toy world (no hidden/rewards.json)")
    missing = [v for v, path in adapters.items() if not Path(path, "adapter_config.json").exists()]
    if missing:
        raise JobError(
            f"adapter folder(s) without adapter_config.json: {', '.join(f'{v}={adapters[v]}' for v in missing)}"
        )
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
    log(f"evaluate: generating {len(requests)} images with {len({r['variant'] for r in requests})} model variants")

    init_ray()
    generated = (
        ray.data.from_items(requests)
        .map_batches(
            GenerationStage,
            batch_size=cfg.eval.batch_size,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=cfg.eval.concurrency),
            fn_constructor_kwargs={"config": cfg.to_dict(), "adapters": adapters},
        )
        .to_pandas()
    )
    frame = pd.DataFrame(requests).merge(generated, on="request_id").sort_values("request_id").reset_index(drop=True)
    images = np.stack([decode_png(p) for p in frame["png"]])
    log(f"evaluate: scoring {len(frame)} images")
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
        log(f"evaluate: base quality gate {'passed' if results['base_quality']['passed'] else 'NOT passed'}")
    if population_prepared is not None:
        results["judge"] = _judge(cfg, world, population_prepared, seed)
    if classifier:
        results["classifier"] = classifier_summary(classifier, cfg.embed.embedder)

    out.mkdir(parents=True, exist_ok=True)
    scored.to_parquet(out / "scores.parquet", index=False)
    figures = {}
    for name, path in (
        ("sample grid", sample_grid(scored, images, out / "samples.png")),
        ("win rates", win_rate_bars(results, out / "win_rates.png")),
        ("interpolation", interpolation_plot(results, out / "interpolation.png")),
    ):
        if path is not None:
            figures[name] = str(path)
    results["figures"] = figures
    results["evaluate_seconds"] = time.monotonic() - began
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _track(cfg, results, out, seed)
    return results


def classifier_summary(classifier: dict, embedder: str) -> dict:
    """`ppd embed classify`'s output -> the results keys (top16 / chance16 at k = 16, or the largest k computed)."""
    top_k, chance = classifier["top_k"], classifier["chance"]
    k = "16" if "16" in top_k else max(top_k, key=int)
    return {
        "top16": top_k[k],
        "chance16": chance[k],
        "k": int(k),
        "users": classifier.get("n_users"),
        "embedder": classifier.get("embedder", embedder),
        "top_k": top_k,
        "chance": chance,
    }


def _judge(cfg: PPDConfig, world: Path, prepared: Path, seed: int) -> dict:
    """Supplementary B.3: the judge on held-out population pairs, each asked in both orders, against the labels."""
    from ppd.eval.judge_eval import evaluate_judge, judge_queries, make_judge

    queries, truth = judge_queries(prepared, cfg.eval.judge_split, cfg.eval.judge_pairs, seed)
    if not queries:
        log(f"evaluate: no {cfg.eval.judge_split} pairs with a context group to judge; judge skipped")
        return {}
    try:
        judge = make_judge(cfg, world)
    except ValueError as err:
        raise JobError(str(err)) from None
    log(f"evaluate: judge {judge.backend} on {len(queries)} held-out {cfg.eval.judge_split} pairs (both orders)")
    report = evaluate_judge(queries, truth, judge.ask, judge.backend, cfg.eval.bootstrap_samples, seed)
    report.pop("preferred")  # per-query verdicts: long, and nothing reads them
    return report


def _track(cfg: PPDConfig, results: dict, out: Path, seed: int) -> None:
    """Log the evaluation as an MLflow run: every number of results.json as a metric, results and plots as artifacts."""
    from ray_jobs.tracking import log_finished_run, tracking_uri

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
    log(f"evaluate: MLflow run {run_id} ({len(metrics)} metrics)")


def flatten_numbers(tree: dict, prefix: str = "") -> list[tuple[str, float]]:
    """Dotted keys of every number in a nested results dict (lists indexed: ci95.0, ci95.1), for MLflow metrics."""
    items: list[tuple[str, float]] = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            items += flatten_numbers(value, name + ".")
        elif isinstance(value, list | tuple):
            items += flatten_numbers({str(i): v for i, v in enumerate(value)}, name + ".")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            items.append((name, float(value)))
    return items


def main(argv: list[str] | None = None) -> int:
    parser = job_arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--world", required=True, type=Path, help="toy world folder (hidden rewards are read here)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--adapters", type=Path, required=True, help="JSON {variant: adapter folder}")
    parser.add_argument("--one-reward-prepared", type=Path, default=None)
    parser.add_argument("--population-prepared", type=Path, default=None)
    parser.add_argument("--population-embeddings", type=Path, default=None)
    parser.add_argument("--classifier", type=Path, default=None, help="classifier JSON from `ppd embed classify`")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        results = run(
            cfg,
            args.world,
            args.out,
            _read_json(args.adapters, "adapters file"),
            args.one_reward_prepared,
            args.population_prepared,
            args.population_embeddings,
            _read_json(args.classifier, "classifier results") or None,
            args.seed,
        )
    except JobError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in results.items() if k != "figures"}, indent=1)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
