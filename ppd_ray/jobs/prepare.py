"""Ray job: Pick-a-Pic v2 shards -> train / validation / test_seen / test_unseen parquet + few-shot groups.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m ppd_ray.jobs.prepare --input toy/pairs/population --out prepared/population

Shards stream through Ray Data twice (check rows, then write them out annotated); the split and group decisions are
made once on the driver from a small metadata table (`ppd.data.prepare.assign_splits`). Every input row ends in
a split or in a counted rejection; accounting.json proves it (input_rows == sum(kept) + sum(rejected)).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ppd.config import DataConfig, PPDConfig
from ppd.data.prepare import SPLITS, accounting, assemble_group, assign_splits, preferred_index, row_rejections
from ppd.data.schema import check_schema, conform
from ppd_ray.console import JobError
from ppd_ray.jobs.common import config_from_args, init_ray, job_arg_parser, run_job

logger = logging.getLogger(__name__)

OUTPUT_DIRS = (*SPLITS, "groups", "_group_members")


@dataclass(frozen=True)
class Shard:
    """One input parquet file as the driver sees it before reading any data."""

    index: int
    path: str
    rows: int
    first_pair_id: int
    problem: str | None = None  # a FILE_REASONS entry when the file cannot be used
    message: str = ""


def discover_shards(input_path: Path) -> list[Shard]:
    """List parquet files under `input_path` (a file or a folder) and check each one's schema from its footer."""
    if not input_path.exists():
        raise JobError(f"input {input_path} does not exist")
    paths = [input_path] if input_path.is_file() else sorted(input_path.rglob("*.parquet"))
    if not paths:
        raise JobError(f"no *.parquet files under {input_path}")
    shards, next_pair_id = [], 0
    for index, path in enumerate(paths):
        try:
            parquet = pq.ParquetFile(path)
            rows, problem = parquet.metadata.num_rows, check_schema(parquet.schema_arrow)
        except Exception as err:  # pyarrow raises ArrowInvalid / OSError for empty or corrupt files
            size = path.stat().st_size
            shards.append(
                Shard(index, str(path), 0, next_pair_id, "unreadable_file", f"not a parquet file ({size} bytes): {err}")
            )
            continue
        if problem is not None:
            shards.append(Shard(index, str(path), rows, next_pair_id, problem.reason, problem.message))
            continue
        shards.append(Shard(index, str(path), rows, next_pair_id))
        next_pair_id += rows  # pair ids are contiguous over the usable shards, in path order
    return shards


def _read_shard(path: str) -> pa.Table:
    return conform(pq.read_table(path))


def scan_shard(batch: dict[str, np.ndarray], check_images: bool) -> dict[str, list]:
    """Ray Data stage 1: one shard in, one metadata row per pair out (no images)."""
    path, first = str(batch["path"][0]), int(batch["first_pair_id"][0])
    table = _read_shard(path)
    reasons = row_rejections(table, check_images=check_images)
    n = table.num_rows
    return {
        "pair_id": list(range(first, first + n)),
        "file_index": [int(batch["index"][0])] * n,
        "row_in_file": list(range(n)),
        "ranking_id": table.column("ranking_id").to_pylist(),
        "user_id": table.column("user_id").to_pylist(),
        "caption": table.column("caption").to_pylist(),
        "reason": reasons,
    }


def write_shard(batch: dict[str, np.ndarray], out: str, assignment_ref) -> dict[str, list]:
    """Ray Data stage 2: one shard in, its rows written to out/<split>/ annotated with their split and groups; counts out."""
    import ray  # workers only

    path, first, index = str(batch["path"][0]), int(batch["first_pair_id"][0]), int(batch["index"][0])
    table = _read_shard(path)
    assignment: pa.Table = ray.get(assignment_ref)
    # Assignment rows are sorted by pair_id, and pair ids are contiguous per shard.
    own = assignment.slice(first, table.num_rows)
    annotated = (
        table.append_column("pair_id", own.column("pair_id"))
        .append_column("split", own.column("split"))
        .append_column("context_group_id", own.column("context_group_id"))
        .append_column("condition_group_id", own.column("condition_group_id"))
    )
    label_0 = annotated.column("label_0").to_numpy(zero_copy_only=False)
    annotated = annotated.append_column("preferred", pa.array(preferred_index(label_0)))
    counts = {}
    for split in SPLITS:
        rows = annotated.filter(pa.compute.equal(annotated.column("split"), split))
        counts[split] = rows.num_rows
        if rows.num_rows:
            pq.write_table(rows, Path(out) / split / f"part-{index:05d}.parquet")
    members = annotated.filter(pa.compute.is_valid(annotated.column("context_group_id")))
    if members.num_rows:
        members = members.select(["context_group_id", "pair_id", "user_id", "caption", "jpg_0", "jpg_1", "preferred"])
        pq.write_table(members, Path(out) / "_group_members" / f"part-{index:05d}.parquet")
    return {"index": [index], **{s: [n] for s, n in counts.items()}}


def run(cfg: PPDConfig, input_path: Path, out: Path) -> dict:
    """Prepare `input_path` into `out`; returns the accounting (also written to out/accounting.json)."""
    import ray

    data: DataConfig = cfg.data
    shards = discover_shards(input_path)
    for shard in shards:
        if shard.problem:
            logger.info(
                f"skipping {shard.path}: {shard.message} -> {shard.rows} row(s) counted as rejected ({shard.problem})"
            )
    usable = [s for s in shards if s.problem is None and s.rows > 0]
    for sub in OUTPUT_DIRS:
        shutil.rmtree(out / sub, ignore_errors=True)  # stale parts of an earlier run must not mix in
        (out / sub).mkdir(parents=True, exist_ok=True)
    file_rejections: dict[str, int] = {}
    for shard in shards:
        if shard.problem:
            file_rejections[shard.problem] = file_rejections.get(shard.problem, 0) + shard.rows
    input_rows = sum(s.rows for s in shards)

    init_ray()
    tasks = ray.data.TaskPoolStrategy(size=max(1, min(data.concurrency, len(usable))))
    specs = ray.data.from_items(
        [{"index": s.index, "path": s.path, "first_pair_id": s.first_pair_id} for s in usable],
        override_num_blocks=max(1, len(usable)),  # one block per shard, so shards run in parallel tasks
    )
    logger.info(f"checking {sum(s.rows for s in usable)} rows in {len(usable)} shard(s)")
    if usable:
        meta = specs.map_batches(
            scan_shard,
            batch_size=1,
            compute=tasks,
            fn_kwargs={"check_images": data.check_images},
        ).to_pandas()
        meta = meta.sort_values("pair_id").reset_index(drop=True)
    else:
        meta = pd.DataFrame(
            columns=["pair_id", "file_index", "row_in_file", "ranking_id", "user_id", "caption", "reason"]
        )
    assignment = assign_splits(meta, data)
    report = accounting(input_rows, assignment, file_rejections)
    _write_rejections(out, meta, assignment, shards)

    if usable:
        assignment_table = pa.Table.from_pandas(
            assignment.rows.assign(split=assignment.rows["split"].astype(object)), preserve_index=False
        ).select(["pair_id", "split", "context_group_id", "condition_group_id"])
        counts = specs.map_batches(
            write_shard,
            batch_size=1,
            compute=tasks,
            fn_kwargs={"out": str(out), "assignment_ref": ray.put(assignment_table)},
        ).to_pandas()
        written = {s: int(counts[s].sum()) for s in SPLITS}
        if written != report["kept"]:
            raise JobError(f"written rows {written} differ from the assignment {report['kept']}")
        _write_groups(out, assignment, partitions=data.concurrency)
    shutil.rmtree(out / "_group_members", ignore_errors=True)

    report["files"] = [{"path": s.path, "rows": s.rows, "problem": s.problem, "message": s.message} for s in shards]
    report["config"] = data.model_dump()
    (out / "accounting.json").write_text(json.dumps(report, indent=2))
    assignment.groups.to_parquet(out / "groups_index.parquet", index=False)
    if sum(report["kept"].values()) == 0:
        raise JobError(f"no usable rows: all {input_rows} input rows were rejected ({_nonzero(report['rejected'])})")
    return report


def _write_groups(out: Path, assignment, partitions: int) -> None:
    import ray

    member_files = sorted((out / "_group_members").glob("*.parquet"))
    if not member_files:
        return
    order = dict(zip(assignment.groups["group_id"].astype(int), assignment.groups["pair_ids"], strict=True))
    pools = dict(zip(assignment.groups["group_id"].astype(int), assignment.groups["pool"], strict=True))
    (
        ray.data.read_parquet([str(p) for p in member_files])
        # Few partitions: groups are small, and Ray's default of 200 costs more in scheduling than in work here.
        .groupby("context_group_id", num_partitions=max(1, partitions))
        .map_groups(assemble_group, batch_format="pandas", fn_kwargs={"order": order, "pools": pools})
        .write_parquet(str(out / "groups"))
    )


def _write_rejections(out: Path, meta: pd.DataFrame, assignment, shards: list[Shard]) -> None:
    """out/rejected.parquet: file, row, ranking_id, user_id, reason of every rejected row (file-level ones too)."""
    paths = {s.index: s.path for s in shards}
    rejected = meta[["pair_id", "file_index", "row_in_file", "ranking_id", "user_id"]].merge(
        assignment.rows[["pair_id", "reason"]], on="pair_id"
    )
    rejected = rejected[rejected["reason"].notna()].copy()
    rejected["file"] = rejected["file_index"].map(paths)
    file_level = pd.DataFrame(
        [{"file": s.path, "row_in_file": -1, "reason": s.problem, "rows": s.rows} for s in shards if s.problem]
    )
    rejected = pd.concat([rejected.assign(rows=1), file_level], ignore_index=True)
    rejected = rejected.reindex(columns=["file", "row_in_file", "ranking_id", "user_id", "reason", "rows"])
    rejected.astype({"ranking_id": "Int64", "user_id": "Int64", "row_in_file": "Int64"}).to_parquet(
        out / "rejected.parquet", index=False
    )
    for reason, rows in rejected[rejected["row_in_file"] >= 0].groupby("reason"):  # file-level ones were logged
        examples = ", ".join(
            f"{Path(f).name}:{r}" for f, r in zip(rows["file"][:3], rows["row_in_file"][:3], strict=False)
        )
        logger.info(f"rejected {int(rows['rows'].sum())} row(s): {reason} (e.g. {examples})")


def _nonzero(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items() if v) or "none"


def format_accounting(report: dict) -> str:
    """A short human-readable summary of accounting.json."""
    kept = sum(report["kept"].values())
    rejected = sum(report["rejected"].values())
    lines = [
        f"input rows {report['input_rows']} = kept {kept} + rejected {rejected}",
        "kept:      " + ", ".join(f"{k} {v}" for k, v in report["kept"].items()),
        "rejected:  " + _nonzero(report["rejected"]),
        "groups:    " + ", ".join(f"{k} {v}" for k, v in report["groups"].items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = job_arg_parser(__name__, prog)
    parser.add_argument(
        "--input", "-i", required=True, type=Path, help="a Pick-a-Pic v2 parquet file or folder of shards"
    )
    parser.add_argument(
        "--out", "-o", required=True, type=Path, help="output folder: <split>/, groups/, accounting.json"
    )
    parser.add_argument("--shots", type=int, default=None, help="pairs per few-shot group (default from the preset: 4)")
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the splits and groups (default from the preset)"
    )

    def job(args) -> str:
        shortcuts = [f"data.shots={args.shots}"] * (args.shots is not None)
        shortcuts += [f"data.seed={args.seed}"] * (args.seed is not None)
        report = run(config_from_args(args, *shortcuts), args.input, args.out)
        return f"{format_accounting(report)}\nwrote {args.out}/{{{','.join(SPLITS)}}}, {args.out}/groups, {args.out}/accounting.json"

    return run_job(parser, argv, job)


if __name__ == "__main__":
    sys.exit(main())
