"""Stage 1 throughput: users (few-shot groups) per second, three ways, side by side in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_embed.py --prepared /tmp/e_prep --groups 64

(a) sequential: one user at a time through transformers generate + forward (how the authors' public stage-1 code
    runs: a Python loop over users, batch 1);
(b) the Ray Data job with the transformers backend (`vlm-hf`, batch_size groups per generate call);
(c) the Ray Data job with the vLLM backend (`vlm-vllm`), when vllm is importable.

Same tiny LLaVA-OneVision, same groups, same sampling (temperature 0.7, max_new_tokens from --max-new-tokens) for
all three. (a) is timed with the model already loaded; (b) and (c) end to end (actor start, model load, vLLM engine
start, parquet writes: what a user of the job waits for). Two in-process rows (no Ray, model already loaded) show
each backend's steady state. A "user" is one few-shot group of 4 pairs, i.e. one embedding.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppd.config import smoke  # noqa: E402
from ppd.embed import load_embedder  # noqa: E402
from ppd.embed.groups import groups_from_rows  # noqa: E402
from ppd.embed.vllm_backend import vllm_available  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, required=True, help="output folder of `ppd prepare` (groups/)")
    parser.add_argument("--groups", type=int, default=48, help="groups (users) to embed in each variant")
    parser.add_argument(
        "--sequential-groups", type=int, default=12, help="users timed in (a), a rate over fewer users (it is slow)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=48, help="profile length (tiny_cpu preset: 48)")
    parser.add_argument("--hf-batch", type=int, default=8, help="groups per generate call, vlm-hf job")
    parser.add_argument("--vllm-batch", type=int, default=64, help="groups per vLLM call, vlm-vllm job")
    parser.add_argument("--cache-dir", default=".cache/ppd/models")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    files = sorted((args.prepared / "groups").glob("*.parquet"))
    rows = sorted(pq.read_table(files).to_pylist(), key=lambda r: r["group_id"])[: args.groups]
    groups = groups_from_rows(rows)
    n = len(groups)
    base = smoke().with_overrides(
        [f"model.cache_dir={args.cache_dir}", f"embed.max_new_tokens={args.max_new_tokens}", "embed.temperature=0.7"]
    )
    results: dict[str, dict] = {}
    load = os.getloadavg()[0]

    def record(name: str, seconds: float) -> None:
        results[name] = {"seconds": seconds}
        print(f"[bench] {name}: {seconds:.1f}s for {n} users", file=sys.stderr, flush=True)

    print(f"[bench] {n} users; load average {load:.1f}", file=sys.stderr, flush=True)

    # One thread in-process, as each job actor gets one CPU (Ray sets OMP_NUM_THREADS=1): the same compute budget.
    torch.set_num_threads(1)
    # (a) sequential, one user at a time (model loaded before the clock starts); timed on fewer users, scaled
    embedder = load_embedder(base.with_overrides(["embed.embedder=vlm-hf"]))
    sequential_groups = groups[: args.sequential_groups]
    start = time.monotonic()
    for group in sequential_groups:
        embedder.embed_groups([group])
    record("a_sequential_hf", (time.monotonic() - start) * n / len(sequential_groups))
    # in-process batched HF (no Ray): the backend's steady state
    start = time.monotonic()
    for i in range(0, n, args.hf_batch):
        embedder.embed_groups(groups[i : i + args.hf_batch])
    record("hf_batched_in_process", time.monotonic() - start)
    del embedder

    from ppd_ray.jobs.common import init_ray
    from ppd_ray.jobs.embed import run

    init_ray()
    ids = {g.group_id for g in groups}
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared"
        (prepared / "groups").mkdir(parents=True)
        table = pq.read_table(files)
        table = table.filter(pc.is_in(table["group_id"], value_set=pa.array(sorted(ids))))
        pq.write_table(table, prepared / "groups" / "g.parquet")
        # (b) the job, transformers backend
        cfg = base.with_overrides(["embed.embedder=vlm-hf", f"embed.batch_size={args.hf_batch}"])
        start = time.monotonic()
        summary = run(cfg, prepared, Path(scratch) / "hf")
        record("b_job_hf", time.monotonic() - start)
        assert summary["embedded"] == n, summary
        # (c) the job, vLLM backend
        ok, reason = vllm_available()
        if ok:
            cfg = base.with_overrides(["embed.embedder=vlm-vllm", f"embed.batch_size={args.vllm_batch}"])
            start = time.monotonic()
            summary = run(cfg, prepared, Path(scratch) / "vllm")
            record("c_job_vllm", time.monotonic() - start)
            assert summary["embedded"] == n, summary
            # in-process vLLM (engine already started): the backend's steady state
            embedder = load_embedder(cfg)
            start = time.monotonic()
            for i in range(0, n, args.vllm_batch):
                embedder.embed_groups(groups[i : i + args.vllm_batch])
            record("vllm_in_process", time.monotonic() - start)
        else:
            results["c_job_vllm"] = {"skipped": reason}

    sequential = results["a_sequential_hf"]["seconds"]
    print(
        f"\n{n} users (groups of 4 pairs), tiny LLaVA-OneVision, max_new_tokens {args.max_new_tokens}, "
        f"load average at start {load:.1f} on {os.cpu_count()} cores"
    )
    print(f"{'variant':28s} {'seconds':>8s} {'users/s':>8s} {'vs (a)':>7s}")
    for name, result in results.items():
        if "seconds" not in result:
            print(f"{name:28s} skipped: {result['skipped']}")
            continue
        result["users_per_s"] = n / result["seconds"]
        result["speedup_vs_a"] = sequential / result["seconds"]
        print(f"{name:28s} {result['seconds']:8.1f} {result['users_per_s']:8.2f} {result['speedup_vs_a']:6.1f}x")
    if args.json:
        args.json.write_text(json.dumps({"users": n, "load_average": load, **results}, indent=2))


if __name__ == "__main__":
    main()
