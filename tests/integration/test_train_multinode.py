"""Multi-node behaviour on one machine: a training job loses a node mid-run, resumes on a replacement, and ends
with exactly the adapter of an uninterrupted run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from ppd_ray.infra.job_client import submit_job, wait_for_job
from ppd_ray.infra.local_cluster import local_head
from ppd_ray.infra.processes import wait_until
from tests.helpers import BASELINE_OVERRIDES

REPO_ROOT = Path(__file__).resolve().parents[2]


def _checkpointed_steps(storage: Path) -> list[int]:
    """Optimiser steps of the checkpoints Ray Train has registered (uploaded by every rank) in `storage`."""
    snapshot = storage / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return []
    text = snapshot.read_text()
    return sorted({int(text[i + 5 : i + 13]) for i in range(len(text)) if text.startswith("step-", i)})


@pytest.mark.slow
@pytest.mark.timeout(1800)  # its own limits: 600 s to a first checkpoint, then 900 s for the job
def test_losing_a_worker_node_resumes_from_the_checkpoint_and_ends_like_an_uninterrupted_run(
    baseline, smoke_config, inputs, tracking, tmp_path
):
    out = tmp_path / "multinode"
    overrides = [
        *BASELINE_OVERRIDES,
        "train.cpus_per_worker=1",
        "train.placement_strategy=STRICT_SPREAD",  # one training worker per node
        "train.max_failures=2",
        f"tracking.uri={tracking}",
        f"model.cache_dir={Path(smoke_config.model.cache_dir).resolve()}",
    ]
    entrypoint = [sys.executable, "-m", "ppd_ray.jobs.train", "--preset", "smoke"]
    entrypoint += ["--precomputed", str(inputs.precomputed), "--out", str(out)]
    entrypoint += [part for override in overrides for part in ("--set", override)]

    # a head that runs only the job's driver, and two 2-CPU worker nodes (1 CPU for training, 1 for Ray Data)
    with local_head(num_cpus=0) as cluster:
        doomed, _ = cluster.add_node(2), cluster.add_node(2)
        job_id = submit_job(cluster.dashboard_address, entrypoint, working_dir=REPO_ROOT, token=cluster.auth_token)
        wait_until(
            lambda: bool(_checkpointed_steps(out / "ray" / "train")), timeout_s=600, what="a checkpoint", poll_s=0.2
        )
        checkpointed_before_the_loss = _checkpointed_steps(out / "ray" / "train")
        cluster.kill_node(doomed)  # SIGKILL to its raylet and workers, as a machine failure would
        cluster.add_node(2)  # the replacement an autoscaler would provide
        outcome = wait_for_job(cluster.dashboard_address, job_id, timeout_s=900, token=cluster.auth_token)

    assert checkpointed_before_the_loss[-1] < 18, "the node was lost only after training had ended"
    marker = "resumed from optimiser step"
    resumed_at = [int(line.split(marker)[1].split()[0]) for line in outcome.logs.splitlines() if marker in line]
    # restarted from the latest checkpoint (not from step 0, not from the end)
    assert resumed_at and checkpointed_before_the_loss[-1] <= resumed_at[0] < 18 and resumed_at[0] % 6 == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 18
    # Same seeds, same rows per rank (ordered ingest), same per-micro-batch draws, one CPU thread per worker on both
    # runs, and a 2-rank all-reduce is a single commutative addition: the interrupted run reproduces the
    # uninterrupted one bit for bit, so the comparison is exact.
    resumed = load_file(str(out / "adapter" / "adapter.safetensors"))
    reference = load_file(str(baseline["out"] / "adapter" / "adapter.safetensors"))
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name

    # the same MLflow run carried on; steps logged before the loss and again after the restart agree
    client = MlflowClient(tracking)
    history = client.get_metric_history(summary["run_id"], "pair_id_checksum")
    reference_steps = {m.step: m.value for m in client.get_metric_history(baseline["run_id"], "pair_id_checksum")}
    assert {m.step for m in history} == set(range(1, 19))
    assert all(m.value == reference_steps[m.step] for m in history)
    assert client.get_run(summary["run_id"]).info.status == "FINISHED"
