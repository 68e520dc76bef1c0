"""Precomputed training inputs: the on-disk layout, its lookup tables, and rows -> `training_step` batches.

The precompute job (`ppd_ray/jobs/precompute.py`) writes, under one directory D:

    D/manifest.json                   PrecomputedManifest: shapes, row counts, file order, provenance
    D/<split>/part-*.parquet          one row per trainable pair, in a seeded random order (PAIR_COLUMNS)
    D/captions.safetensors            clip_text_hidden [N, 77, C_t], clip_text_pooled [N, 1, C_t]: once per caption
    D/captions.parquet                caption_index -> caption
    D/user_embeddings.safetensors     user_embedding [G, L, d]: once per few-shot group that conditions a pair
    D/user_embeddings.parquet         embedding_index -> group_id, user_id

Pair rows carry only the two latents and two row indices, so a pair costs ~2 x C·H·W floats on disk however long
its caption and however large its user embedding. The two tables are read through memory maps: a worker touches
only the rows its batches name, and the workers of one node share the pages.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError, safe_open

from ppd.config import TrainConfig

MANIFEST_FILE = "manifest.json"
CAPTIONS_FILE = "captions.safetensors"
CAPTIONS_INDEX = "captions.parquet"
EMBEDDINGS_FILE = "user_embeddings.safetensors"
EMBEDDINGS_INDEX = "user_embeddings.parquet"
T = TypeVar("T")
FORMAT = "ppd-precomputed"
FORMAT_VERSION = 1

# Columns of a precomputed pair row. Latents are flattened (fixed-size lists) in the manifest's `latent_dtype`:
# float32, or bfloat16 held as its raw 16 bits (uint16: parquet has no bfloat16); shapes are in the manifest.
PAIR_COLUMNS = (
    "pair_id",
    "user_id",
    "caption_index",
    "embedding_index",
    "condition_group_id",
    "order_key",
    "latents_win",
    "latents_lose",
)

# safetensors dtype names <-> how the bytes are held in numpy (bfloat16 has no numpy dtype: raw uint16 bits).
_NUMPY_STORAGE = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_TORCH_DTYPE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_NAME = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class PrecomputedError(ValueError):
    """A directory that is not (or no longer matches) a precomputed training set."""


# --- tensor tables: safetensors files read and written row by row through memory maps -----------------------------


class TensorTable:
    """Named tensors of one safetensors file sharing a leading row dimension, read row by row.

    `rows(name, indices)` copies only the requested rows (`safe_open(...).get_slice`: the file is memory-mapped, so
    a worker touches only the rows its batches name and the workers of one node share the pages). `create` writes
    such a file in place without holding it in memory.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._file = safe_open(str(self.path), framework="pt")
        except (OSError, SafetensorError) as err:
            raise PrecomputedError(f"{path}: not a readable safetensors file ({err})") from None
        self.metadata: dict[str, str] = self._file.metadata() or {}
        self._slices = {name: self._file.get_slice(name) for name in self._file.keys()}
        for name, tensor in self._slices.items():
            if tensor.get_dtype() not in _TORCH_DTYPE:
                raise PrecomputedError(f"{self.path}: tensor {name!r} has unsupported dtype {tensor.get_dtype()}")

    @property
    def names(self) -> list[str]:
        return list(self._slices)

    def shape(self, name: str) -> tuple[int, ...]:
        """Full shape of tensor `name` (rows first)."""
        return tuple(self._slices[name].get_shape())

    def rows(self, name: str, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Rows `indices` of tensor `name` as a fresh torch tensor [len(indices), ...] of the stored dtype."""
        tensor, count = self._slices[name], self.shape(name)[0]
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= count):
            raise PrecomputedError(
                f"{self.path}: row index out of range for {name!r} ({count} rows): "
                f"{indices[(indices < 0) | (indices >= count)][:5].tolist()}"
            )
        if not indices.size:
            return tensor[0:0]
        return torch.cat([tensor[int(i) : int(i) + 1] for i in indices])

    @staticmethod
    def create(
        path: str | Path,
        specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
        metadata: Mapping[str, str] | None = None,
    ) -> TensorTableWriter:
        """Lay out a safetensors file for tensors {name: (shape, dtype)} and return a writer filling it by rows."""
        return TensorTableWriter(Path(path), specs, metadata or {})


class TensorTableWriter:
    """Fills a pre-sized safetensors file row range by row range (see `TensorTable.create`).

    safetensors can only write a file from tensors held in memory; the precompute job streams tables larger than
    the driver's memory, so this writes the format's documented layout itself (an 8-byte little-endian header
    length, the JSON header, the data 8-byte aligned) and fills the data through a memory map. Reading goes through
    safetensors (`TensorTable`)."""

    def __init__(
        self, path: Path, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]], metadata: Mapping[str, str]
    ) -> None:
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset, layout = 0, []
        for name, (shape, dtype) in specs.items():
            if dtype not in _DTYPE_NAME:
                raise ValueError(f"tensor {name!r}: dtype {dtype} is not one of {list(_DTYPE_NAME)}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": _DTYPE_NAME[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            layout.append((name, tuple(shape), dtype, offset, nbytes))
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors itself writes it
        data_start = 8 + len(encoded)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as file:
            file.write(struct.pack("<Q", len(encoded)))
            file.write(encoded)
            file.truncate(data_start + offset)
        self.path = path
        self._arrays: dict[str, tuple[np.memmap | None, torch.dtype]] = {}
        for name, shape, dtype, begin, nbytes in layout:
            storage = _NUMPY_STORAGE[_DTYPE_NAME[dtype]]
            mapped = (
                np.memmap(path, dtype=storage, mode="r+", offset=data_start + begin, shape=shape) if nbytes else None
            )
            self._arrays[name] = (mapped, dtype)

    def write(self, name: str, rows: Sequence[int] | np.ndarray, values: torch.Tensor) -> None:
        """Set rows `rows` of tensor `name` to `values` [len(rows), ...] (cast to the table's dtype)."""
        mapped, dtype = self._arrays[name]
        if mapped is None:
            return
        if tuple(values.shape[1:]) != tuple(mapped.shape[1:]) or len(values) != len(rows):
            raise ValueError(
                f"{name}: {len(rows)} row indices for values {list(values.shape)}; table rows are {list(mapped.shape[1:])}"
            )
        as_bits = values.detach().to("cpu", dtype).contiguous()
        if dtype == torch.bfloat16:
            as_bits = as_bits.view(torch.int16)
        mapped[np.asarray(rows, dtype=np.int64)] = as_bits.numpy().view(mapped.dtype)

    def __enter__(self) -> TensorTableWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Flush everything to disk."""
        for mapped, _ in self._arrays.values():
            if mapped is not None:
                mapped.flush()
        self._arrays.clear()


# --- manifest and the opened directory -------------------------------------------------------------------------


class SplitFiles(BaseModel):
    """The parquet files of one split, in training order, and how many rows they hold."""

    model_config = ConfigDict(extra="forbid")

    rows: int = Field(ge=0)
    files: list[str] = Field(description="paths relative to the precomputed directory, in row order")


class PrecomputedManifest(BaseModel):
    """Contents of D/manifest.json."""

    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    architecture: str = Field(description="Stage C architecture whose latents and text encoder were used")
    text_encoder: str = Field(description="where the caption encoder came from (path, hub id, or 'tiny')")
    latent_shape: tuple[int, int, int] = Field(description="[C, H, W] of every latent")
    latent_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="how latents are stored: float32, or bfloat16 bits in uint16 lists (half the bytes)"
    )
    text_shape: tuple[int, int] = Field(description="[S, C_t] of the caption hidden states")
    pooled_dim: int
    embedding_shape: tuple[int, int] = Field(description="[L, d] of every user embedding")
    splits: dict[str, SplitFiles]
    captions: int = Field(ge=0, description="rows of the caption table")
    user_embeddings: int = Field(ge=0, description="rows of the user-embedding table")
    rejected: dict[str, dict[str, int]] = Field(description="split -> reason -> pairs left out of training")
    order_seed: int = Field(description="seed of the row order within each split")
    sources: dict[str, str] = Field(default_factory=dict, description="inputs: prepared dir, embeddings, model ids")

    @classmethod
    def read(cls, directory: str | Path) -> PrecomputedManifest:
        path = Path(directory) / MANIFEST_FILE
        if not path.is_file():
            raise PrecomputedError(f"{directory}: no {MANIFEST_FILE} (not the output of the precompute job)")
        try:
            manifest = cls.model_validate_json(path.read_text())
        except ValueError as err:
            raise PrecomputedError(f"{path}: not a {FORMAT} manifest: {err}") from None
        if manifest.format != FORMAT or manifest.format_version != FORMAT_VERSION:
            raise PrecomputedError(
                f"{path}: format {manifest.format} v{manifest.format_version}, expected {FORMAT} v{FORMAT_VERSION}"
            )
        return manifest

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        path.write_text(self.model_dump_json(indent=2))
        return path

    def split_paths(self, directory: str | Path, split: str) -> list[str]:
        """Absolute paths of a split's files in training order."""
        if split not in self.splits:
            raise PrecomputedError(f"{directory}: no precomputed split {split!r} (have {', '.join(self.splits)})")
        return [str(Path(directory).resolve() / name) for name in self.splits[split].files]


class PrecomputedInputs:
    """An opened precomputed directory: turns pair rows into the batch dict of `ppd.train.step.training_step`."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.manifest = PrecomputedManifest.read(self.directory)
        self.captions = TensorTable(self.directory / CAPTIONS_FILE)
        self.user_embeddings = TensorTable(self.directory / EMBEDDINGS_FILE)
        expected = {
            "clip_text_hidden": (self.manifest.captions, *self.manifest.text_shape),
            "clip_text_pooled": (self.manifest.captions, 1, self.manifest.pooled_dim),
        }
        for name, shape in expected.items():
            if self.captions.shape(name) != shape:
                raise PrecomputedError(f"{self.captions.path}: {name} is {self.captions.shape(name)}, manifest {shape}")
        embedding_shape = (self.manifest.user_embeddings, *self.manifest.embedding_shape)
        if self.user_embeddings.shape("user_embedding") != embedding_shape:
            raise PrecomputedError(f"{self.user_embeddings.path}: user_embedding is not {embedding_shape}")

    def caption_texts(self, count: int) -> list[str]:
        """The captions of the first `count` caption rows, as text."""
        import pandas as pd

        index = pd.read_parquet(self.directory / CAPTIONS_INDEX).sort_values("caption_index")
        return index["caption"].head(count).tolist()

    def first_users(self, count: int) -> tuple[list[int], torch.Tensor]:
        """Up to `count` users (in embedding-table order) and one stored embedding of each [U, L, d]."""
        import pandas as pd

        users = pd.read_parquet(self.directory / EMBEDDINGS_INDEX).drop_duplicates("user_id").head(count)
        embeddings = self.user_embeddings.rows("user_embedding", users["embedding_index"].to_numpy())
        return users["user_id"].astype(int).tolist(), embeddings.float()

    def batch(self, rows: pa.Table | Mapping[str, Any], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Pair rows (a pyarrow table or dict of columns) -> {latents_win, latents_lose [B, C, H, W], clip_text_hidden
        [B, S, C_t], clip_text_pooled [B, 1, C_t], user_embedding [B, L, d]}, all float32 on `device`."""
        pairs = len(rows) if isinstance(rows, pa.Table) else len(rows["pair_id"])
        latent_shape = (pairs, *self.manifest.latent_shape)
        caption_index = _column_numpy(rows, "caption_index")  # [B]
        embedding_index = _column_numpy(rows, "embedding_index")  # [B]
        batch = {
            "latents_win": _latents(rows, "latents_win", latent_shape, self.manifest.latent_dtype),
            "latents_lose": _latents(rows, "latents_lose", latent_shape, self.manifest.latent_dtype),
            "clip_text_hidden": self.captions.rows("clip_text_hidden", caption_index),
            "clip_text_pooled": self.captions.rows("clip_text_pooled", caption_index),
            "user_embedding": self.user_embeddings.rows("user_embedding", embedding_index),
        }
        return {key: value.to(device=device, dtype=torch.float32) for key, value in batch.items()}


def _column_numpy(rows: pa.Table | Mapping[str, Any], name: str) -> np.ndarray:
    column = rows.column(name) if isinstance(rows, pa.Table) else rows[name]
    if isinstance(column, pa.ChunkedArray | pa.Array):
        return column.to_numpy(zero_copy_only=False)
    return np.asarray(column)


def latent_column(latents: torch.Tensor, width: int, dtype: str) -> pa.Array:
    """Latents [K, C, H, W] (K may be 0) -> K fixed-size lists of `width` = C*H*W values in the stored `dtype`."""
    latents = latents.detach().cpu().reshape(-1)
    if dtype == "bfloat16":  # the raw bits: parquet has no bfloat16
        flat = pa.array(latents.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), pa.uint16())
    else:
        flat = pa.array(latents.float().numpy(), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, width)


def _latents(rows: pa.Table | Mapping[str, Any], name: str, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    column = rows.column(name) if isinstance(rows, pa.Table) else rows[name]
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column, pa.Array):  # (fixed-size) list<float32>: the flat child values, no per-row objects
        values = column.flatten().to_numpy(zero_copy_only=False)
    else:  # numpy: a 2-D array, or an object array of 1-D arrays (Ray Data's numpy batches)
        column = np.asarray(column)
        values = np.stack(list(column)) if column.dtype == np.dtype(object) else column
    if values.size != int(np.prod(shape)):
        raise PrecomputedError(f"{name}: {values.size} values do not make latents of shape {list(shape)}")
    if dtype == "bfloat16":
        if np.asarray(values).dtype != np.uint16:
            raise PrecomputedError(f"{name}: bfloat16 latents must be stored as uint16 bits, found {values.dtype}")
        bits = torch.from_numpy(np.asarray(values).view(np.int16).reshape(shape).copy())
        return bits.view(torch.bfloat16).float()  # [B, C, H, W]
    return torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(shape).copy())  # [B, C, H, W]


# --- schedule: micro-batches, optimiser steps, and where a resumed run picks up ------------------------------------


@dataclass(frozen=True)
class TrainingSchedule:
    """How a split's rows become optimiser steps on `world_size` workers.

    Each worker receives floor(rows / world_size) rows per epoch (Ray Data's equal split) and reads them in
    micro-batches of `micro_batch` (an incomplete last one is dropped). Micro-batches are numbered across epochs;
    optimiser step k consumes micro-batches [k·A, (k+1)·A) of every worker (A = accumulation). Because the row order
    is fixed by the precompute job, the micro-step number alone says which rows come next: a run resumed after step
    k skips exactly k·A micro-batches.
    """

    micro_batches_per_epoch: int
    accumulation: int
    total_steps: int

    @classmethod
    def from_config(cls, train: TrainConfig, rows: int) -> TrainingSchedule:
        """The schedule of `train` over a split of `rows` pairs; ValueError when it yields no optimiser step."""
        per_worker = rows // train.num_workers
        micro_batches = per_worker // train.micro_batch
        if micro_batches == 0:
            raise ValueError(
                f"{rows} training pairs give each of {train.num_workers} worker(s) {per_worker} pairs, fewer than "
                f"micro_batch={train.micro_batch}"
            )
        accumulation = train.grad_accumulation
        if train.max_steps is not None:
            total = train.max_steps
        else:
            total = int(train.epochs * micro_batches) // accumulation
            if total == 0:
                raise ValueError(
                    f"{train.epochs} epoch(s) of {micro_batches} micro-batches per worker do not fill one optimiser "
                    f"step of {accumulation} micro-batches (effective_batch={train.effective_batch})"
                )
        return cls(micro_batches, accumulation, total)

    @property
    def total_micro_steps(self) -> int:
        return self.total_steps * self.accumulation

    def position(self, micro_step: int) -> tuple[int, int]:
        """(epoch, micro-batch index within the epoch) of micro-step `micro_step` (0-based)."""
        return divmod(micro_step, self.micro_batches_per_epoch)

    def remaining_micro_batches(self, read_epoch: Callable[[], Iterable[T]], micro_step: int) -> Iterator[T]:
        """This worker's micro-batches from micro-step `micro_step` to the end of the schedule.

        `read_epoch()` yields one pass over the worker's rows in micro-batches, in the same order every time; the
        micro-batches consumed before `micro_step` (by the run this one resumes) are skipped."""
        _, skip = self.position(micro_step)
        while micro_step < self.total_micro_steps:
            for index, rows in enumerate(read_epoch()):
                if index < skip:
                    continue
                if index >= self.micro_batches_per_epoch or micro_step >= self.total_micro_steps:
                    break
                yield rows
                micro_step += 1
            skip = 0


# --- a few users' pairs (the per-reward DPO upper bounds train on one user) ---------------------------------------


def count_user_rows(paths: Sequence[str], users: Sequence[int]) -> int:
    """Pairs of `users` in the precomputed split files `paths` (reads only the user_id column)."""
    import pyarrow.parquet as pq

    user_ids = pq.read_table(list(paths), columns=["user_id"]).column("user_id").to_numpy()
    return int(np.isin(user_ids, users).sum())


def keep_users(rows: pa.Table, users: Sequence[int]) -> pa.Table:
    """The rows of `users`, in their order (row order is what makes a resumed run read the same pairs)."""
    import pyarrow.compute as pc

    return rows.filter(pc.is_in(rows.column("user_id"), pa.array(users, rows.column("user_id").type)))


# --- randomness ---------------------------------------------------------------------------------------------------


def micro_batch_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    """The generator of t, ε and user dropout for one micro-batch: a function of (seed, micro-step, rank) only.

    Neither the history of the process nor a restart changes what a given micro-batch draws, so a run resumed from
    a checkpoint continues with exactly the draws an uninterrupted run would have made.
    """
    state = np.random.SeedSequence([int(seed), int(micro_step), int(rank)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
