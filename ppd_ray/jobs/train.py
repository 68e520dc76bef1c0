"""Ray job: fine-tune the user adapter (PPD, Diffusion-DPO or SFT) with Ray Train + DeepSpeed, tracked in MLflow.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m ppd_ray.jobs.train --precomputed /abs/precomputed --out /abs/runs/ppd --set train.method=ppd

This driver checks the inputs, reads the precomputed train split with Ray Data (one block per file, in order),
opens the MLflow run, runs a `TorchTrainer` of `train_worker` (ppd_ray/jobs/train_worker.py: DeepSpeed around
`ppd.train.step.training_step`, checkpoints, resume) and closes the run as FINISHED / FAILED / KILLED whatever
happens to the workers; then copies the final adapter to OUT/adapter/. A restarted worker group, or a re-run of
this job with the same OUT, resumes from the latest checkpoint at the exact micro-batch where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ppd.config import PPDConfig
from ppd.models.factory import resolved_model_config
from ppd.train.data import (
    PrecomputedError,
    PrecomputedInputs,
    PrecomputedManifest,
    TrainingSchedule,
    count_user_rows,
    keep_users,
)
from ppd.train.run_folder import OtherRunInFolder, read_run_record, write_run_record
from ppd_ray.console import JobError
from ppd_ray.infra.mlflow_server import tracking_uri
from ppd_ray.jobs.common import config_from_args, init_ray, job_arg_parser, run_job
from ppd_ray.jobs.train_worker import ADAPTER_DIR, DEFAULT_TORCH_EXTENSIONS_DIR, WorkerJob, train_worker
from ppd_ray.tracking import close_run, open_run

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class TrainResult:
    """Where a finished run put its outputs."""

    adapter_dir: Path
    run_id: str
    tracking_uri: str
    steps: int
    final_metrics: dict[str, float]
    checkpoint: str


def run(cfg: PPDConfig, precomputed: Path, out: Path, tracking: str | None = None) -> TrainResult:
    """Train `cfg.train.method` on `precomputed` into `out`; `tracking` overrides cfg.tracking.uri."""
    import pyarrow as pa
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    precomputed, out = precomputed.resolve(), out.resolve()
    try:
        manifest = PrecomputedManifest.read(precomputed)
        PrecomputedInputs(precomputed)  # the tables exist and match the manifest
    except PrecomputedError as err:
        raise JobError(str(err)) from None
    if manifest.architecture != cfg.model.architecture:
        raise JobError(
            f"{precomputed} holds latents of Stage C {manifest.architecture!r}, config says {cfg.model.architecture!r}"
        )
    if "train" not in manifest.splits:
        raise JobError(f"{precomputed} has no precomputed train split")
    train_paths = manifest.split_paths(precomputed, "train")
    train_rows = manifest.splits["train"].rows
    if cfg.train.users is not None:  # e.g. a per-reward DPO upper bound: one user's pairs only
        train_rows = count_user_rows(train_paths, cfg.train.users)
        if train_rows == 0:
            raise JobError(f"train.users={cfg.train.users}: none of them has a pair in {precomputed}'s train split")
        logger.info(f"training on the {train_rows} pairs of user(s) {cfg.train.users}")
    try:
        schedule = TrainingSchedule.from_config(cfg.train, train_rows)
    except ValueError as err:
        raise JobError(str(err)) from None
    cfg = cfg.model_copy(update={"model": resolved_model_config(cfg.model)})
    out.mkdir(parents=True, exist_ok=True)
    try:
        previous = read_run_record(out, cfg)
    except OtherRunInFolder as err:
        raise JobError(str(err)) from None
    storage = cfg.train.storage_path or str(out / "ray")

    init_ray()
    columns = ["pair_id", "caption_index", "embedding_index", "latents_win", "latents_lose"]
    dataset = ray.data.read_parquet(
        train_paths,
        override_num_blocks=len(manifest.splits["train"].files),  # one block per file: the same split every run
    )
    if cfg.train.users is not None:
        # A few users' pairs are small: read and filter them once (in order), not again in every epoch.
        ray.data.DataContext.get_current().execution_options = _ordered_execution()
        kept = (
            dataset.select_columns([*columns, "user_id", "order_key"])
            .map_batches(keep_users, fn_kwargs={"users": cfg.train.users}, batch_format="pyarrow", batch_size=None)
            .materialize()
        )
        # Sorted by the seeded order key on the driver, as one block: the materialised blocks came back in a different
        # order on every run (measured: a per-user run's pair order, and so its adapter, changed from run to run).
        # The key is what orders the unfiltered split's files and rows, so this is the order an ordered read gives.
        table = pa.concat_tables(ray.get(kept.to_arrow_refs())).sort_by("order_key")
        dataset = ray.data.from_arrow(table)
    dataset = dataset.select_columns(columns)
    with tracking_uri(tracking or cfg.tracking.uri, Path(cfg.tracking.local_store)) as uri:
        run_id = open_run(
            uri,
            cfg.tracking.experiment,
            run_name=f"{cfg.train.method}-{out.name}",
            tags={
                "method": cfg.train.method,
                "preset": cfg.preset,
                "out": str(out),
                "precomputed": str(precomputed),
                **({"mlflow.parentRunId": cfg.tracking.parent_run_id} if cfg.tracking.parent_run_id else {}),
            },
            resume_run_id=previous.get("run_id"),
        )
        write_run_record(out, cfg, run_id)
        logger.info(
            f"training {cfg.train.method}: {schedule.total_steps} steps of {cfg.train.effective_batch} pairs "
            f"({cfg.train.num_workers} worker(s) x {cfg.train.micro_batch} x {schedule.accumulation} accumulation), "
            f"ZeRO-{cfg.train.zero_stage}, MLflow run {run_id} at {uri}"
        )
        job = WorkerJob(
            precomputed=str(precomputed),
            micro_batches_per_epoch=schedule.micro_batches_per_epoch,
            accumulation=schedule.accumulation,
            total_steps=schedule.total_steps,
            tracking_uri=uri,
            run_id=run_id,
        )
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"config": cfg.to_dict(), "job": asdict(job)},
            torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.train.num_workers,
                use_gpu=cfg.train.use_gpu,
                resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})},
                placement_strategy=cfg.train.placement_strategy,
            ),
            run_config=ray.train.RunConfig(
                name="train",
                storage_path=storage,
                failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
                worker_runtime_env={"env_vars": _worker_env()},
            ),
            datasets={"train": dataset},
            # Ordered execution: the rows every rank receives, and their order, are the same on every attempt.
            dataset_config=ray.train.DataConfig(execution_options=_ordered_execution()),
        )
        status = "FAILED"
        try:
            result = trainer.fit()
            logger.info("training finished")
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except ray.train.TrainingFailedError as err:
            raise TrainingFailed(f"training failed: {_first_error_line(err)} (MLflow run {run_id})") from None
        finally:
            close_run(uri, run_id, status)
    with result.checkpoint.as_directory() as directory:
        adapter_dir = out / ADAPTER_DIR
        shutil.rmtree(adapter_dir, ignore_errors=True)
        shutil.copytree(Path(directory) / ADAPTER_DIR, adapter_dir)
    final = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    outcome = TrainResult(adapter_dir, run_id, uri, schedule.total_steps, final, result.checkpoint.path)
    (out / SUMMARY_FILE).write_text(json.dumps({**asdict(outcome), "adapter_dir": str(adapter_dir)}, indent=2))
    logger.info(f"adapter -> {adapter_dir}")
    return outcome


class TrainingFailed(JobError):
    """Training failed in the workers (after `train.max_failures` restarts): like every job error, one `error:` line
    and exit status 2 (what `ppd train` has always returned for it)."""


def _ordered_execution():
    import copy

    import ray.data

    options = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
    options.preserve_order = True
    return options


def _worker_env() -> dict[str, str]:
    env = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(DEFAULT_TORCH_EXTENSIONS_DIR))}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _first_error_line(err: BaseException) -> str:
    failures = getattr(err, "worker_failures", None) or {}
    root = next(iter(failures.values()), err)
    lines = [line for line in str(root).splitlines() if line.strip()]
    return f"{type(root).__name__}: {lines[-1] if lines else ''}"[:500]


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = job_arg_parser(__name__, prog)
    parser.add_argument("--precomputed", required=True, type=Path, help="output folder of the precompute job")
    parser.add_argument("--out", "-o", required=True, type=Path, help="run folder: adapter/, summary.json, checkpoints")
    parser.add_argument("--method", default=None, help="ppd, dpo or sft (default: the preset's train.method)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: config, else loopback)")

    def job(args) -> str:
        cfg = config_from_args(args, *[f"train.method={args.method}"] * (args.method is not None))
        result = run(cfg, args.precomputed, args.out, args.tracking_uri)
        return f"adapter {result.adapter_dir}  MLflow run {result.run_id}  ({result.steps} steps)"

    return run_job(parser, argv, job)


if __name__ == "__main__":
    sys.exit(main())
