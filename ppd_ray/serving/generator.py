"""Generator deployment: Stage C + the trained user adapter, batching requests of different users per sampler call.

Each request (`GenerationJob`) brings its own caption, seeds, user scale and user: one embedding, a weighted mix
of embeddings, or none (the base model: its rows get s = 0, which is exactly the base). `@serve.batch` gathers
concurrent requests; rows with the same (steps, guidance) go through one call of the evaluation's generator
(`ppd.eval.generate.VariantGenerator`: the one generation path of evaluation, training grids and serving) with
per-row users, scales and seeds, so a row's image does not depend on the batch it landed in (up to float
round-off). The adapter is read from safetensors only (`ppd.models.checkpoint`).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ray import serve

from ppd.config import PPDConfig
from ppd.data.images import png_bytes
from ppd.eval.generate import VariantGenerator
from ppd.models.checkpoint import AdapterCheckpointMeta, read_adapter_checkpoint
from ppd.sample import mix_user_embeddings

CAPTION_CACHE_SIZE = 4096


class AdapterMissing(FileNotFoundError):
    """The configured adapter directory does not exist: the server cannot start."""


@dataclass(frozen=True)
class GenerationJob:
    """One HTTP request's images: users is None (base), one embedding [L, d], or K embeddings mixed by weights."""

    caption: str
    seeds: list[int]
    steps: int
    guidance: float
    user_scale: float
    users: list[np.ndarray] | None = None  # K x [L, d]
    weights: list[float] | None = None  # [K]; None = the single user of `users`


def resolve_adapter(cfg: PPDConfig) -> tuple[Path, AdapterCheckpointMeta]:
    """The absolute adapter directory and its validated metadata, or AdapterMissing with what to do."""
    directory = Path(cfg.serve.adapter_dir).expanduser().resolve()
    if not directory.exists():
        raise AdapterMissing(
            f"no adapter at {directory}: run `ppd demo` first (it writes runs/demo/runs/ppd_population/adapter) "
            "or pass serve.adapter_dir=<an adapter checkpoint directory>"
        )
    meta, _ = read_adapter_checkpoint(directory)
    if meta.train_method == "dpo":
        raise ValueError(f"{directory}: a dpo adapter reads no user embedding; serve a ppd or sft adapter")
    return directory, meta


def served_config(cfg: PPDConfig, meta: AdapterCheckpointMeta) -> PPDConfig:
    """`cfg` with the Stage C the adapter was trained on (its recorded base) when the config names none."""
    if cfg.model.stage_c_path is None and meta.base_model != "tiny":
        return cfg.model_copy(update={"model": cfg.model.model_copy(update={"stage_c_path": meta.base_model})})
    return cfg


class ImageGenerator:
    """Loads base + adapter + text encoder + decoder once; `generate(job)` returns the job's PNGs."""

    def __init__(self, config: dict) -> None:
        cfg = PPDConfig.from_dict(config)
        adapter_dir, meta = resolve_adapter(cfg)
        self.variant = VariantGenerator(
            served_config(cfg, meta), adapter_dir, caption_cache_size=CAPTION_CACHE_SIZE
        )  # safetensors only
        self.embedding_shape = list(meta.embedding_shape)
        self.adapter_info = {"dir": str(adapter_dir), "train_method": meta.train_method, **meta.extra}
        self._set_batching(cfg.serve.max_batch_size, cfg.serve.batch_wait_timeout_s)
        self.sampler_calls = 0
        self.batch_sizes: Counter[int] = Counter()  # requests per batch -> batches
        self._lock = threading.Lock()

    def reconfigure(self, user_config: dict) -> None:
        """Serve's live reconfiguration (`user_config`): batch size and wait, without reloading the model."""
        self._set_batching(int(user_config["max_batch_size"]), float(user_config["batch_wait_timeout_s"]))

    def _set_batching(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.generate.set_max_batch_size(max_batch_size)
        self.generate.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def info(self) -> dict:
        """The [L, d] the adapter reads and where it came from."""
        return {"embedding_shape": self.embedding_shape, "adapter": self.adapter_info}

    def stats(self) -> dict:
        """Counters: sampler calls and the batch-size histogram (requests per batch) of this replica."""
        return {"sampler_calls": self.sampler_calls, "batch_sizes": dict(sorted(self.batch_sizes.items()))}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)  # replaced from the config in __init__/reconfigure
    async def generate(self, jobs: list[GenerationJob]) -> list[list[bytes]]:
        """PNG bytes per job; the sampling runs off the event loop so health checks answer meanwhile."""
        return await asyncio.to_thread(self._generate_jobs, jobs)

    def _generate_jobs(self, jobs: list[GenerationJob]) -> list[list[bytes]]:
        with self._lock:
            self.batch_sizes[len(jobs)] += 1
            images: dict[int, list[bytes]] = {}
            by_settings: dict[tuple[int, float], list[int]] = {}
            for index, job in enumerate(jobs):
                by_settings.setdefault((job.steps, job.guidance), []).append(index)
            for (steps, guidance), indices in by_settings.items():
                pngs = iter(self._sample([jobs[i] for i in indices], steps, guidance))  # rows in job order
                for index in indices:
                    images[index] = [next(pngs) for _ in jobs[index].seeds]
            return [images[i] for i in range(len(jobs))]

    def _sample(self, jobs: list[GenerationJob], steps: int, guidance: float) -> list[bytes]:
        captions = [job.caption for job in jobs for _ in job.seeds]
        seeds = [seed for job in jobs for seed in job.seeds]
        # Every row gets a user; the rows of a job without one get zeros at s = 0, which is exactly the base model.
        users = torch.stack([self._user_embedding(job) for job in jobs for _ in job.seeds])  # [B, L, d]
        scales = torch.tensor([0.0 if job.users is None else job.user_scale for job in jobs for _ in job.seeds])  # [B]
        images = self.variant.generate(captions, seeds, users, scales, steps=steps, guidance=guidance)  # [B, H, W, 3]
        self.sampler_calls += 1
        return [png_bytes(image) for image in images]

    def _user_embedding(self, job: GenerationJob) -> torch.Tensor:
        if job.users is None:
            return torch.zeros(self.embedding_shape)  # read at s = 0 only
        embeddings = torch.as_tensor(np.stack(job.users), dtype=torch.float32)  # [K, L, d]
        if job.weights is None:
            return embeddings[0]
        return mix_user_embeddings(embeddings, job.weights)  # [L, d]


GeneratorDeployment = serve.deployment(name="Generator")(ImageGenerator)
