"""A job run on its own (no RAY_ADDRESS) starts a local Ray without the dashboard. Ray Train's detached placement-group
cleaner would then warn once a second for the whole run that the state API (a dashboard module) is unavailable; the
job's local Ray turns that logger down to errors in every worker process, detached actors included."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# The cleaner is a detached, zero-CPU actor, as Ray Train launches it; a plain task stands for every other worker.
PROBE = """
import logging, ray
from ppd_ray.jobs.common import _TRAIN_CLEANER_LOGGER, init_ray

def cleaner_level():
    return logging.getLogger(_TRAIN_CLEANER_LOGGER).getEffectiveLevel()

class Detached:
    def level(self):
        return cleaner_level()

init_ray()
actor = ray.remote(num_cpus=0)(Detached).options(lifetime="detached", name="probe").remote()
print("LEVELS", ray.get(ray.remote(cleaner_level).remote()), ray.get(actor.level.remote()))
ray.kill(actor)
ray.shutdown()
"""


def test_a_jobs_own_local_ray_keeps_the_train_cleaners_warnings_off(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PROBE)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    levels = next(line for line in done.stdout.splitlines() if line.startswith("LEVELS")).split()[1:]
    # INFO (20) is what Ray's workers leave it at; ERROR (40) keeps the cleaner's warnings off the console
    assert levels == [str(40), str(40)], done.stdout
