"""Ray job: few-shot groups (PREP/groups) -> user embeddings [L, d] + profiles, one parquet row per group.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m ppd_ray.jobs.embed --prepared prepared/population --out embeddings/population --embedder vlm-hf

Ray Data streams the groups through a pool of actors (`ActorPoolStrategy(size=embed.concurrency)`, each with
`embed.gpus_per_actor` GPUs) that load the embedder once; every batch of `embed.batch_size` groups is written by its
actor as one part file (`ppd.embed.store`), so a killed job keeps what it finished. On start the job reads which
groups the output folder already holds for the same model, prompt, layers and settings and embeds only the others
(resumable). A group with an undecodable image becomes an error row, counted in the summary.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ppd.config import PPDConfig
from ppd.embed import embedding_identity, load_embedder
from ppd.embed.base import EmbeddingIdentity
from ppd.embed.groups import GROUP_COLUMNS, groups_from_rows
from ppd.embed.store import done_group_ids, write_part
from ppd_ray.console import JobError, setup_logging
from ppd_ray.jobs.common import config_from_args, init_ray, job_arg_parser, run_job

logger = logging.getLogger(__name__)

EMBEDDERS = ("vlm-hf", "vlm-vllm", "pairdiff", "onehot")


class EmbedGroups:
    """Ray Data actor: loads the embedder once; each batch of groups -> one part file; returns per-group outcomes."""

    def __init__(self, config: dict, out_dir: str) -> None:
        from transformers.utils import logging as transformers_logging

        setup_logging()  # an actor is a process of its own: its progress lines need the handler too
        transformers_logging.disable_progress_bar()  # one "Loading weights" bar per actor is noise in job logs
        self.embedder = load_embedder(PPDConfig.from_dict(config))
        self.out_dir = out_dir
        self.groups_done = 0

    def __call__(self, batch: pa.Table) -> dict[str, list]:
        start = time.monotonic()
        rows = self.embedder.embed_groups(groups_from_rows(batch.to_pylist()))
        part = write_part(rows, self.out_dir, self.embedder.identity)
        # Ray Data hands finished batches to the driver in bundles: this line is the per-batch progress.
        self.groups_done += len(rows)
        failed = sum(row.error is not None for row in rows)
        logger.info(
            f"actor: {len(rows)} groups ({failed} failed) in {time.monotonic() - start:.1f}s -> {part.name}; {self.groups_done} by this actor"
        )
        return {
            "group_id": [row.group_id for row in rows],
            "user_id": [row.user_id for row in rows],
            "error": [row.error for row in rows],
        }


def with_embed_args(
    cfg: PPDConfig, embedder: str | None = None, model: str | None = None, layers: str | None = None
) -> PPDConfig:
    """Apply the job's shortcut flags: --embedder, --model (the VLM or the image encoder), --layers."""
    overrides = []
    if embedder is not None:
        if embedder not in EMBEDDERS:
            raise JobError(f"--embedder must be one of {', '.join(EMBEDDERS)}, not {embedder!r}")
        overrides.append(f"embed.embedder={embedder}")
    chosen = embedder or cfg.embed.embedder
    if model is not None:
        field = "image_encoder_path" if chosen == "pairdiff" else "vlm_path"
        overrides.append(f"embed.{field}={json.dumps(model)}")
    if layers is not None:
        overrides.append(f"embed.layers={json.dumps(parse_layers(layers))}")
    try:
        return cfg.with_overrides(overrides)
    except ValueError as err:
        raise JobError(str(err)) from None


def parse_layers(text: str) -> str | list[int]:
    """`last` | `all` | comma-separated indices such as `0,-1` -> the config value."""
    if text in ("last", "all"):
        return text
    try:
        return [int(part) for part in text.split(",") if part.strip()] or _bad_layers(text)
    except ValueError:
        return _bad_layers(text)


def _bad_layers(text: str):
    raise JobError(f"--layers must be 'last', 'all' or comma-separated integers such as 0,-1; got {text!r}")


def group_files(prepared: Path) -> list[Path]:
    """PREP/groups/*.parquet, checked for the columns an embedder reads."""
    if not prepared.exists():
        raise JobError(f"prepared folder {prepared} does not exist (run `ppd prepare` first)")
    folder = prepared / "groups"
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        raise JobError(f"no few-shot groups under {folder} (is {prepared} the output of `ppd prepare`?)")
    for file in files:
        missing = [c for c in GROUP_COLUMNS if c not in pq.read_schema(file).names]
        if missing:
            raise JobError(f"{file}: missing column(s) {', '.join(missing)}: not a groups file of `ppd prepare`")
    return files


def resolve_identity(cfg: PPDConfig) -> EmbeddingIdentity:
    """The identity of the embeddings this config makes; config mistakes become JobErrors before Ray starts."""
    try:
        return embedding_identity(cfg)
    except ValueError as err:  # e.g. a layer index beyond the model's depth
        raise JobError(str(err)) from None
    except OSError as err:  # no config.json at the model path, or a hub id while offline
        raise JobError(f"cannot read the model config: {str(err).splitlines()[0]}") from None


def run(cfg: PPDConfig, prepared: Path, out: Path, limit: int | None = None) -> dict:
    """Embed every group of `prepared` not yet in `out` (at most `limit` of them); returns the summary."""
    import ray
    from ray.data.expressions import col

    files = group_files(prepared)
    if cfg.embed.embedder == "onehot":
        # Known users only (paper Sec. 5.1): a per-user indicator needs no model and no actors.
        from ppd.embed.onehot import write_one_hot_embeddings

        rows = write_one_hot_embeddings(prepared / "groups", out)
        logger.info(f"onehot: {rows} groups -> {out}")
        return {
            "embedder": "onehot",
            "groups": rows,
            "embedded": rows,
            "failed": 0,
            "already_done": 0,
            "model_id": "one-hot-users",
            "prompt_hash": "",
            "layers": [0],
            "seconds": 0.0,
        }
    identity = resolve_identity(cfg)
    all_ids = sorted(set(pq.read_table(files, columns=["group_id"])["group_id"].to_pylist()))
    done = done_group_ids(out, identity)
    todo = [g for g in all_ids if g not in done]
    if limit is not None:
        todo = todo[:limit]
    logger.info(
        f"{cfg.embed.embedder} ({identity.model_id}, prompt {identity.prompt_hash}, layers {list(identity.layers)}): "
        f"{len(all_ids)} groups, {len(done & set(all_ids))} already in {out}, {len(todo)} to embed"
    )
    summary = {
        "embedder": identity.embedder,
        "model_id": identity.model_id,
        "prompt_hash": identity.prompt_hash,
        "layers": list(identity.layers),
        "settings": json.loads(identity.settings_json),
        "groups": len(all_ids),
        "already_done": len(done & set(all_ids)),
        "embedded": 0,
        "failed": 0,
        "errors": [],
    }
    start = time.monotonic()
    if todo:
        out.mkdir(parents=True, exist_ok=True)
        init_ray()
        embed = cfg.embed
        dataset = (
            ray.data.read_parquet([str(f) for f in files])
            .select_columns(list(GROUP_COLUMNS))
            .filter(expr=col("group_id").is_in(todo))
            .map_batches(
                EmbedGroups,
                fn_constructor_kwargs={"config": cfg.to_dict(), "out_dir": str(out)},
                batch_size=embed.batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=embed.concurrency),
                num_gpus=embed.gpus_per_actor,
                num_cpus=1,
            )
        )
        users: set[int] = set()
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            outcomes = batch.to_pylist()
            summary["embedded"] += sum(o["error"] is None for o in outcomes)
            for outcome in outcomes:
                users.add(outcome["user_id"])
                if outcome["error"] is not None:
                    summary["failed"] += 1
                    summary["errors"].append({"group_id": outcome["group_id"], "error": outcome["error"]})
                    logger.info(f"error row: {outcome['error']}")
            finished = summary["embedded"] + summary["failed"]
            elapsed = time.monotonic() - start
            logger.info(
                f"embedded {finished}/{len(todo)} groups ({summary['failed']} failed), {finished / elapsed:.2f} groups/s"
            )
        summary["users"] = len(users)
    summary["seconds"] = round(time.monotonic() - start, 2)
    summary["groups_per_s"] = round((summary["embedded"] + summary["failed"]) / max(summary["seconds"], 1e-9), 3)
    if out.exists():
        (out / f"summary-{identity.key}.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(summary: dict, out: Path) -> str:
    """A short human-readable summary of a run."""
    lines = [
        f"{summary['embedder']} {summary['model_id']} prompt {summary['prompt_hash']} layers {summary['layers']}",
        f"groups {summary['groups']}: {summary['already_done']} already done, {summary['embedded']} embedded, "
        f"{summary['failed']} failed (error rows) in {summary['seconds']:.1f}s",
        f"embeddings -> {out}/part-*.parquet",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = job_arg_parser(__name__, prog)
    parser.add_argument("--prepared", required=True, type=Path, help="output folder of `ppd prepare` (reads groups/)")
    parser.add_argument("--out", "-o", required=True, type=Path, help="folder for the embedding part files")
    parser.add_argument(
        "--embedder", "-e", default=None, help=f"one of {', '.join(EMBEDDERS)} (default from the preset)"
    )
    parser.add_argument(
        "--model", "-m", default=None, help="VLM path (vlm-*) or CLIP vision path (pairdiff); default tiny"
    )
    parser.add_argument("--layers", default=None, help="last | all | comma-separated hidden-state indices")
    parser.add_argument("--limit", type=int, default=None, help="embed at most this many not-yet-done groups")

    def job(args) -> str:
        cfg = with_embed_args(config_from_args(args), args.embedder, args.model, args.layers)
        return format_summary(run(cfg, args.prepared, args.out, args.limit), args.out)

    return run_job(parser, argv, job)


if __name__ == "__main__":
    sys.exit(main())
