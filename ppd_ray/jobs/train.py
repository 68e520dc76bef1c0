"""Ray job: fine-tune the user adapter (PPD, Diffusion-DPO or SFT) with Ray Train + DeepSpeed, tracked in MLflow.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m ppd_ray.jobs.train --precomputed /abs/precomputed --out /abs/runs/ppd --set train.method=ppd

Driver (this process): checks the inputs, opens the MLflow run, runs a `TorchTrainer` and closes the run as
FINISHED / FAILED / KILLED whatever happens to the workers; copies the final adapter to OUT/adapter/.
Workers (`train_worker`): rebuild the typed config, build Stage C + adapter, wrap it in DeepSpeed (ZeRO-2 by
default, 3 selectable), stream their shard of the precomputed rows, and call `ppd.train.step.training_step`.
Every `train.checkpoint_every` optimiser steps and at the end, every rank saves its DeepSpeed state and Ray Train
persists the merged directory; a restarted worker group, or a re-run of this job with the same OUT, resumes from
the latest checkpoint at the exact micro-batch where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ppd.config import PPDConfig, TrainConfig
from ppd.train.data import PrecomputedError, PrecomputedInputs, PrecomputedManifest, TrainingSchedule
from ppd_ray.console import JobError, setup_logging
from ppd_ray.infra.mlflow_server import tracking_uri
from ppd_ray.jobs.common import config_from_args, init_ray, job_arg_parser, run_job
from ppd_ray.jobs.precompute import resolved_model_config
from ppd_ray.tracking import RunLogger, close_run, open_run

logger = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.json"
ADAPTER_DIR = "adapter"
RUN_RECORD = "run.json"
SUMMARY_FILE = "summary.json"
# DeepSpeed JIT-builds an op on first use (~1 min); a persistent cache makes later starts take seconds. `make` points
# TORCH_EXTENSIONS_DIR at the clone's .cache/ (forwarded to every job); without it, the job's own copy of the repo.
DEFAULT_TORCH_EXTENSIONS_DIR = Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"


@dataclass(frozen=True)
class WorkerJob:
    """What every worker needs besides the config: inputs, schedule and the MLflow run to write to."""

    precomputed: str
    micro_batches_per_epoch: int
    accumulation: int
    total_steps: int
    tracking_uri: str
    run_id: str

    @property
    def schedule(self) -> TrainingSchedule:
        return TrainingSchedule(self.micro_batches_per_epoch, self.accumulation, self.total_steps)


@dataclass(frozen=True)
class TrainResult:
    """Where a finished run put its outputs."""

    adapter_dir: Path
    run_id: str
    tracking_uri: str
    steps: int
    final_metrics: dict[str, float]
    checkpoint: str


def deepspeed_config(train: TrainConfig) -> dict[str, Any]:
    """DeepSpeed's config for `train`: batch sizes, ZeRO stage, precision, clipping."""
    return {
        "train_batch_size": train.effective_batch,
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accumulation,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        # torch's AdamW is not on DeepSpeed's list of ZeRO-tested optimisers, but ZeRO only partitions its state.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # progress is logged by rank 0 below, not by DeepSpeed
        "wall_clock_breakdown": False,
    }


# --- worker --------------------------------------------------------------------------------------------------------


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker loop (runs on every rank)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(DEFAULT_TORCH_EXTENSIONS_DIR))
    setup_logging()  # a Train worker is a process of its own: rank 0's progress lines need the handler too

    import deepspeed
    import ray.train
    import ray.train.torch

    from ppd.models.factory import build_personalized_stage_c

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    cfg = PPDConfig.from_dict(loop_config["config"])
    job = WorkerJob(**loop_config["job"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # The same thread count on every attempt: CPU kernels then reduce in the same order, so runs reproduce.
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    inputs = PrecomputedInputs(job.precomputed)
    torch.manual_seed(cfg.train.seed)  # adapter init: identical on every rank and every attempt
    model = build_personalized_stage_c(cfg.model, inputs.manifest.embedding_shape, device)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg.train))
    tracker = RunLogger(job.tracking_uri, job.run_id) if rank == 0 else None
    _Worker(engine, cfg, job, inputs, rank, device, tracker).run()


class _StepMetrics:
    """Sums the metrics of a step's micro-batches; at the step boundary, one all-reduce averages them over
    micro-batches and ranks (`pair_id_checksum`, a fingerprint of the rows the step read, is summed instead)."""

    def __init__(self, accumulation: int, device: torch.device) -> None:
        self.accumulation, self.device = accumulation, device
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, metrics: dict[str, torch.Tensor], pair_ids) -> None:
        metrics = {**metrics, "pair_id_checksum": torch.tensor(float(pair_ids.sum()))}
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().double().cpu()

    def reduce(self) -> dict[str, float]:
        import torch.distributed as dist

        keys = sorted(self.sums)
        values = torch.stack([self.sums[k] for k in keys]).to(self.device)  # [K] float64
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            world = dist.get_world_size()
        self.sums = {}
        summed = dict(zip(keys, values.cpu().tolist(), strict=True))
        return {k: v if k == "pair_id_checksum" else v / (self.accumulation * world) for k, v in summed.items()}


@dataclass
class _Worker:
    """One rank's training: resume, the step loop, checkpoints; rank 0 also logs and publishes."""

    engine: Any  # deepspeed.DeepSpeedEngine wrapping the PersonalizedStageC
    cfg: PPDConfig
    job: WorkerJob
    inputs: PrecomputedInputs
    rank: int
    device: torch.device
    tracker: RunLogger | None  # rank 0 only

    def run(self) -> None:
        # Under ZeRO-3 the frozen base is partitioned too: its digest would need a gather, so it is not taken.
        self.base_digest = frozen_base_digest(self.engine.module) if self.cfg.train.zero_stage < 3 else None
        try:
            if self.tracker:
                self.tracker.started(self.cfg.flatten())
            start_step, restored = self._restore()
            if start_step > self.job.total_steps:
                raise ValueError(
                    f"the latest checkpoint of this run is at step {start_step}, past its {self.job.total_steps} "
                    "steps: raise train.max_steps (or epochs), or train into another folder"
                )
            if restored is not None and start_step == self.job.total_steps:
                # The final checkpoint exists (an attempt died while publishing it): publish again, train nothing.
                with restored.as_directory() as directory:
                    self._publish(Path(directory) / ADAPTER_DIR)
                return
            self._train(start_step)
        except BaseException as err:
            if self.tracker:
                self.tracker.failed(err)
            raise

    def _restore(self) -> tuple[int, Any]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return 0, None
        with checkpoint.as_directory() as directory:
            state = json.loads((Path(directory) / TRAIN_STATE_FILE).read_text())
            # The frozen base is not in the checkpoint (exclude_frozen_parameters): it is the pretrained model.
            loaded, _ = self.engine.load_checkpoint(directory, tag=state["tag"], load_module_strict=False)
            if loaded is None:  # DeepSpeed reports a checkpoint it could not read by returning None
                raise RuntimeError(f"DeepSpeed could not load checkpoint {state['tag']} from {checkpoint.path}")
        if self.rank == 0:
            logger.info(f"resumed from optimiser step {state['global_step']}")
        return int(state["global_step"]), checkpoint

    def _train(self, start_step: int) -> None:
        import ray.train

        from ppd.train.data import micro_batch_generator
        from ppd.train.step import training_step

        train, schedule = self.cfg.train, self.job.schedule
        shard = ray.train.get_dataset_shard("train")
        micro_step = start_step * schedule.accumulation
        step_metrics = _StepMetrics(schedule.accumulation, self.device)
        step_started = time.monotonic()
        self.engine.train()
        for rows in _micro_batches(shard, schedule, micro_step, train.micro_batch):
            batch = self.inputs.batch(rows, self.device)
            generator = micro_batch_generator(train.seed, micro_step, self.rank)
            output = training_step(self.engine.module, batch, train, generator=generator)
            self.engine.backward(output.loss)  # DeepSpeed scales by 1/accumulation and steps at the boundary
            self.engine.step()
            micro_step += 1
            step_metrics.add(output.metrics, rows.column("pair_id").to_numpy())
            if micro_step % schedule.accumulation:
                continue
            grad_norm = self.engine.get_global_grad_norm()
            metrics = {
                **step_metrics.reduce(),
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "lr": float(self.engine.get_lr()[0]),
                "pairs_per_s": train.effective_batch / max(time.monotonic() - step_started, 1e-9),
                "epoch": micro_step / schedule.micro_batches_per_epoch,
            }
            self._end_of_step(micro_step // schedule.accumulation, metrics)
            step_started = time.monotonic()

    def _end_of_step(self, step: int, metrics: dict[str, float]) -> None:
        total = self.job.total_steps
        if self.tracker:
            self.tracker.log_metrics(step, metrics)
            if step % max(1, total // 20) == 0 or step == total:
                accuracy = metrics.get("implicit_accuracy", float("nan"))
                logger.info(
                    f"step {step}/{total} loss {metrics['loss']:.4f} acc {accuracy:.2f} {metrics['pairs_per_s']:.0f} pairs/s"
                )
        if step % self.cfg.train.checkpoint_every == 0 or step == total:
            self._save_checkpoint(step, metrics)

    def _save_checkpoint(self, step: int, metrics: dict[str, float]) -> None:
        import ray.train

        from ppd.models.checkpoint import save_adapter

        cfg = self.cfg
        with tempfile.TemporaryDirectory(prefix="ppd-checkpoint-") as scratch:
            directory = Path(scratch)
            tag = f"step-{step:08d}"
            # Every rank writes its own ZeRO shard; the frozen base is left out (it is the pretrained model).
            self.engine.save_checkpoint(scratch, tag=tag, exclude_frozen_parameters=True)
            with _full_adapter_parameters(self.engine, cfg.train.zero_stage):
                if self.rank == 0:
                    save_adapter(
                        self.engine.module,
                        directory / ADAPTER_DIR,
                        architecture=cfg.model.architecture,
                        base_model=cfg.model.stage_c_path or "tiny",
                        train_method=cfg.train.method,
                        extra={"step": step, "run_id": self.job.run_id, "preset": cfg.preset},
                    )
            if self.rank == 0:
                state = {
                    "global_step": step,
                    "tag": tag,
                    "micro_step": step * cfg.train.grad_accumulation,
                    # The frozen base when this attempt started and now: training must never touch it.
                    "base_sha256_at_start": self.base_digest,
                    "base_sha256": frozen_base_digest(self.engine.module) if self.base_digest else None,
                }
                (directory / TRAIN_STATE_FILE).write_text(json.dumps(state, indent=2))
            # Ray merges the ranks' directories into one checkpoint in storage (their file names do not collide).
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(scratch), checkpoint_dir_name=tag)
            if step == self.job.total_steps:
                self._publish(directory / ADAPTER_DIR)

    def _publish(self, adapter_dir: Path) -> None:
        """Rank 0, once the final checkpoint is persisted: adapter + sample grid as artifacts, adapter registered."""
        if self.tracker is None:
            return
        self.tracker.log_artifacts(adapter_dir, ADAPTER_DIR)
        with tempfile.TemporaryDirectory(prefix="ppd-grid-") as scratch:
            grid = Path(scratch) / "sample_grid.png"
            sample_grid(self.cfg, self.inputs, adapter_dir, self.device).save(grid)
            self.tracker.log_artifact(grid)
        model_name = self.cfg.tracking.registered_model
        tags = {"method": self.cfg.train.method, "preset": self.cfg.preset}
        version = self.tracker.register(model_name, ADAPTER_DIR, tags)
        logger.info(f"adapter registered as {model_name} version {version}")


def _micro_batches(shard, schedule: TrainingSchedule, micro_step: int, micro_batch: int) -> Iterator[Any]:
    """This worker's micro-batches (pyarrow tables) from micro-step `micro_step` to the end of the schedule."""
    _, skip = schedule.position(micro_step)  # each epoch re-reads the shard in the same order
    while micro_step < schedule.total_micro_steps:
        batches = shard.iter_batches(batch_size=micro_batch, batch_format="pyarrow", drop_last=True)
        for index, rows in enumerate(batches):
            if index < skip:  # consumed before the checkpoint this run resumed from
                continue
            if index >= schedule.micro_batches_per_epoch or micro_step >= schedule.total_micro_steps:
                break
            yield rows
            micro_step += 1
        skip = 0


def frozen_base_digest(model) -> str:
    """sha256 over the frozen base's state dict (names and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.base.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _full_adapter_parameters(engine, zero_stage: int):
    """Under ZeRO-3 the adapter's parameters are partitioned: gather them (a collective) to export the adapter."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.adapter.parameters()), modifier_rank=None)


def sample_grid(cfg: PPDConfig, inputs: PrecomputedInputs, adapter_dir: Path, device="cpu"):
    """A PNG-ready grid: a row per user (first row: the base model), a column per caption, from a fresh model
    loaded from the exported adapter (so the grid also proves the export loads)."""
    import pandas as pd
    from PIL import Image

    from ppd.models.checkpoint import load_adapter
    from ppd.models.factory import build_personalized_stage_c, load_caption_encoder, load_decoder
    from ppd.sample import generate_images
    from ppd.train.data import EMBEDDINGS_INDEX
    from ppd.train.step import population_user_embedding

    model = build_personalized_stage_c(cfg.model, inputs.manifest.embedding_shape, device)
    load_adapter(model, adapter_dir, architecture=cfg.model.architecture)
    model.eval()
    captions = min(cfg.tracking.sample_captions, inputs.manifest.captions)
    users = (
        pd.read_parquet(inputs.directory / EMBEDDINGS_INDEX).drop_duplicates("user_id").head(cfg.tracking.sample_users)
    )
    caption_rows = list(range(captions))
    hidden = inputs.captions.rows("clip_text_hidden", caption_rows).float().to(device)  # [K, S, C_t]
    pooled = inputs.captions.rows("clip_text_pooled", caption_rows).float().to(device)  # [K, 1, C_t]
    user_rows = inputs.user_embeddings.rows("user_embedding", users["embedding_index"].to_numpy()).float().to(device)
    if cfg.train.method == "dpo":  # Diffusion-DPO is trained for its one constant "population" user only
        user_rows = population_user_embedding(1, tuple(user_rows.shape[1:])).to(device)
    rows = [None, *user_rows]  # None = adapter off = the base model
    decoder = load_decoder(cfg.model, device)
    unconditional_text = load_caption_encoder(cfg.model, device).unconditional_text()
    images = []
    for user in rows:
        embedding = None if user is None else user.unsqueeze(0).expand(captions, -1, -1)  # [K, L, d]
        images.append(
            generate_images(
                model,
                decoder,
                hidden,
                pooled,
                seeds=list(range(captions)),
                latent_shape=inputs.manifest.latent_shape,
                user_embedding=embedding,
                steps=cfg.eval.inference_steps,
                guidance=cfg.eval.guidance,
                unconditional_text=unconditional_text,
            )
        )  # [K, 3, H, W] in [0, 1]
    grid = torch.stack(images)  # [R, K, 3, H, W]
    cell = max(64, grid.shape[-1])
    canvas = Image.new("RGB", (cell * captions, cell * len(rows)), "white")
    for r, row in enumerate(grid):
        for k, image in enumerate(row):
            pixels = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()
            tile = Image.fromarray(pixels).resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(tile, (k * cell, r * cell))
    return canvas


# --- driver --------------------------------------------------------------------------------------------------------


def _rows_of_users(paths: list[str], users: list[int]) -> int:
    """Training pairs of `users` in the precomputed files (reads only the user_id column)."""
    import numpy as np
    import pyarrow.parquet as pq

    user_ids = pq.read_table(paths, columns=["user_id"]).column("user_id").to_numpy()
    return int(np.isin(user_ids, users).sum())


def _keep_users(batch, users: list[int]):
    """Ray Data stage: keep the rows of `users` (row order within a block is unchanged, so resume stays exact)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return batch.filter(pc.is_in(batch.column("user_id"), pa.array(users, batch.column("user_id").type)))


def run(cfg: PPDConfig, precomputed: Path, out: Path, tracking: str | None = None) -> TrainResult:
    """Train `cfg.train.method` on `precomputed` into `out`; `tracking` overrides cfg.tracking.uri."""
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
        train_rows = _rows_of_users(train_paths, cfg.train.users)
        if train_rows == 0:
            raise JobError(f"train.users={cfg.train.users}: none of them has a pair in {precomputed}'s train split")
        logger.info(f"training on the {train_rows} pairs of user(s) {cfg.train.users}")
    try:
        schedule = TrainingSchedule.from_config(cfg.train, train_rows)
    except ValueError as err:
        raise JobError(str(err)) from None
    cfg = cfg.model_copy(update={"model": resolved_model_config(cfg.model)})
    out.mkdir(parents=True, exist_ok=True)
    previous = _check_run_record(out, cfg)
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
        dataset = (
            dataset.select_columns([*columns, "user_id"])
            .map_batches(_keep_users, fn_kwargs={"users": cfg.train.users}, batch_format="pyarrow", batch_size=None)
            .materialize()
        )
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
        _write_run_record(out, cfg, run_id)
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
    """Training failed in the workers (after `train.max_failures` restarts)."""

    exit_code = 1


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


# Fields a re-run in the same folder may change: where it logs, how often it may fail, and how long it trains
# (a larger max_steps / epochs continues the run from its last checkpoint).
_CONTINUABLE_FIELDS = ("tracking.", "train.max_failures", "train.max_steps", "train.epochs")


def _config_digest(cfg: PPDConfig) -> str:
    stable = {k: v for k, v in cfg.flatten().items() if not k.startswith(_CONTINUABLE_FIELDS)}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]


def _check_run_record(out: Path, cfg: PPDConfig) -> dict[str, Any]:
    """The record of an earlier run in `out` (empty if none); a JobError if it trained a different config."""
    path = out / RUN_RECORD
    if not path.is_file():
        return {}
    record = json.loads(path.read_text())
    if record.get("config_digest") != _config_digest(cfg):
        raise JobError(
            f"{out} holds a run of a different config (its checkpoints would be resumed): use another --out "
            "or delete that folder"
        )
    return record


def _write_run_record(out: Path, cfg: PPDConfig, run_id: str) -> None:
    (out / RUN_RECORD).write_text(json.dumps({"run_id": run_id, "config_digest": _config_digest(cfg)}, indent=2))


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
