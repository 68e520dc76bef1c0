"""The train job's worker loop, on every rank of a Ray Train `TorchTrainer`: DeepSpeed around `ppd`'s training step.

Each worker rebuilds the typed config, builds Stage C + adapter, wraps it in DeepSpeed (ZeRO-2 by default, 3
selectable), streams its shard of the precomputed rows and calls `ppd.train.step.training_step` on every
micro-batch. Every `train.checkpoint_every` optimiser steps and at the end, every rank saves its DeepSpeed state and
Ray Train persists the merged directory; a restarted worker group resumes from the latest checkpoint at the exact
micro-batch where it stopped. Rank 0 logs to the driver's MLflow run and, at the end, publishes the adapter and its
sample grid (`ppd.eval.generate.user_grid`, from a fresh model loaded from the exported adapter).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ppd.config import PPDConfig
from ppd.models.checkpoint import frozen_base_digest, save_adapter
from ppd.train.data import PrecomputedInputs, TrainingSchedule, micro_batch_generator
from ppd.train.distributed import StepMetrics, deepspeed_config
from ppd.train.step import training_step
from ppd_ray.console import setup_logging
from ppd_ray.infra.processes import path_with_interpreter_bin
from ppd_ray.tracking import RunLogger

logger = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.json"
ADAPTER_DIR = "adapter"
# DeepSpeed JIT-builds an op on first use (~1 min); a persistent cache makes later starts take seconds. `make` points
# TORCH_EXTENSIONS_DIR at the clone's .cache/ (forwarded to every job); without it, the job's own copy of the repo.
DEFAULT_TORCH_EXTENSIONS_DIR = Path(__file__).resolve().parents[2] / ".cache" / "torch_extensions"


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


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker loop (runs on every rank)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(DEFAULT_TORCH_EXTENSIONS_DIR))
    # DeepSpeed's op build runs whichever `ninja` PATH finds first, and ninja versions hash the build command into
    # `.ninja_log` differently (Debian's 1.11, pip's 1.13): workers that find a different one than the last build
    # rebuild the op from scratch (~1 min of two cores). Always the environment's (pip's, a DeepSpeed dependency).
    os.environ["PATH"] = path_with_interpreter_bin()
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
    groups = model.optimizer_groups(cfg.train.lr, cfg.train.user_projection_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg.train))
    tracker = RunLogger(job.tracking_uri, job.run_id) if rank == 0 else None
    _Worker(engine, cfg, job, inputs, rank, device, tracker).run()


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

        train, schedule = self.cfg.train, self.job.schedule
        shard = ray.train.get_dataset_shard("train")

        def read_epoch():  # each epoch re-reads the shard in the same order
            return shard.iter_batches(batch_size=train.micro_batch, batch_format="pyarrow", drop_last=True)

        micro_step = start_step * schedule.accumulation
        step_metrics = StepMetrics(schedule.accumulation, self.device)
        step_started = time.monotonic()
        self.engine.train()
        for rows in schedule.remaining_micro_batches(read_epoch, micro_step):
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
                    f"step {step}/{total} loss {metrics['loss']:.4f} acc {accuracy:.2f} "
                    f"{metrics['pairs_per_s']:.0f} pairs/s"
                )
        if step % self.cfg.train.checkpoint_every == 0 or step == total:
            self._save_checkpoint(step, metrics)

    def _save_checkpoint(self, step: int, metrics: dict[str, float]) -> None:
        import ray.train

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
        from ppd.eval.generate import VariantGenerator, user_grid

        self.tracker.log_artifacts(adapter_dir, ADAPTER_DIR)
        cfg = self.cfg
        # A fresh model loaded from the exported adapter: the grid also proves the export loads.
        generator = VariantGenerator(cfg, adapter_dir, device=str(self.device))
        captions = self.inputs.caption_texts(cfg.tracking.sample_captions)
        user_ids, embeddings = self.inputs.first_users(cfg.tracking.sample_users)
        users = {f"user {u}": e.numpy() for u, e in zip(user_ids, embeddings, strict=True)}
        with tempfile.TemporaryDirectory(prefix="ppd-grid-") as scratch:
            self.tracker.log_artifact(user_grid(generator, captions, users, Path(scratch) / "sample_grid.png"))
        model_name = cfg.tracking.registered_model
        tags = {"method": cfg.train.method, "preset": cfg.preset}
        version = self.tracker.register(model_name, ADAPTER_DIR, tags)
        logger.info(f"adapter registered as {model_name} version {version}")


def _full_adapter_parameters(engine, zero_stage: int):
    """Under ZeRO-3 the adapter's parameters are partitioned: gather them (a collective) to export the adapter."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.adapter.parameters()), modifier_rank=None)
