"""A fresh machine: nothing in $HOME. Every Ray the project starts owns its token; a foreign head without one is a
one-line error. Each case runs in a subprocess whose HOME is an empty folder, and checks the folder stays empty of
Ray state afterwards (a token written there would make the next run pass for the wrong reason)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# A head of the project's own, one job that connects back to it from a worker (driver and worker both authenticate).
HEAD_AND_JOB = """
import json, os, sys
from ppd_ray.infra.local_cluster import local_head
job = "python -c \\"import os, ray; ray.init(); print('JOB', ray.get(ray.remote(lambda: 6 * 7).remote()), os.environ['RAY_AUTH_TOKEN_PATH'])\\""
with local_head(num_cpus=1) as cluster:
    outcome = cluster.submit_and_wait(job, working_dir=sys.argv[1], timeout_s=300)
    print(json.dumps({"status": outcome.status, "logs": outcome.logs, "token_path": str(cluster.token_path)}))
"""

# What a job entry point and `ppd serve` do without RAY_ADDRESS: a local Ray with a private token.
LOCAL_INIT = """
import ray
from ppd_ray.jobs.common import init_ray
init_ray()
print("LOCAL", ray.get(ray.remote(lambda: 6 * 7).remote()))
ray.shutdown()
"""

# A head this client did not start: no token of ours -> one line saying what to do, no traceback.
FOREIGN_HEAD = """
import os, sys
from ppd_ray.console import JobError
from ppd_ray.infra.job_client import submit_job
from ppd_ray.infra.local_cluster import local_head
with local_head(num_cpus=1) as cluster:
    for token in (None, "0" * 64):  # none at all, then a wrong one
        if token:
            os.environ["RAY_AUTH_TOKEN"] = token
        try:
            submit_job(cluster.dashboard_address, "true", working_dir=sys.argv[1])
        except JobError as err:
            print("JOBERROR", str(err).replace(chr(10), " | "))
"""


def _run_with_empty_home(script: str, home: Path, *args: str) -> subprocess.CompletedProcess:
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _ray_state_in(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if ".ray" in p.parts)


@pytest.mark.slow
def test_local_head_and_a_job_with_an_empty_home(tmp_path):
    workdir = tmp_path / "job"
    workdir.mkdir()
    done = _run_with_empty_home(HEAD_AND_JOB, tmp_path / "home", str(workdir))
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "SUCCEEDED"
    # the job ran in token mode with the head's own token file, and its remote task came back
    job_line = next(line for line in result["logs"].splitlines() if line.startswith("JOB "))
    assert job_line.split() == ["JOB", "42", result["token_path"]]
    assert not Path(result["token_path"]).exists()  # the head's private folder is gone with it
    assert _ray_state_in(tmp_path / "home") == []


@pytest.mark.slow
def test_local_ray_of_a_job_entry_point_with_an_empty_home(tmp_path):
    done = _run_with_empty_home(LOCAL_INIT, tmp_path / "home")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOCAL 42" in done.stdout
    # Ray left to itself would have written its token here (ray.init of a new cluster in Ray 2.60)
    assert _ray_state_in(tmp_path / "home") == []


@pytest.mark.slow
def test_a_foreign_head_without_our_token_is_a_one_line_error(tmp_path):
    workdir = tmp_path / "job"
    workdir.mkdir()
    done = _run_with_empty_home(FOREIGN_HEAD, tmp_path / "home", str(workdir))
    assert done.returncode == 0, done.stderr[-3000:]
    errors = [line for line in done.stdout.splitlines() if line.startswith("JOBERROR")]
    assert len(errors) == 2, done.stdout
    assert "has no token" in errors[0] and "has a token that the head refused" in errors[1]
    for line in errors:
        assert "RAY_AUTH_TOKEN_PATH" in line and "ray get-auth-token" in line and " | " not in line
    assert "Traceback" not in done.stderr
