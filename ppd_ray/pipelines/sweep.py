"""`ppd sweep beta`: choose DPO's β for PPD and for Diffusion-DPO on the validation split (paper B.1), as Ray jobs.

On a local head (as `ppd demo`): the one-reward users' inputs (prepare, one-hot embed, precompute; kept when a demo
already made them), one training per (method, β) nested under one MLflow parent run, then the validate job scores
every adapter on validation captions. Per method, the β with the highest validation score among those whose
validation images still draw the toy world (object rate at least the base's, less a margin) is written to
`<out>/results/beta_sweep.json`, which `ppd demo` reads. Test splits are never touched.

Why the object-rate constraint: the hidden rewards are pixel statistics, so a small β can raise them by painting the
image (Diffusion-DPO at β = 0.0625 scored its best validation reward while drawing an object in 41% of its images,
base 88%, and its per-user upper bounds then turned the warmth reward the wrong way on test captions). The DPO
objective's reference term is what should prevent that; β is its strength, so it is chosen where the model still
generates what the base generates.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from ppd.config import PPDConfig
from ppd.eval.base_quality import draws_as_often_as_base
from ppd_ray.pipelines.demo import (
    BASE_MODEL_DIR,
    BETA_CHOICE,
    ONE_REWARD,
    REPO_ROOT,
    RESULTS_DIR,
    JobSequence,
    demo_jobs,
    job_line,
    keep_or_clear,
    record_finished,
    run_concurrently,
)

logger = logging.getLogger(__name__)

PREREQUISITES = ("prepare one-reward users", f"embed {ONE_REWARD} (onehot)", f"precompute {ONE_REWARD}")


def variant_name(method: str, beta: float) -> str:
    """The sweep's name of one training: e.g. ppd_beta2."""
    return f"{method}_beta{beta:g}"


def choose(
    scores: dict[str, dict[float, float]],
    object_rates: dict[str, dict[float, float]] | None = None,
    base_object_rate: float | None = None,
    object_rate_margin: float = 0.0,
) -> dict[str, float]:
    """The β with the highest validation score per method among the eligible ones (a tie goes to the larger β:
    closer to the reference).

    Eligible: validation object rate ≥ `base_object_rate` - `object_rate_margin` (every β when no rates are given).
    Where no β of a method is eligible, the one that draws objects most often is taken (least reward hacking)."""

    def eligible(method: str, beta: float) -> bool:
        if object_rates is None or base_object_rate is None:
            return True
        return draws_as_often_as_base(object_rates[method][beta], base_object_rate, object_rate_margin)

    def rank(method: str, beta: float) -> tuple:
        if eligible(method, beta):
            return (True, scores[method][beta], beta)
        return (False, object_rates[method][beta], scores[method][beta], beta)

    chosen = {}
    for method, by_beta in scores.items():
        if not any(eligible(method, b) for b in by_beta):
            logger.warning(
                f"{method}: no β keeps the validation object rate near the base's; the highest rate is taken"
            )
        chosen[method] = max(by_beta, key=lambda b, m=method: rank(m, b))
    return chosen


def choice_rule(object_rate_margin: float) -> dict:
    """The rule's fields of the record: its wording (RESULTS.md prints it) and its margin."""
    margin = f" - {object_rate_margin:.0%}" if object_rate_margin else ""
    return {
        "choice_rule": f"highest validation mean reward among β with validation object rate ≥ base's{margin}",
        "object_rate_margin": object_rate_margin,
    }


def rechoose(path: Path, object_rate_margin: float) -> dict:
    """Apply the choice rule again to the validation scores and object rates a sweep recorded at `path` (no training,
    no scoring: both came from the sweep's validate job); rewrites the record's choice and returns the record."""
    record = json.loads(path.read_text())
    if "object_rates" not in record:
        raise ValueError(f"{path} has no validation object rates (written before they were recorded): rerun the sweep")
    scores = {m: {float(b): v for b, v in by_beta.items()} for m, by_beta in record["scores"].items()}
    rates = {m: {float(b): v for b, v in by_beta.items()} for m, by_beta in record["object_rates"].items()}
    record["chosen"] = choose(scores, rates, record["base_object_rate"], object_rate_margin)
    record.update(choice_rule(object_rate_margin))
    record["rechosen"] = True  # the choice is newer than the scores: RESULTS.md says so
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def run_beta_sweep(
    cfg: PPDConfig,
    workdir: Path,
    out_dir: Path,
    overrides: list[str],
    seed: int,
    betas: list[float],
    methods: list[str],
    generate_world: Callable[[PPDConfig, Path, int], object],
    object_rate_margin: float = 0.0,
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

        def submit(stage) -> None:
            logger.info(f"== {stage.title}")
            cluster.submit_and_wait(stage.entrypoint, working_dir=REPO_ROOT, env_vars=env, on_log=job_line)
            record_finished(stage)

        for stage in stages:
            if keep_or_clear(stage):
                logger.info(f"== {stage.title}: kept {stage.output}")
                continue
            submit(stage)
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
                # trained by an earlier invocation with the same command (method, β, steps, every setting): kept
                if keep_or_clear(stage):
                    logger.info(f"== {stage.title}: kept {stage.output}")
                    kept.append(stage.output.parent.name)  # runs/<variant>/summary.json
                    continue
                to_train.append(stage)
            # independent runs: `train.concurrent_runs` at a time, as in the demo
            run_concurrently(to_train, cfg.train.concurrent_runs, submit)
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
            submit(scoring.stages[0])
            validation = json.loads((validation_dir / "validation.json").read_text())
            scores = {m: {b: validation[variant_name(m, b)]["mean_reward"] for b in betas} for m in methods}
            rates = {m: {b: validation[variant_name(m, b)]["object_rate"] for b in betas} for m in methods}
            base_object_rate = next(iter(validation.values()))["base_object_rate"]
            chosen = choose(scores, rates, base_object_rate, object_rate_margin)
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
        # share of validation images with an object: β that fall below the base's are not chosen (reward hacking)
        "object_rates": {m: {f"{b:g}": v for b, v in by_beta.items()} for m, by_beta in rates.items()},
        "base_object_rate": base_object_rate,
        "chosen": chosen,
        **choice_rule(object_rate_margin),
        "mlflow_parent_run": parent,
        "seconds": round(time.monotonic() - began, 1),
        # trained by an earlier invocation on this workdir with the same command; `seconds` excludes them
        "kept_runs": kept,
    }
    path = out_dir / RESULTS_DIR / BETA_CHOICE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    logger.info(f"chosen on validation: {chosen} -> {path}")
    return record


def format_sweep(record: dict) -> str:
    """The sweep as a small table: validation score (and object rate) per method and β, the chosen β marked."""
    rates = record.get("object_rates") or {}
    lines = [f"validation mean reward (base {record['base_mean_reward']:.3f}), β chosen per method:"]
    if rates:
        lines[0] = (
            f"validation mean reward / object rate (base {record['base_mean_reward']:.3f} / "
            f"{record['base_object_rate']:.0%}); rule: {record.get('choice_rule', 'highest reward')}:"
        )
    for method, by_beta in record["scores"].items():
        cells = []
        for b, v in by_beta.items():
            rate = f" / {rates[method][b]:.0%}" if method in rates else ""
            cells.append(f"β={b}: {v:.3f}{rate}{' *' if float(b) == record['chosen'][method] else ''}")
        lines.append(f"  {method:4s} " + "   ".join(cells))
    return "\n".join(lines)
