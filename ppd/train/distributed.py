"""Data-parallel training around `training_step`: DeepSpeed's config of a TrainConfig, and step metrics averaged
over micro-batches and ranks (torch.distributed; this module imports no DeepSpeed)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ppd.config import TrainConfig


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
        "steps_per_print": 10**9,  # progress is logged by rank 0 of the job, not by DeepSpeed
        "wall_clock_breakdown": False,
    }


class StepMetrics:
    """Sums the metrics of a step's micro-batches; at the step boundary, one all-reduce averages them over
    micro-batches and ranks (`pair_id_checksum`, a fingerprint of the rows the step read, is summed instead)."""

    def __init__(self, accumulation: int, device: torch.device) -> None:
        self.accumulation, self.device = accumulation, device
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, metrics: dict[str, torch.Tensor], pair_ids: np.ndarray) -> None:
        """One micro-batch's metrics and the ids of the pairs it read."""
        metrics = {**metrics, "pair_id_checksum": torch.tensor(float(pair_ids.sum()))}
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().double().cpu()

    def reduce(self) -> dict[str, float]:
        """The step's metrics (a collective when a process group is up: every rank calls it); starts the next step."""
        keys = sorted(self.sums)
        values = torch.stack([self.sums[k] for k in keys]).to(self.device)  # [K] float64
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            world = dist.get_world_size()
        self.sums = {}
        summed = dict(zip(keys, values.cpu().tolist(), strict=True))
        return {k: v if k == "pair_id_checksum" else v / (self.accumulation * world) for k, v in summed.items()}
