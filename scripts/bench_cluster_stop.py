"""Stop time of a local Ray cluster that has run a job: Ray 2.60's SIGTERM drain on (Ray's default, 30 s) against
off (what `ppd_ray.infra.local_cluster` starts its nodes with), side by side in one run (numbers for BENCHMARKS.md).

    python scripts/bench_cluster_stop.py              # 2 rounds of each
    python scripts/bench_cluster_stop.py --rounds 3

Each round starts a head with `local_head`, runs one small Ray Data job through the Jobs API (so the head has job
workers, as after a demo stage), then times `LocalCluster.stop()`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from ppd_ray.infra.local_cluster import local_head

REPO_ROOT = Path(__file__).resolve().parents[1]
JOB = "import ray, ray.data; ray.init(); print(ray.data.range(100).map_batches(lambda b: b).count())"
DRAIN = "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"


def stop_seconds(drain_s: str) -> float:
    """Seconds `LocalCluster.stop()` takes after one job, with the nodes' drain timeout set to `drain_s`."""
    os.environ[DRAIN] = drain_s  # the nodes inherit it (an explicit setting wins over our default of 0)
    with local_head() as cluster:
        outcome = cluster.submit_and_wait([sys.executable, "-c", JOB], working_dir=REPO_ROOT)
        if outcome.status != "SUCCEEDED":
            raise SystemExit(f"the benchmark's job ended {outcome.status}:\n{outcome.logs[-2000:]}")
        began = time.monotonic()
        cluster.stop()
        return time.monotonic() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="stops measured per setting (alternating)")
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {"30": [], "0": []}
    for round_ in range(args.rounds):
        for drain in seconds:  # alternating, so drift of the machine hits both settings alike
            seconds[drain].append(stop_seconds(drain))
            print(f"round {round_ + 1}: drain {drain} s -> stop {seconds[drain][-1]:.1f} s", flush=True)
    on, off = statistics.median(seconds["30"]), statistics.median(seconds["0"])
    print(f"| setting | stop after a job (median of {args.rounds}) |")
    print("| --- | --- |")
    print(f"| {DRAIN}=30 (Ray's default) | {on:.1f} s |")
    print(f"| {DRAIN}=0 (local_cluster's) | {off:.1f} s |")
    print(f"| ratio | {on / off:.1f}x |")


if __name__ == "__main__":
    main()
