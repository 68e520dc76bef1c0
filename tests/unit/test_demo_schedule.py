"""How the demo runs its jobs: the training runs side by side (`train.concurrent_runs` at a time), everything else
alone and in order, and a failing job stops what has not started."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from ppd.config import ATTRIBUTES, ConfigError, smoke, tiny_cpu
from ppd_ray.console import JobError
from ppd_ray.pipelines.demo import _waves, clear_earlier_outputs, demo_jobs, run_concurrently
from tests.helpers import one_reward_world


def test_the_nine_training_runs_form_one_wave_between_precompute_and_evaluate(tmp_path):
    jobs = demo_jobs(tiny_cpu(), tmp_path / "work", [], 0, one_reward_world(tmp_path))
    waves = _waves(list(enumerate(jobs.stages, 1)))
    titles = [[stage.title for _, stage in wave] for wave in waves]
    (training,) = [wave for wave in titles if len(wave) > 1]
    assert len(training) == 9 and all(title.startswith("train ") for title in training)
    assert all(len(wave) == 1 for wave in titles if wave is not training)
    position = titles.index(training)
    assert titles[position - 1] == ["precompute population"] and titles[position + 1][0].startswith("evaluate")
    # every stage keeps its place in the order (waves are consecutive runs of the list)
    assert [index for wave in waves for index, _ in wave] == list(range(1, len(jobs.stages) + 1))


def _upper_bound_users(cfg, tmp_path) -> dict[str, list[str]]:
    """The DPO upper-bound runs a demo plans: variant -> its `train.users=[...]` overrides."""
    jobs = demo_jobs(cfg, tmp_path / "work", [], 0, one_reward_world(tmp_path))
    return {
        Path(stage.argv[stage.argv.index("--out") + 1]).name: [a for a in stage.argv if a.startswith("train.users=")]
        for stage in jobs.stages
        if stage.title.startswith("train the DPO upper bound")
    }


def test_the_demo_trains_the_upper_bounds_of_the_rewards_it_is_given(tmp_path):
    world = one_reward_world(tmp_path)
    ids = json.loads((world / "manifest.json").read_text())["one_reward_users"]
    every = _upper_bound_users(tiny_cpu(), tmp_path)
    assert every == {f"dpo_upper_{a}": [f"train.users=[{ids[a]}]"] for a in ATTRIBUTES}
    # the smoke preset: brightness's alone (the demo test checks that reward)
    assert _upper_bound_users(smoke(), tmp_path) == {"dpo_upper_brightness": [f"train.users=[{ids['brightness']}]"]}
    with pytest.raises(ConfigError, match="unknown reward.*sharpness"):
        smoke().with_overrides(["train.upper_bound_rewards=[brightness, sharpness]"])


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


def test_a_fresh_run_removes_what_an_earlier_run_left_in_its_workdir_but_keeps_mlflow(tmp_path):
    """A rerun of `ppd demo` after a config change: the old training folders would be refused, old embeddings kept."""
    work = tmp_path / "work"
    work.mkdir()
    world = one_reward_world(work)  # the demo's own toy world folder: written before the jobs, never removed here
    jobs = demo_jobs(tiny_cpu(), work, [], 0, world)
    earlier = [work / "runs" / "ppd" / "ray" / "checkpoint", work / "embeddings" / "one_reward" / "part-0.parquet"]
    earlier += [work / "eval" / "results.json", work / "mlflow" / "mlflow.db", work / "timings.json"]
    for path in earlier:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("from an earlier run")
    removed = clear_earlier_outputs(jobs)
    assert not (work / "runs" / "ppd").exists() and not (work / "embeddings" / "one_reward").exists()
    assert not (work / "eval").exists() and not (work / "timings.json").exists()
    assert (work / "mlflow" / "mlflow.db").read_text() == "from an earlier run"  # runs to compare with stay
    assert (world / "manifest.json").is_file()
    assert all(path.is_relative_to(work) for path in removed)
    assert clear_earlier_outputs(jobs) == []  # nothing left to remove


def test_a_finished_stage_is_kept_only_when_the_same_command_wrote_it(tmp_path):
    from ppd_ray.pipelines.demo import JobSequence, keep_or_clear, record_finished

    def training(*overrides: str):
        jobs = JobSequence(tmp_path / "work", "smoke", ["data.seed=0"])
        jobs.train("train", tmp_path / "inputs", "ppd_beta2", "train.beta=2", *overrides)
        return jobs.stages[0]

    stage = training("tracking.parent_run_id=aaa")
    run_dir = stage.output.parent
    assert not keep_or_clear(stage)  # nothing there yet
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint").write_text("weights")
    stage.output.write_text("{}")
    # an output without a record of its command (an older run): cleared with its run folder, run again
    assert not keep_or_clear(stage) and not run_dir.exists()
    run_dir.mkdir(parents=True)
    stage.output.write_text("{}")
    record_finished(stage)
    assert keep_or_clear(stage) and stage.output.is_file()
    # another MLflow parent is not another run (a sweep's parent is new on every invocation)
    assert keep_or_clear(training("tracking.parent_run_id=bbb"))
    # other settings are: the folder goes, so the training job does not meet another config's checkpoints
    assert not keep_or_clear(training("tracking.parent_run_id=aaa", "train.max_steps=800"))
    assert not run_dir.exists()


def test_the_machine_a_runtime_was_measured_on_is_recorded():
    import torch

    from ppd_ray.pipelines.demo import machine_facts

    threads = torch.get_num_threads()
    facts = machine_facts(seconds=0.2)
    assert facts["logical_cpus"] >= 1 and facts["gflops_one_core"] > 0 and facts["cpu"]
    assert facts["vector_unit"] in {"AVX-512", "AVX2", "AVX", "SSE", "unknown"}
    assert torch.get_num_threads() == threads  # measured on one core, the caller's setting restored


def test_the_toy_world_is_drawn_while_the_services_start_and_its_failure_stops_them(tmp_path, monkeypatch):
    """The Ray head and the MLflow server start beside the toy world's generation; a world that cannot be drawn
    is reported as itself, and both services are stopped again."""
    from contextlib import contextmanager

    import ppd_ray.infra.local_cluster as local_cluster
    import ppd_ray.infra.mlflow_server as mlflow_server
    from ppd_ray.pipelines.demo import run_demo

    events: list[tuple[str, float]] = []
    began = time.monotonic()

    def note(event: str) -> None:
        events.append((event, time.monotonic() - began))

    @contextmanager
    def service(name: str):
        note(f"{name} starting")
        time.sleep(0.3)
        note(f"{name} up")
        try:
            yield name
        finally:
            note(f"{name} stopped")

    monkeypatch.setattr(mlflow_server, "tracking_uri", lambda configured, root: service("mlflow"))
    monkeypatch.setattr(local_cluster, "local_head", lambda: service("head"))

    def generate_world(cfg, world, seed) -> None:
        note("world started")
        time.sleep(0.5)
        raise ValueError("the toy world cannot be drawn")

    with pytest.raises(ValueError, match="cannot be drawn"):
        run_demo(smoke(), tmp_path / "work", tmp_path / "out", [], 0, "ppd demo", generate_world)
    at = dict(events)
    assert at["world started"] < at["mlflow up"]  # drawn while the services start, not before them
    assert {"mlflow stopped", "head stopped"} <= set(at)
    assert not (tmp_path / "work" / "jobs.sh").exists()  # no job was planned
