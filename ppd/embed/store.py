"""Embedding rows on disk: one parquet part file per embedded batch, written atomically, read back as [L, d] arrays.

Layout of an output folder: `part-<identity key>-<first group id>-<hash of the batch's group ids>.parquet`, one
row per (user_id, group_id):

    user_id int64, group_id int64, pair_ids list<int64>, profile str, generated_text str,
    embedding list<float32>  (the [L, d] array flattened row-major; null on an error row),
    embedding_shape list<int32> ([L, d]; empty on an error row), layers list<int32>,
    model_id str, prompt_hash str, settings str (JSON), error str (null unless the group failed)

A flat list<float32> plus its shape is used instead of a fixed-shape tensor column so that one folder can hold
embeddings of different shapes (pairdiff [N, d] beside a VLM's [L, d]) and any parquet reader can open it.
Parts are written to a temporary name and renamed, so a killed job leaves only whole parts behind: a re-run skips the
groups those parts hold for the same identity (`done_group_ids`), which makes the job resumable. Error rows count as
done: an undecodable image does not become decodable on a second try.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ppd.embed.base import EmbeddingIdentity, EmbeddingRow
from ppd.errors import InputDataError

ROW_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("group_id", pa.int64()),
        ("pair_ids", pa.list_(pa.int64())),
        ("profile", pa.string()),
        ("generated_text", pa.string()),
        ("embedding", pa.list_(pa.float32())),
        ("embedding_shape", pa.list_(pa.int32())),
        ("layers", pa.list_(pa.int32())),
        ("model_id", pa.string()),
        ("prompt_hash", pa.string()),
        ("settings", pa.string()),
        ("error", pa.string()),
    ]
)
_IDENTITY_COLUMNS = ["group_id", "model_id", "prompt_hash", "layers", "settings"]


def rows_to_table(rows: Sequence[EmbeddingRow]) -> pa.Table:
    """EmbeddingRows -> a table with ROW_SCHEMA."""
    columns = {name: [] for name in ROW_SCHEMA.names}
    for row in rows:
        columns["user_id"].append(row.user_id)
        columns["group_id"].append(row.group_id)
        columns["pair_ids"].append(list(row.pair_ids))
        columns["profile"].append(row.profile)
        columns["generated_text"].append(row.generated_text)
        columns["embedding"].append(None if row.embedding is None else row.embedding.reshape(-1))
        columns["embedding_shape"].append([] if row.embedding is None else list(row.embedding.shape))
        columns["layers"].append(list(row.layers))
        columns["model_id"].append(row.model_id)
        columns["prompt_hash"].append(row.prompt_hash)
        columns["settings"].append(row.settings)
        columns["error"].append(row.error)
    return pa.table(columns, schema=ROW_SCHEMA)


def write_part(rows: Sequence[EmbeddingRow], out_dir: str | Path, identity: EmbeddingIdentity) -> Path:
    """Write one batch of rows as a part file (temporary name, then rename); returns its path."""
    group_ids = sorted(row.group_id for row in rows)
    batch_hash = hashlib.sha256(json.dumps(group_ids).encode()).hexdigest()[:8]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"part-{identity.key}-{group_ids[0]:09d}-{batch_hash}.parquet"
    scratch = out_dir / f".{target.name}.{os.getpid()}.tmp"
    pq.write_table(rows_to_table(rows), scratch)
    os.replace(scratch, target)
    return target


def part_files(out_dir: str | Path) -> list[Path]:
    """The finished part files of an output folder (temporary files of a killed writer are ignored)."""
    return sorted(Path(out_dir).glob("part-*.parquet")) if Path(out_dir).is_dir() else []


def _matches(table: pa.Table, identity: EmbeddingIdentity) -> pa.Table:
    same = pc.and_(
        pc.and_(pc.equal(table["model_id"], identity.model_id), pc.equal(table["prompt_hash"], identity.prompt_hash)),
        pc.equal(table["settings"], identity.settings_json),
    )
    table = table.filter(same)
    layers = table["layers"].to_pylist()
    return table.filter(pa.array([list(value) == list(identity.layers) for value in layers], pa.bool_()))


def done_group_ids(out_dir: str | Path, identity: EmbeddingIdentity) -> set[int]:
    """Group ids already embedded (or failed) in `out_dir` with exactly this identity."""
    files = part_files(out_dir)
    if not files:
        return set()
    table = pq.read_table(files, columns=_IDENTITY_COLUMNS, schema=ROW_SCHEMA)
    return set(_matches(table, identity)["group_id"].to_pylist())


def read_rows(out_dir: str | Path, identity: EmbeddingIdentity | None = None) -> pa.Table:
    """Every stored row (error rows included), optionally only those of one identity."""
    files = part_files(out_dir)
    if not files:
        raise FileNotFoundError(f"no embedding part files (part-*.parquet) under {out_dir}")
    table = pq.read_table(files, schema=ROW_SCHEMA)
    return table if identity is None else _matches(table, identity)


_CATALOG_COLUMNS = ["user_id", "group_id", "embedding_shape", "model_id", "prompt_hash", "settings", "layers", "error"]


def _successful(table: pa.Table, model_id: str | None, prompt_hash: str | None) -> pa.Table:
    if model_id is not None:
        table = table.filter(pc.equal(table["model_id"], model_id))
    if prompt_hash is not None:
        table = table.filter(pc.equal(table["prompt_hash"], prompt_hash))
    return table.filter(pc.is_null(table["error"]))


def _check_one_kind(table: pa.Table, out_dir: str | Path) -> None:
    columns = [table[c].to_pylist() for c in ("model_id", "prompt_hash", "settings", "layers")]
    runs = {(m, p, s, tuple(layers)) for m, p, s, layers in zip(*columns, strict=True)}
    if len(runs) > 1:
        listed = "; ".join(f"model_id={m} prompt_hash={p} layers={list(la)}" for m, p, _, la in sorted(runs))
        raise ValueError(
            f"{out_dir} mixes {len(runs)} kinds of embeddings ({listed}): choose one with model_id/prompt_hash"
        )


def read_embedding_catalog(
    out_dir: str | Path, model_id: str | None = None, prompt_hash: str | None = None
) -> dict[tuple[int, int], tuple[int, ...]]:
    """{(user_id, group_id): [L, d] shape} of the successful rows, read without the embeddings themselves.

    What a join needs to plan (which groups exist, for which user, of which shape) at a few bytes per group; the
    vectors are then streamed with `iter_embeddings`. Same checks as `read_embeddings` (one kind, no duplicates).
    """
    files = part_files(out_dir)
    if not files:
        raise FileNotFoundError(f"no embedding part files (part-*.parquet) under {out_dir}")
    table = _successful(pq.read_table(files, columns=_CATALOG_COLUMNS, schema=ROW_SCHEMA), model_id, prompt_hash)
    _check_one_kind(table, out_dir)
    catalog: dict[tuple[int, int], tuple[int, ...]] = {}
    for user_id, group_id, shape in zip(
        table["user_id"].to_pylist(), table["group_id"].to_pylist(), table["embedding_shape"].to_pylist(), strict=True
    ):
        key = (int(user_id), int(group_id))
        if key in catalog:
            raise ValueError(f"{out_dir}: group {group_id} of user {user_id} is stored twice")
        catalog[key] = tuple(int(side) for side in shape)
    return catalog


def load_embedding_catalog(path: str | Path) -> dict[tuple[int, int], tuple[int, ...]]:
    """`read_embedding_catalog` of a folder a user named: missing, unreadable or holding no successful embedding is
    an `InputDataError` that says which and what to run."""
    if not Path(path).exists():
        raise InputDataError(f"embeddings {path} do not exist (run `ppd embed` first)")
    try:
        catalog = read_embedding_catalog(path)
    except (FileNotFoundError, ValueError, pa.ArrowInvalid) as err:
        raise InputDataError(f"embeddings {path}: {err}") from None
    if not catalog:
        raise InputDataError(f"embeddings {path} hold no successful embedding (every row is an error row)")
    return catalog


def iter_embeddings(
    out_dir: str | Path,
    keys: Collection[tuple[int, int]],
    model_id: str | None = None,
    prompt_hash: str | None = None,
) -> Iterator[tuple[list[tuple[int, int]], np.ndarray]]:
    """Stream the embeddings of `keys` ((user_id, group_id) pairs), one part file at a time: (keys, float32 [n, L, d]).

    Memory stays at one part file (one embedding batch) however large the folder: the driver of a join never holds
    every embedding. Keys absent from the folder are simply not yielded (the caller counts what it received)."""
    wanted = set(keys)
    for path in part_files(out_dir):
        table = _successful(pq.read_table(path, schema=ROW_SCHEMA), model_id, prompt_hash)
        found = [
            (index, (int(u), int(g)))
            for index, (u, g) in enumerate(
                zip(table["user_id"].to_pylist(), table["group_id"].to_pylist(), strict=True)
            )
            if (int(u), int(g)) in wanted
        ]
        if not found:
            continue
        table = table.take(pa.array([index for index, _ in found], pa.int64()))
        vectors = _arrays(table)
        yield [key for _, key in found], np.stack(vectors)  # [n, L, d]


def _arrays(table: pa.Table) -> list[np.ndarray]:
    flat = table["embedding"].combine_chunks()  # ListArray: offsets index into one float32 buffer
    values, offsets = flat.values.to_numpy(), flat.offsets.to_numpy()
    shapes = table["embedding_shape"].to_pylist()
    return [values[offsets[i] : offsets[i + 1]].reshape(shapes[i]).copy() for i in range(len(table))]  # [L, d] each


def read_embeddings(
    out_dir: str | Path, model_id: str | None = None, prompt_hash: str | None = None
) -> dict[tuple[int, int], np.ndarray]:
    """{(user_id, group_id): float32 [L, d]} of the successful rows; error rows are left out.

    A folder holding several kinds of embeddings (models, prompts, layers or settings) must be narrowed with
    `model_id` / `prompt_hash`, else this raises: mixing them would compare incomparable vectors. Everything is held
    in memory: a large folder is better planned with `read_embedding_catalog` and streamed with `iter_embeddings`.
    """
    table = _successful(read_rows(out_dir), model_id, prompt_hash)
    _check_one_kind(table, out_dir)
    embeddings: dict[tuple[int, int], np.ndarray] = {}
    keys = zip(table["user_id"].to_pylist(), table["group_id"].to_pylist(), strict=True)
    for (user_id, group_id), vector in zip(keys, _arrays(table), strict=True):
        key = (int(user_id), int(group_id))
        if key in embeddings:
            raise ValueError(f"{out_dir}: group {group_id} of user {user_id} is stored twice")
        embeddings[key] = vector  # [L, d]
    return embeddings
