"""MLflow runs: opened and closed by a job's driver, written to by rank 0, compared side by side (`ppd runs compare`).

Where the runs go: `cfg.tracking.uri`, else MLFLOW_TRACKING_URI, else a loopback server
(`ppd_ray.infra.mlflow_server.tracking_uri`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path

from ppd_ray.console import JobError

logger = logging.getLogger(__name__)


# --- runs: opened and closed by the job driver, written to by rank 0 ------------------------------------------------

# MLflow accepts at most this many params per log_batch call.
_PARAMS_PER_BATCH = 100


def _experiment_id(client, name: str) -> str:
    """The experiment's id, created if missing. Jobs that start together (the demo's concurrent training runs) may
    both find it missing: the second create fails with RESOURCE_ALREADY_EXISTS, and the first one's is used."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def open_run(uri: str, experiment: str, run_name: str, tags: dict[str, str], resume_run_id: str | None = None) -> str:
    """The id of a RUNNING run in `experiment`: `resume_run_id` when it exists there (a restarted job), else a new one."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    experiment_id = _experiment_id(client, experiment)
    if resume_run_id:
        try:
            run = client.get_run(resume_run_id)
        except MlflowException:
            run = None
        if run is not None and run.info.experiment_id == experiment_id:
            client.update_run(resume_run_id, status="RUNNING")
            return resume_run_id
    return client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id


def log_metrics(uri: str, run_id: str, metrics: dict[str, float]) -> None:
    """Add metrics to an existing run (e.g. a sweep's validation score on each of its training runs)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))


def attach_to_parent(uri: str, run_id: str, parent_run_id: str) -> None:
    """Make `run_id` a child of `parent_run_id` (MLflow's nesting tag), e.g. a run a new sweep kept from an earlier one."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=uri).set_tag(run_id, "mlflow.parentRunId", parent_run_id)


def close_run(uri: str, run_id: str, status: str) -> None:
    """End a run as FINISHED, FAILED or KILLED."""
    from mlflow import MlflowClient

    with _urls_to_stderr():
        MlflowClient(tracking_uri=uri).set_terminated(run_id, status=status)


def _urls_to_stderr():
    # MLflow prints "View run ... at: <url>" on stdout when a run ends: useful, but stdout carries the job's result.
    return contextlib.redirect_stdout(sys.stderr)


class RunLogger:
    """What rank 0 writes into the driver's run: params, per-step metrics, artifacts, the registered adapter."""

    def __init__(self, uri: str, run_id: str) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id

    def started(self, params: dict[str, str]) -> None:
        """Mark the run RUNNING (again, after a restart) and log the params it does not have yet."""
        from mlflow.entities import Param

        self.client.update_run(self.run_id, status="RUNNING")
        logged = self.client.get_run(self.run_id).data.params
        new = [Param(key, value) for key, value in params.items() if key not in logged]
        for start in range(0, len(new), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[start : start + _PARAMS_PER_BATCH])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def failed(self, error: BaseException) -> None:
        """Record why this attempt failed; the run ends FAILED unless Ray restarts the workers and they finish."""
        first_line = (str(error).strip().splitlines() or [""])[0][:4000]
        self.client.set_tag(self.run_id, "ppd.last_error", f"{type(error).__name__}: {first_line}")
        with _urls_to_stderr():
            self.client.set_terminated(self.run_id, status="FAILED")

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, local_file: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_file), artifact_path)

    def register(self, model_name: str, artifact_path: str, tags: dict[str, str]) -> str:
        """Register `artifact_path` of this run as a version of `model_name` (once per run); returns the version."""
        from mlflow.exceptions import MlflowException

        existing = self.client.search_model_versions(f"name='{model_name}' and run_id='{self.run_id}'")
        if existing:
            return str(existing[0].version)
        try:
            self.client.create_registered_model(model_name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # mlflow.register_model("runs:/...") wants a logged model (MLflow 3); a plain artifact folder is registered
        # by its artifact URI instead.
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
        version = self.client.create_model_version(model_name, source=source, run_id=self.run_id, tags=tags)
        return str(version.version)


def log_finished_run(
    uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, str],
    metrics: dict[str, float],
    artifacts: list[tuple[Path, str]],
    tags: dict[str, str] | None = None,
) -> str:
    """One complete run (params, final metrics, artifact files) for a job that is not a training run (evaluate)."""
    run_id = open_run(uri, experiment, run_name, tags or {})
    logger = RunLogger(uri, run_id)
    try:
        logger.started(params)
        logger.log_metrics(0, {k: v for k, v in metrics.items() if v == v})  # NaN (no data) is not a metric
        for local_file, artifact_path in artifacts:
            logger.log_artifact(local_file, artifact_path)
    except BaseException as err:
        logger.failed(err)
        raise
    close_run(uri, run_id, "FINISHED")
    return run_id


# Params that differ between runs without being a setting (where the job's uploaded copy of the repo lived).
_LOCATION_PARAMS = {"model.cache_dir", "model.stage_c_path", "model.decoder_path", "train.storage_path"}


def compare_runs(uri: str, experiment: str, max_runs: int = 20, include_evaluations: bool = False) -> str:
    """A side-by-side table of an experiment's training runs: the params that differ, then the final metrics.

    Evaluation runs (hundreds of metrics each) are left out unless `include_evaluations`."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise JobError(f"no experiment named {experiment!r} at {uri}")
    runs = client.search_runs([found.experiment_id], max_results=max_runs, order_by=["attributes.start_time ASC"])
    if not include_evaluations:
        runs = [r for r in runs if r.data.tags.get("ppd.job") != "evaluate"]
    if not runs:
        return f"experiment {experiment!r} has no runs"
    params = sorted({k for r in runs for k in r.data.params})
    differing = [k for k in params if len({r.data.params.get(k) for r in runs}) > 1 and k not in _LOCATION_PARAMS]
    metrics = sorted({k for r in runs for k in r.data.metrics})
    header = ["", *[r.info.run_name or r.info.run_id[:8] for r in runs]]
    rows = [["status", *[r.info.status for r in runs]]]
    rows += [[k, *[_short(r.data.params.get(k, "-")) for r in runs]] for k in differing]
    rows += [[k, *[_fmt(r.data.metrics.get(k)) for r in runs]] for k in metrics]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _short(text: str, width: int = 24) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
