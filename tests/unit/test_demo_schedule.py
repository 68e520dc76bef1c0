"""How the demo runs its jobs: the training runs side by side (`train.concurrent_runs` at a time), everything else
alone and in order, and a failing job stops what has not started."""

from __future__ import annotations

import threading
import time

import pytest

from ppd.config import smoke
from ppd_ray.console import JobError
from ppd_ray.pipelines.demo import _waves, demo_jobs, run_concurrently
from tests.helpers import one_reward_world


def test_the_nine_training_runs_form_one_wave_between_precompute_and_evaluate(tmp_path):
    jobs = demo_jobs(smoke(), tmp_path / "work", [], 0, one_reward_world(tmp_path))
    waves = _waves(list(enumerate(jobs.stages, 1)))
    titles = [[stage.title for _, stage in wave] for wave in waves]
    (training,) = [wave for wave in titles if len(wave) > 1]
    assert len(training) == 9 and all(title.startswith("train ") for title in training)
    assert all(len(wave) == 1 for wave in titles if wave is not training)
    position = titles.index(training)
    assert titles[position - 1] == ["precompute population"] and titles[position + 1][0].startswith("evaluate")
    # every stage keeps its place in the order (waves are consecutive runs of the list)
    assert [index for wave in waves for index, _ in wave] == list(range(1, len(jobs.stages) + 1))


def test_runs_at_most_the_given_number_at_once_and_all_of_them():
    lock, running, peak, done = threading.Lock(), [0], [0], []

    def run(item: int) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
            done.append(item)

    run_concurrently(list(range(7)), 2, run)
    assert sorted(done) == list(range(7)) and peak[0] == 2


def test_a_failure_is_raised_and_what_has_not_started_never_starts():
    started = []
    second_running, release = threading.Event(), threading.Event()

    def run(item: int) -> None:
        started.append(item)
        if item == 0:
            second_running.wait(5)
            raise JobError("job 0 FAILED")
        second_running.set()
        release.wait(5)  # item 1 is still running when the failure is raised

    with pytest.raises(JobError, match="job 0 FAILED"):
        run_concurrently(list(range(6)), 2, run)
    release.set()
    time.sleep(0.1)
    assert sorted(started) == [0, 1]  # items 2..5 were cancelled before they started
