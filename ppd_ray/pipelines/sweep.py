"""`ppd sweep beta`: choose DPO's β for PPD and for Diffusion-DPO on the validation split (paper B.1), as Ray jobs.

On a local head (as `ppd demo`): the one-reward users' inputs (prepare, one-hot embed, precompute; kept when a demo
already made them), one training per (method, β) nested under one MLflow parent run, then the validate job scores
every adapter on validation captions. The β with the highest validation score per method is written to
`<out>/results/beta_sweep.json`, which `ppd demo` reads. Test splits are never touched.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from ppd.config import PPDConfig
from ppd_ray.pipelines.demo import (
    BASE_MODEL_DIR,
    BETA_CHOICE,
    ONE_REWARD,
    REPO_ROOT,
    RESULTS_DIR,
    JobSequence,
    demo_jobs,
    job_line,
    run_concurrently,
)

logger = logging.getLogger(__name__)

PREREQUISITES = ("prepare one-reward users", f"embed {ONE_REWARD} (onehot)", f"precompute {ONE_REWARD}")


def variant_name(method: str, beta: float) -> str:
    """The sweep's name of one training: e.g. ppd_beta2."""
    return f"{method}_beta{beta:g}"


def choose(scores: dict[str, dict[float, float]]) -> dict[str, float]:
    """The β with the highest validation score per method (a tie goes to the larger β: closer to the reference)."""
    return {method: max(by_beta, key=lambda b: (by_beta[b], b)) for method, by_beta in scores.items()}


def run_beta_sweep(
    cfg: PPDConfig,
    workdir: Path,
    out_dir: Path,
    overrides: list[str],
    seed: int,
    betas: list[float],
    methods: list[str],
    generate_world: Callable[[PPDConfig, Path, int], object],
) -> dict:
    """Train every (method, β), score each on validation, choose; returns the record written to beta_sweep.json."""
    from ppd_ray.infra.local_cluster import local_head
    from ppd_ray.infra.mlflow_server import tracking_uri
    from ppd_ray.tracking import attach_to_parent, close_run, log_metrics, open_run

    began = time.monotonic()
    workdir = workdir.resolve()
    world = workdir / "toy"
    if not (world / "manifest.json").is_file():
        logger.info(f"== toy world ({cfg.preset}, seed {seed}) -> {world}")
        generate_world(cfg, world, seed)
    demo = demo_jobs(cfg, workdir, overrides, seed, world)
    stages = [stage for stage in demo.stages if stage.title in PREREQUISITES]
    sweep_dir = workdir / "sweep"
    base = f"model.stage_c_path={BASE_MODEL_DIR}"
    with tracking_uri(cfg.tracking.uri, workdir / "mlflow") as uri, local_head() as cluster:
        env = {"MLFLOW_TRACKING_URI": uri}

        def submit(title: str, entrypoint: str) -> None:
            logger.info(f"== {title}")
            cluster.submit_and_wait(entrypoint, working_dir=REPO_ROOT, env_vars=env, on_log=job_line)

        for stage in stages:
            if stage.output is not None and stage.output.is_file():
                logger.info(f"== {stage.title}: kept {stage.output}")
                continue
            submit(stage.title, stage.entrypoint)
        parent = open_run(uri, cfg.tracking.experiment, f"beta-sweep-seed{seed}", tags={"ppd.job": "sweep"})
        status = "FAILED"
        try:
            jobs = JobSequence(sweep_dir, cfg.preset, [*overrides, f"data.seed={seed}", f"train.seed={seed}"])
            for method in methods:
                for beta in betas:
                    jobs.train(
                        f"train {method} with β = {beta:g}",
                        workdir / "precomputed" / ONE_REWARD,
                        variant_name(method, beta),
                        base,
                        f"train.method={method}",
                        f"train.beta={beta:g}",
                        f"tracking.parent_run_id={parent}",
                    )
            to_train, kept = [], []
            for stage in jobs.stages:
                if stage.output is not None and stage.output.is_file():
                    logger.info(f"== {stage.title}: kept {stage.output}")
                    kept.append(stage.output.parent.name)  # runs/<variant>/summary.json
                    continue
                to_train.append(stage)
            # independent runs: `train.concurrent_runs` at a time, as in the demo
            run_concurrently(to_train, cfg.train.concurrent_runs, lambda stage: submit(stage.title, stage.entrypoint))
            adapters_path = sweep_dir / "adapters.json"
            adapters_path.write_text(json.dumps(jobs.adapters, indent=1) + "\n")
            validation_dir = sweep_dir / "validation"
            scoring = JobSequence(sweep_dir, cfg.preset, overrides)
            scoring.add(
                "score every adapter on the validation split",
                None,
                "ppd_ray.jobs.validate",
                "--world",
                world,
                "--prepared",
                workdir / "prepared" / ONE_REWARD,
                "--adapters",
                adapters_path,
                "--out",
                validation_dir,
                "--seed",
                str(seed),
                overrides=(base,),
            )
            submit(scoring.stages[0].title, scoring.stages[0].entrypoint)
            validation = json.loads((validation_dir / "validation.json").read_text())
            scores = {m: {b: validation[variant_name(m, b)]["mean_reward"] for b in betas} for m in methods}
            object_rates = {
                m: {f"{b:g}": validation[variant_name(m, b)]["object_rate"] for b in betas} for m in methods
            }
            chosen = choose(scores)
            for method in methods:
                for beta in betas:
                    summary = json.loads((sweep_dir / "runs" / variant_name(method, beta) / "summary.json").read_text())
                    # a run kept from an earlier sweep of this workdir joins this parent: one parent, every child
                    attach_to_parent(uri, summary["run_id"], parent)
                    log_metrics(uri, summary["run_id"], {"validation.mean_reward": scores[method][beta]})
            log_metrics(uri, parent, {f"chosen_beta.{m}": b for m, b in chosen.items()})
            status = "FINISHED"
        finally:
            close_run(uri, parent, status)
    record = {
        "preset": cfg.preset,
        "seed": seed,
        "split": "validation",
        "betas": betas,
        "steps": cfg.train.max_steps,
        "scores": {m: {f"{b:g}": v for b, v in by_beta.items()} for m, by_beta in scores.items()},
        "base_mean_reward": next(iter(validation.values()))["base_mean_reward"],
        # share of validation images with an object: not part of the choice, shown beside it (reward hacking)
        "object_rates": object_rates,
        "base_object_rate": next(iter(validation.values()))["base_object_rate"],
        "chosen": chosen,
        "mlflow_parent_run": parent,
        "seconds": round(time.monotonic() - began, 1),
        # trained by an earlier invocation on this workdir (same names, so same method and β); `seconds` excludes them
        "kept_runs": kept,
    }
    path = out_dir / RESULTS_DIR / BETA_CHOICE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    logger.info(f"chosen on validation: {chosen} -> {path}")
    return record


def format_sweep(record: dict) -> str:
    """The sweep as a small table: validation score per method and β, the chosen β marked."""
    lines = [f"validation mean reward (base {record['base_mean_reward']:.3f}), β chosen per method:"]
    for method, by_beta in record["scores"].items():
        cells = [f"β={b}: {v:.3f}{' *' if float(b) == record['chosen'][method] else ''}" for b, v in by_beta.items()]
        lines.append(f"  {method:4s} " + "   ".join(cells))
    return "\n".join(lines)
