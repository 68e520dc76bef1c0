"""A job through the Ray Jobs API end to end: a local head, submit, poll, logs, SUCCEEDED (and a failing job)."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ppd.train.data import CAPTIONS_FILE, EMBEDDINGS_FILE, PrecomputedManifest
from ppd_ray.console import JobError
from ppd_ray.infra.local_cluster import local_head

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_precompute_job_through_the_jobs_api_matches_the_in_process_run(inputs, smoke_config, tmp_path):
    out = tmp_path / "precomputed"
    cache = Path(smoke_config.model.cache_dir).resolve()
    job = [sys.executable, "-m", "ppd_ray.jobs.precompute", "--preset", "smoke", "--set", f"model.cache_dir={cache}"]
    streamed: list[str] = []
    with local_head(num_cpus=2) as cluster:
        assert cluster.dashboard_address.startswith("http://127.0.0.1:")
        outcome = cluster.submit_and_wait(
            [*job, "--prepared", str(inputs.prepared), "--embeddings", str(inputs.embeddings), "--out", str(out)],
            working_dir=REPO_ROOT,
            on_log=streamed.append,
            timeout_s=600,
        )
        # a job that fails (a user mistake) ends in a JobError that carries the job's own one-line error
        with pytest.raises(JobError) as failed:
            cluster.submit_and_wait(
                [*job, "--prepared", str(tmp_path / "nowhere"), "--embeddings", str(tmp_path), "--out", str(out)],
                working_dir=REPO_ROOT,
                timeout_s=300,
            )

    assert outcome.status == "SUCCEEDED" and outcome.job_id
    assert any("train: wrote" in line for line in streamed), streamed[-20:]  # progress streamed while the job ran
    assert "user embeddings" in outcome.logs  # the job's summary line
    assert "FAILED" in str(failed.value) and "error: prepared data" in str(failed.value)

    # the job's output equals the in-process run's: same rows in the same order, same tables (only the number of
    # files a split is cut into follows the cluster's parallelism)
    local, remote = PrecomputedManifest.read(inputs.precomputed), PrecomputedManifest.read(out)
    assert remote.model_dump(exclude={"splits"}) == local.model_dump(exclude={"splits"})
    for split in local.splits:
        assert remote.splits[split].rows == local.splits[split].rows
        assert pq.read_table(remote.split_paths(out, split)).equals(
            pq.read_table(local.split_paths(inputs.precomputed, split))
        )
    for name in (CAPTIONS_FILE, EMBEDDINGS_FILE):
        assert (out / name).read_bytes() == (inputs.precomputed / name).read_bytes()
