"""MLflow bookkeeping of the jobs. Two jobs that start together both find the experiment missing; the one that loses
the race to create it must use the winner's instead of failing (the demo's two first training runs did, once). A
sweep that keeps runs of an earlier invocation re-parents them, so its parent run lists every child."""

from __future__ import annotations

from mlflow import MlflowClient

from ppd_ray.tracking import _experiment_id, attach_to_parent


class _LateLookup:
    """A real client whose first lookup answers as it did before the other job created the experiment."""

    def __init__(self, client: MlflowClient) -> None:
        self.client, self.lookups = client, 0

    def get_experiment_by_name(self, name):
        self.lookups += 1
        return None if self.lookups == 1 else self.client.get_experiment_by_name(name)

    def create_experiment(self, name):
        return self.client.create_experiment(name)


def test_the_job_that_loses_the_race_to_create_the_experiment_uses_the_winners(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    winner = client.create_experiment("ppd")  # the other job's create, between our lookup and our create
    assert _experiment_id(_LateLookup(client), "ppd") == winner
    assert [e.name for e in client.search_experiments()].count("ppd") == 1
    assert _experiment_id(client, "another") == client.get_experiment_by_name("another").experiment_id  # created


def test_a_run_kept_from_an_earlier_sweep_becomes_a_child_of_the_new_parent(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("ppd")
    old_parent, new_parent = (client.create_run(experiment).info.run_id for _ in range(2))
    kept = client.create_run(experiment, tags={"mlflow.parentRunId": old_parent}).info.run_id

    attach_to_parent(uri, kept, new_parent)

    def children(parent: str) -> list[str]:
        found = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
        return [run.info.run_id for run in found]

    assert children(new_parent) == [kept] and children(old_parent) == []
