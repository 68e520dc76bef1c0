"""Ray job: prepared pairs + user embeddings -> precomputed training inputs (latents, caption and embedding tables).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m ppd_ray.jobs.precompute --prepared /abs/prepared/population --embeddings /abs/embeddings \
        --out /abs/precomputed/population

The join (pair -> caption row, pair -> embedding of its condition group) is planned on the driver from small tables:
the pairs' metadata (no images) and the embeddings' catalog (keys and shapes, no vectors); the vectors are then
streamed part file by part file into a memory-mapped table, so the driver never holds them all (29 x 3584 floats per
group for the 7B). Captions are encoded once each by a Ray Data actor pool (a GPU each on a cluster) and streamed into
a memory-mapped caption table; images stream through a second actor pool that decodes and encodes them (EfficientNet
on real models), then the rows, latents in the model's dtype (bf16 on a cluster), are sorted by their seeded order key
and written as parquet. Training reads only these outputs (`ppd.train.data`).
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ppd.config import ModelConfig, PPDConfig
from ppd.data.prepare import SPLITS
from ppd.embed.store import load_embedding_catalog
from ppd.models.factory import latent_shape, resolved_model_config
from ppd.train.data import (
    CAPTIONS_FILE,
    CAPTIONS_INDEX,
    EMBEDDINGS_FILE,
    EMBEDDINGS_INDEX,
    MANIFEST_FILE,
    PrecomputedManifest,
    SplitFiles,
    TensorTable,
    latent_column,
)
from ppd.train.precompute import (
    caption_index,
    encode_pairs,
    join_training_rows,
    load_latent_encoder,
    read_pair_metadata,
)
from ppd_ray.console import JobError
from ppd_ray.jobs.common import config_from_args, init_ray, job_arg_parser, run_job

logger = logging.getLogger(__name__)

DEFAULT_SPLITS = ("train",)  # what training reads; add validation etc. for held-out losses
_IMAGE_COLUMNS = ["pair_id", "jpg_0", "jpg_1", "preferred"]


class CaptionStage:
    """Ray Data stage: captions -> clip_text_hidden [B, S, C_t], clip_text_pooled [B, 1, C_t] (encoder loaded once)."""

    def __init__(self, model: dict[str, Any]) -> None:
        from ppd.models.factory import load_caption_encoder

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder = load_caption_encoder(ModelConfig.model_validate(model), device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        hidden, pooled = self.encoder.encode_captions([str(c) for c in batch["caption"]])
        return {
            "caption_index": batch["caption_index"],
            "clip_text_hidden": hidden.cpu().numpy(),  # [B, S, C_t]
            "clip_text_pooled": pooled.cpu().numpy(),  # [B, 1, C_t]
        }


class LatentStage:
    """Ray Data stage: prepared rows with image bytes -> precomputed pair rows (encoder loaded once per actor)."""

    def __init__(self, model: dict[str, Any], rows_ref: Any) -> None:
        import ray  # workers only

        model_cfg = ModelConfig.model_validate(model)
        self.encoder = load_latent_encoder(model_cfg)  # on this actor's GPU when it has one
        self.latent_shape = latent_shape(model_cfg)  # [C, H, W] Stage C reads
        self.latent_dtype = model_cfg.dtype  # bf16 models: bf16 latents (half the bytes through the sort and on disk)
        rows: pa.Table = ray.get(rows_ref)
        self.rows = rows.to_pandas().set_index("pair_id")

    def __call__(self, batch: pa.Table) -> pa.Table:
        # Pairs the join left out (no condition group, no embedding) are dropped before any image is decoded.
        planned = batch.filter(pc.is_in(batch.column("pair_id"), pa.array(self.rows.index.to_numpy())))
        pair_ids = planned.column("pair_id").to_numpy()
        latents = encode_pairs(
            planned.column("jpg_0").to_pylist(),
            planned.column("jpg_1").to_pylist(),
            planned.column("preferred").to_numpy(),
            self.encoder,
        )
        kept_ids = pair_ids[latents.kept]
        if len(kept_ids) and tuple(latents.latents_win.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"encoded latents {list(latents.latents_win.shape[1:])}, Stage C reads {self.latent_shape}"
            )
        rows = self.rows.loc[kept_ids]
        width = int(np.prod(self.latent_shape))
        columns = {
            "pair_id": pa.array(kept_ids, pa.int64()),
            **{name: pa.array(rows[name].to_numpy(), pa.int64()) for name in _PLAN_INT_COLUMNS},
            "latents_win": latent_column(latents.latents_win, width, self.latent_dtype),
            "latents_lose": latent_column(latents.latents_lose, width, self.latent_dtype),
        }
        return pa.table(columns)


_PLAN_INT_COLUMNS = ("user_id", "caption_index", "embedding_index", "condition_group_id", "order_key")


def run(
    cfg: PPDConfig, prepared: Path, embeddings_path: Path, out: Path, splits: tuple[str, ...] = DEFAULT_SPLITS
) -> PrecomputedManifest:
    """Precompute `splits` of `prepared` into `out`; returns the manifest (also written to out/manifest.json)."""
    import ray

    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise JobError(f"unknown split(s) {unknown}; choose from {', '.join(SPLITS)}")
    if not prepared.is_dir():
        raise JobError(f"prepared data {prepared} does not exist (run `ppd prepare` first)")
    model = resolved_model_config(cfg.model)
    try:
        # Fails fast, on the driver (on CPU: it only checks that the weights exist and fit; the actors use GPUs).
        load_latent_encoder(model, device="cpu")
    except (FileNotFoundError, ValueError) as err:
        raise JobError(str(err)) from None
    pairs = read_pair_metadata(prepared, splits)
    catalog = load_embedding_catalog(embeddings_path)  # keys and shapes only: the vectors are streamed below
    captions = caption_index(pairs["caption"])
    try:
        joined, embedding_index, skipped = join_training_rows(pairs, catalog, captions, cfg.data.seed)
    except ValueError as err:
        raise JobError(str(err)) from None
    present = tuple(s for s in splits if s in set(pairs["split"]))
    for split in present:
        left_out = ", ".join(f"{k} {v}" for k, v in skipped[split].items() if v) or "none"
        logger.info(f"{split}: {int((joined['split'] == split).sum())} trainable pairs (left out: {left_out})")
    if not (joined["split"] == "train").any():
        raise JobError(
            f"no trainable train pair: {skipped['train']} (do the embeddings in {embeddings_path} belong to {prepared}?)"
        )

    # The manifest goes first: a run that fails half way must not leave an old manifest over new tables.
    for name in (MANIFEST_FILE, *SPLITS, CAPTIONS_FILE, CAPTIONS_INDEX, EMBEDDINGS_FILE, EMBEDDINGS_INDEX):
        target = out / name
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    init_ray()
    encoder_actors = {
        "compute": ray.data.ActorPoolStrategy(size=cfg.train.precompute_concurrency),
        "num_gpus": cfg.train.precompute_gpus_per_actor or None,
        "batch_size": cfg.train.precompute_batch_size,
    }
    text_shape, pooled_dim = _write_caption_table(captions, model, out, encoder_actors)
    _write_embedding_table(embedding_index, embeddings_path, out)
    rows_ref = ray.put(pa.Table.from_pandas(joined.drop(columns="split"), preserve_index=False))
    split_files = {}
    for split in present:
        own = joined[joined["split"] == split]
        if own.empty:
            continue
        split_files[split] = _write_split(prepared, split, out, model, rows_ref, encoder_actors)
        skipped[split]["undecodable_image"] = len(own) - split_files[split].rows
        logger.info(f"{split}: wrote {split_files[split].rows} pairs in {len(split_files[split].files)} file(s)")
    manifest = PrecomputedManifest(
        architecture=model.architecture,
        text_encoder=model.stage_c_path or "tiny",
        latent_shape=latent_shape(model),
        latent_dtype=model.dtype,
        text_shape=text_shape,
        pooled_dim=pooled_dim,
        embedding_shape=embedding_index.embedding_shape,
        splits=split_files,
        captions=len(captions),
        user_embeddings=len(embedding_index.table),
        rejected={split: skipped[split] for split in present},
        order_seed=cfg.data.seed,
        sources={"prepared": str(prepared.resolve()), "embeddings": str(embeddings_path.resolve())},
    )
    manifest.write(out)
    return manifest


def _write_caption_table(
    captions: dict[str, int], model: ModelConfig, out: Path, actors: dict[str, Any]
) -> tuple[tuple[int, int], int]:
    import ray

    logger.info(f"encoding {len(captions)} distinct captions")
    table = pd.DataFrame({"caption_index": list(captions.values()), "caption": list(captions.keys())})
    table.to_parquet(out / CAPTIONS_INDEX, index=False)
    encoded = ray.data.from_pandas(table).map_batches(
        CaptionStage, fn_constructor_kwargs={"model": model.model_dump()}, batch_format="numpy", **actors
    )
    writer = None
    dtype = torch.bfloat16 if model.dtype == "bfloat16" else torch.float32
    for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
        hidden = torch.from_numpy(np.asarray(batch["clip_text_hidden"]))  # [B, S, C_t]
        pooled = torch.from_numpy(np.asarray(batch["clip_text_pooled"]))  # [B, 1, C_t]
        if writer is None:  # shapes are known once the encoder has run
            text_shape, pooled_dim = tuple(hidden.shape[1:]), pooled.shape[-1]
            writer = TensorTable.create(
                out / CAPTIONS_FILE,
                {
                    "clip_text_hidden": ((len(captions), *text_shape), dtype),
                    "clip_text_pooled": ((len(captions), 1, pooled_dim), dtype),
                },
            )
        writer.write("clip_text_hidden", batch["caption_index"], hidden)
        writer.write("clip_text_pooled", batch["caption_index"], pooled)
    writer.close()
    return text_shape, pooled_dim


def _write_embedding_table(index, embeddings_path: Path, out: Path) -> None:
    """The join's embedding side, streamed: each part file of the embedding folder is read once and its used rows
    go to their place in the memory-mapped table, so the driver holds one part (not 29 x 3584 floats per group)."""
    from ppd.embed.store import iter_embeddings

    rows = len(index.table)
    logger.info(f"writing {rows} user embeddings {list(index.embedding_shape)} (streamed from {embeddings_path})")
    index.table.to_parquet(out / EMBEDDINGS_INDEX, index=False)
    row_of = {
        (int(u), int(g)): int(r)
        for u, g, r in zip(index.table["user_id"], index.table["group_id"], index.table["embedding_index"], strict=True)
    }
    specs = {"user_embedding": ((rows, *index.embedding_shape), torch.float32)}
    written = 0
    with TensorTable.create(out / EMBEDDINGS_FILE, specs) as writer:
        for keys, vectors in iter_embeddings(embeddings_path, row_of):
            writer.write("user_embedding", np.array([row_of[key] for key in keys]), torch.from_numpy(vectors))
            written += len(keys)
    if written != rows:
        raise JobError(f"{embeddings_path}: {rows} planned user embeddings, {written} found while streaming them")


def _write_split(
    prepared: Path, split: str, out: Path, model: ModelConfig, rows_ref, actors: dict[str, Any]
) -> SplitFiles:
    import ray

    files = sorted(str(p) for p in (prepared / split).glob("*.parquet"))
    logger.info(f"{split}: encoding images of {len(files)} file(s)")
    (
        ray.data.read_parquet(files, override_num_blocks=len(files))
        .select_columns(_IMAGE_COLUMNS)
        .map_batches(
            LatentStage,
            fn_constructor_kwargs={"model": model.model_dump(), "rows_ref": rows_ref},
            batch_format="pyarrow",
            **actors,
        )
        .sort("order_key")
        .write_parquet(str(out / split))
    )
    # File names carry Ray's write-task numbers, not the order: order the files by their first key, check the rest.
    written = []
    for path in (out / split).glob("*.parquet"):
        keys = pq.read_table(path, columns=["order_key"]).column("order_key").to_numpy()
        if len(keys):
            written.append((int(keys[0]), int(keys[-1]), len(keys), path))
    written.sort()
    for (_, last, _, path), (first, _, _, following) in zip(written, written[1:], strict=False):
        if first <= last:
            raise JobError(f"{path.name} and {following.name} overlap in order_key: the sort did not range-partition")
    files_in_order = []
    for position, (*_, path) in enumerate(written):
        ordered = path.with_name(f"part-{position:05d}.parquet")
        path.rename(ordered)
        files_in_order.append(str(ordered.relative_to(out)))
    return SplitFiles(rows=sum(n for _, _, n, _ in written), files=files_in_order)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = job_arg_parser(__name__, prog)
    parser.add_argument("--prepared", required=True, type=Path, help="output folder of the preparation job")
    parser.add_argument("--embeddings", required=True, type=Path, help="output folder of the embedding job")
    parser.add_argument("--out", "-o", required=True, type=Path, help="output folder of the precomputed inputs")
    parser.add_argument("--splits", default=",".join(DEFAULT_SPLITS), help="comma-separated splits to precompute")

    def job(args) -> str:
        manifest = run(config_from_args(args), args.prepared, args.embeddings, args.out, tuple(args.splits.split(",")))
        return format_manifest(manifest, args.out)

    return run_job(parser, argv, job)


def format_manifest(manifest: PrecomputedManifest, out: Path) -> str:
    """A short summary of what the precompute job wrote."""
    lines = [
        f"{split:11s} {files.rows:7d} pairs; left out: "
        + (", ".join(f"{k} {v}" for k, v in manifest.rejected[split].items() if v) or "none")
        for split, files in manifest.splits.items()
    ]
    lines.append(
        f"captions {manifest.captions} x {list(manifest.text_shape)}, user embeddings {manifest.user_embeddings} x "
        f"{list(manifest.embedding_shape)}, latents {list(manifest.latent_shape)} -> {out}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
