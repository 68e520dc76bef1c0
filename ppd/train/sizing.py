"""Real-scale sizing of PPD training on the meta device: parameters, FLOPs per DPO pair, memory per GPU, epoch time.

Nothing here holds a weight: the real Stage C is built on the meta device, one training micro-step
(`ppd.train.step.training_step` + backward) is traced there, and what it costs is read off the tracing:

- FLOPs: `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention) around the step's forward
  (policy on the 2 images of every pair + the adapter-off reference on the same 2 images) and around its backward.
- Activations: a `saved_tensors_hooks` pack hook sums the bytes autograd keeps for backward (parameters excluded,
  each storage counted once). Attention is routed to aten's flash-attention op while tracing, because the meta
  device would otherwise take the math path and save the full [B, heads, HW, HW + S] score matrix in fp32, which no
  H100 kernel does; flash attention saves q, k, v, out and a logsumexp, and its FLOPs are counted the same way.
- Memory per GPU: the ZeRO paper's accounting (frozen base replicated; adapter gradients and the Adam state
  partitioned over the data-parallel workers from stage 2 / stage 1 on) plus the measured activations.

`TrainingSizing.to_dict()` is the stable JSON of `ppd model plan --json` (all byte and FLOP counts are integers):

    preset, architecture, dtype, embedding_shape [L, d], user_tokens, latent_shape [C, H, W], text_tokens
    parameters: total, base, trainable, w_k_plus_w_v, user_projection, attention_blocks
    flops (counted at micro_batch pairs, reported per pair): micro_batch, attention_kernel, per_image_forward (base),
        adapter_per_image_forward, policy_forward_per_pair, policy_backward_per_pair, reference_forward_per_pair,
        per_pair (= the three summed)
    memory_per_gpu: zero_stage, data_parallel_workers, micro_batch, base_weights_bytes, adapter_weights_bytes,
        adapter_gradients_bytes, optimizer_state_bytes, activations_bytes, activations_checkpointed_bytes,
        total_bytes, total_checkpointed_bytes, gpu_memory_bytes, gradient_checkpointing_supported
    epoch: pairs, steps, gpus, gpu, peak_flops_per_gpu, projections [{mfu, seconds}], paper_seconds,
        paper_implied_mfu
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import chain
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from ppd.config import PPDConfig, TrainConfig
from ppd.models.adapter import PersonalizedStageC
from ppd.models.factory import build_meta_personalized_stage_c, latent_shape, parameter_report
from ppd.models.text import CLIP_MAX_LENGTH
from ppd.train.step import PairRandomness, training_step

# Pick-a-Pic v2 train has 959,040 rows; without ties and unlabelled rows about 0.8M pairs remain (the paper's one
# epoch of ~1000 steps x 768 pairs).
PICKAPIC_TRAIN_PAIRS = 800_000
# Paper: 8 x H100, local batch 16, one epoch in about 2 hours.
PAPER_EPOCH_SECONDS = 2 * 3600
MFU_LEVELS = (0.3, 0.5)
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Accelerator:
    """The GPU a plan projects onto."""

    name: str
    peak_flops: float  # dense tensor-core FLOP/s at the training precision
    memory_bytes: int


# H100 SXM: 989.4 TFLOP/s dense bf16 (1979 is the 2:4-sparse figure); 81,559 MiB as nvidia-smi reports it.
H100 = Accelerator(name="H100 SXM 80GB", peak_flops=989e12, memory_bytes=81_559 * 2**20)


@dataclass(frozen=True)
class StepMeasurement:
    """What one training micro-step of `micro_batch` pairs costs, counted on the meta device."""

    micro_batch: int
    policy_forward_flops: int  # adapter on, 2 images per pair
    reference_forward_flops: int  # adapter off (= the base model), 2 images per pair, no grad
    backward_flops: int  # through the frozen base (input gradients) + the adapter's weight gradients
    saved_activation_bytes: int  # kept by autograd for backward (parameters excluded)
    checkpointed_activation_bytes: int  # estimate with every Stage C block checkpointed (see `_SavedActivations`)

    @property
    def adapter_forward_flops(self) -> int:
        """The user branch alone: the policy forward minus the adapter-off forward of the same images."""
        return self.policy_forward_flops - self.reference_forward_flops


@dataclass(frozen=True)
class MemoryPerGpu:
    """Bytes one data-parallel worker holds at the peak of a micro-step under DeepSpeed ZeRO."""

    zero_stage: int
    data_parallel_workers: int
    micro_batch: int
    base_weights_bytes: int
    adapter_weights_bytes: int
    adapter_gradients_bytes: int
    optimizer_state_bytes: int
    activations_bytes: int
    activations_checkpointed_bytes: int
    gpu_memory_bytes: int
    # PersonalizedStageC refuses gradient checkpointing with the user branch on (the recomputation would run after
    # the user_condition context closed); the checkpointed column is what it would take once that is supported.
    gradient_checkpointing_supported: bool = False

    @property
    def static_bytes(self) -> int:
        return (
            self.base_weights_bytes
            + self.adapter_weights_bytes
            + self.adapter_gradients_bytes
            + self.optimizer_state_bytes
        )

    @property
    def total_bytes(self) -> int:
        return self.static_bytes + self.activations_bytes

    @property
    def total_checkpointed_bytes(self) -> int:
        return self.static_bytes + self.activations_checkpointed_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "total_bytes": self.total_bytes,
            "total_checkpointed_bytes": self.total_checkpointed_bytes,
        }


@dataclass(frozen=True)
class TrainingSizing:
    """Sizing of one preset's training run (see the module docstring for the JSON layout)."""

    preset: str
    architecture: str
    dtype: str
    embedding_shape: tuple[int, int]
    user_tokens: int
    latent_shape: tuple[int, int, int]
    text_tokens: int
    parameters: dict[str, int]
    step: StepMeasurement
    memory: MemoryPerGpu
    pairs: int
    effective_batch: int
    gpus: int
    accelerator: Accelerator
    mfu_levels: tuple[float, ...] = MFU_LEVELS
    per_image_forward_flops: int = field(init=False)

    def __post_init__(self) -> None:
        # The reference forward is the base model on 2 images per pair.
        object.__setattr__(
            self, "per_image_forward_flops", self.step.reference_forward_flops // (2 * self.step.micro_batch)
        )

    @property
    def flops_per_pair(self) -> int:
        """Policy forward + backward on both images of a pair, plus the reference forward on both."""
        step = self.step
        return (step.policy_forward_flops + step.backward_flops + step.reference_forward_flops) // step.micro_batch

    def epoch_seconds(self, mfu: float) -> float:
        """One pass over `pairs` on `gpus` accelerators running at `mfu` of their peak."""
        return self.pairs * self.flops_per_pair / (self.gpus * self.accelerator.peak_flops * mfu)

    @property
    def paper_implied_mfu(self) -> float:
        """The MFU at which this many FLOPs per pair take the paper's ~2 h per epoch on the same GPUs."""
        return self.pairs * self.flops_per_pair / (self.gpus * self.accelerator.peak_flops * PAPER_EPOCH_SECONDS)

    def to_dict(self) -> dict[str, Any]:
        step, pairs_per_step = self.step, self.step.micro_batch
        return {
            "preset": self.preset,
            "architecture": self.architecture,
            "dtype": self.dtype,
            "embedding_shape": list(self.embedding_shape),
            "user_tokens": self.user_tokens,
            "latent_shape": list(self.latent_shape),
            "text_tokens": self.text_tokens,
            "parameters": dict(self.parameters),
            "flops": {
                "micro_batch": step.micro_batch,
                "attention_kernel": "flash",
                "per_image_forward": self.per_image_forward_flops,
                "adapter_per_image_forward": step.adapter_forward_flops // (2 * pairs_per_step),
                "policy_forward_per_pair": step.policy_forward_flops // pairs_per_step,
                "policy_backward_per_pair": step.backward_flops // pairs_per_step,
                "reference_forward_per_pair": step.reference_forward_flops // pairs_per_step,
                "per_pair": self.flops_per_pair,
            },
            "memory_per_gpu": self.memory.to_dict(),
            "epoch": {
                "pairs": self.pairs,
                "steps": math.ceil(self.pairs / self.effective_batch),
                "gpus": self.gpus,
                "gpu": self.accelerator.name,
                "peak_flops_per_gpu": self.accelerator.peak_flops,
                "projections": [{"mfu": mfu, "seconds": round(self.epoch_seconds(mfu), 1)} for mfu in self.mfu_levels],
                "paper_seconds": PAPER_EPOCH_SECONDS,
                "paper_implied_mfu": round(self.paper_implied_mfu, 4),
            },
        }


# --- tracing on the meta device ---------------------------------------------------------------------------------


class _FlashAttentionOnMeta(TorchFunctionMode):
    """Routes `F.scaled_dot_product_attention` to aten's flash-attention op, the kernel an H100 runs in bf16.

    On the meta device SDPA falls back to its math decomposition, which materialises (and saves for backward) the
    score matrix; the flash op has meta kernels and autograd formulas, so both its FLOPs and what it saves for
    backward (q, k, v, out, logsumexp) are what the GPU would see.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and _flash_compatible(*args[3:], **kwargs):
            query, key, value = args[:3]  # [B, heads, tokens, head_dim]
            return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, scale=kwargs.get("scale"))[0]
        return func(*args, **kwargs)


def _flash_compatible(
    attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False, **rest: Any
) -> bool:
    return attn_mask is None and dropout_p == 0.0 and not is_causal and not rest.get("enable_gqa", False)


class _SavedActivations:
    """Bytes autograd saves for backward during a forward, attributed to the Stage C block that saved them.

    The gradient-checkpointing estimate follows diffusers' StableCascadeUNet, which checkpoints every block of
    `down_blocks` / `up_blocks` separately: what stays is everything saved outside those blocks, the blocks'
    inputs (what `checkpoint` keeps), and, during backward, the internals of one block being recomputed (the
    largest of them).
    """

    def __init__(self, model: PersonalizedStageC) -> None:
        self._weights = {id(tensor) for tensor in chain(model.parameters(), model.buffers())}
        self._saved: dict[int, torch.Tensor] = {}  # held, so that ids stay unique while recording
        self._block_inputs: dict[int, torch.Tensor] = {}
        self._block_saved: dict[str, int] = defaultdict(int)
        self._current_block: str | None = None
        self._blocks = [
            (f"{side}.{level}.{index}", block)
            for side, levels in (("down", model.base.down_blocks), ("up", model.base.up_blocks))
            for level, blocks in enumerate(levels)
            for index, block in enumerate(blocks)
        ]

    @property
    def saved_bytes(self) -> int:
        return sum(_storage_bytes(tensor) for tensor in self._saved.values())

    @property
    def checkpointed_bytes(self) -> int:
        outside_blocks = self.saved_bytes - sum(self._block_saved.values())
        block_inputs = sum(_storage_bytes(tensor) for tensor in self._block_inputs.values())
        return outside_blocks + block_inputs + max(self._block_saved.values(), default=0)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        owner = tensor._base if tensor._base is not None else tensor
        if id(owner) not in self._weights and id(owner) not in self._saved:
            self._saved[id(owner)] = owner
            if self._current_block is not None:
                self._block_saved[self._current_block] += _storage_bytes(owner)
        return tensor

    @contextmanager
    def recording(self) -> Iterator[None]:
        handles = []
        for name, block in self._blocks:
            handles.append(block.register_forward_pre_hook(self._entering(name)))
            handles.append(block.register_forward_hook(self._leaving))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def _entering(self, name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            if not torch.is_grad_enabled():  # the reference forward saves nothing
                return
            self._current_block = name
            for value in args:
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    self._block_inputs.setdefault(id(value), value)

        return hook

    def _leaving(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self._current_block = None


def _storage_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def meta_training_batch(
    model: PersonalizedStageC, micro_batch: int, latent: tuple[int, int, int], text_tokens: int
) -> tuple[dict[str, torch.Tensor], PairRandomness]:
    """A micro-batch of `micro_batch` pairs and their randomness, on the meta device, shaped as training sees it."""
    config = model.base.config
    dtype = model.base.dtype
    with torch.device("meta"):
        batch = {
            "latents_win": torch.empty(micro_batch, *latent, dtype=dtype),  # [B, C, H, W]
            "latents_lose": torch.empty(micro_batch, *latent, dtype=dtype),
            "clip_text_hidden": torch.empty(micro_batch, text_tokens, config.clip_text_in_channels, dtype=dtype),
            "clip_text_pooled": torch.empty(micro_batch, 1, config.clip_text_pooled_in_channels, dtype=dtype),
            "user_embedding": torch.empty(
                micro_batch, model.adapter.config.embedding_layers, model.adapter.config.embedding_dim
            ),  # [B, L, d] float32, as stored
        }
        randomness = PairRandomness(
            timestep_ratio=torch.empty(micro_batch),
            noise=torch.empty(micro_batch, *latent),
            keep_user=torch.ones(micro_batch, dtype=torch.bool),
        )
    return batch, randomness


def measure_training_step(
    model: PersonalizedStageC,
    train: TrainConfig,
    latent: tuple[int, int, int],
    text_tokens: int = CLIP_MAX_LENGTH,
    micro_batch: int | None = None,
) -> StepMeasurement:
    """Trace one training micro-step of `model` (on the meta device) and count its FLOPs and saved activations."""
    if train.method == "sft":
        raise ValueError("sizing counts a DPO pair (policy and reference on 2 images); method 'sft' has no reference")
    micro_batch = micro_batch or train.micro_batch
    model.train()
    batch, randomness = meta_training_batch(model, micro_batch, latent, text_tokens)
    saved = _SavedActivations(model)
    with _FlashAttentionOnMeta():
        with FlopCounterMode(display=False) as forward_counter, saved.recording():
            step = training_step(model, batch, train, randomness=randomness)
        with FlopCounterMode(display=False) as backward_counter:
            step.loss.backward()
        # The reference alone (adapter off, no grad), to split the step's forward into policy and reference.
        with FlopCounterMode(display=False) as reference_counter, torch.no_grad():
            model(
                batch["latents_win"].repeat(2, 1, 1, 1),  # [2B, C, H, W]
                randomness.timestep_ratio.repeat(2),
                batch["clip_text_pooled"].repeat(2, 1, 1),
                batch["clip_text_hidden"].repeat(2, 1, 1),
            )
    reference = reference_counter.get_total_flops()
    return StepMeasurement(
        micro_batch=micro_batch,
        policy_forward_flops=forward_counter.get_total_flops() - reference,
        reference_forward_flops=reference,
        backward_flops=backward_counter.get_total_flops(),
        saved_activation_bytes=saved.saved_bytes,
        checkpointed_activation_bytes=saved.checkpointed_bytes,
    )


# --- memory and the plan -----------------------------------------------------------------------------------------


def zero_memory_per_gpu(
    base_parameters: int,
    trainable_parameters: int,
    dtype: str,
    zero_stage: int,
    workers: int,
    step: StepMeasurement,
    accelerator: Accelerator = H100,
) -> MemoryPerGpu:
    """Weights, gradients and optimiser state per worker under ZeRO (the ZeRO paper's accounting) + activations.

    Weights and gradients are held in `dtype`; AdamW keeps m and v in fp32, plus an fp32 master copy when the
    weights are bf16 (K = 12 bytes per parameter; 8 without the master copy). Stage >= 1 partitions the optimiser
    state over the workers, stage >= 2 the gradients, stage 3 the weights too (the frozen base included).
    """
    weight_bytes = _DTYPE_BYTES[dtype]
    optimizer_bytes_per_param = 12 if weight_bytes < 4 else 8
    weights_share = workers if zero_stage == 3 else 1
    gradients_share = workers if zero_stage >= 2 else 1
    return MemoryPerGpu(
        zero_stage=zero_stage,
        data_parallel_workers=workers,
        micro_batch=step.micro_batch,
        base_weights_bytes=base_parameters * weight_bytes // weights_share,
        adapter_weights_bytes=trainable_parameters * weight_bytes // weights_share,
        adapter_gradients_bytes=trainable_parameters * weight_bytes // gradients_share,
        optimizer_state_bytes=trainable_parameters * optimizer_bytes_per_param // workers,
        activations_bytes=step.saved_activation_bytes,
        activations_checkpointed_bytes=step.checkpointed_activation_bytes,
        gpu_memory_bytes=accelerator.memory_bytes,
    )


def size_training(
    cfg: PPDConfig,
    embedding_shape: tuple[int, int],
    pairs: int = PICKAPIC_TRAIN_PAIRS,
    accelerator: Accelerator = H100,
) -> TrainingSizing:
    """Size `cfg`'s training run: build the real architecture on the meta device and trace one micro-step."""
    model = build_meta_personalized_stage_c(cfg.model.architecture, embedding_shape, cfg.model.user_tokens)
    model = model.to(_TORCH_DTYPES[cfg.model.dtype])
    parameters = parameter_report(model)
    latent = latent_shape(cfg.model)
    text_tokens = CLIP_MAX_LENGTH
    step = measure_training_step(model, cfg.train, latent, text_tokens)
    memory = zero_memory_per_gpu(
        parameters["base"],
        parameters["trainable"],
        cfg.model.dtype,
        cfg.train.zero_stage,
        cfg.train.num_workers,
        step,
        accelerator,
    )
    keys = ("total", "base", "trainable", "w_k_plus_w_v", "user_projection", "attention_blocks")
    return TrainingSizing(
        preset=cfg.preset,
        architecture=cfg.model.architecture,
        dtype=cfg.model.dtype,
        embedding_shape=embedding_shape,
        user_tokens=cfg.model.user_tokens,
        latent_shape=latent,
        text_tokens=text_tokens,
        parameters={key: parameters[key] for key in keys},
        step=step,
        memory=memory,
        pairs=pairs,
        effective_batch=cfg.train.effective_batch,
        gpus=cfg.train.num_workers,  # one GPU per training worker
        accelerator=accelerator,
    )
