"""Stage-2 fixtures shared by the training, tracking and Jobs API tests (module-scoped, as each module had them).

The expensive outputs behind them (precomputed inputs, the baseline run) are cached per session by the plain
functions in `tests.helpers`; the fixtures only wire them up and own the session's MLflow server.
"""

from __future__ import annotations

import pytest

from ppd_ray.infra.mlflow_server import start_mlflow_server
from tests.helpers import Stage2Inputs, baseline_run, mlflow_store, stage2_inputs


@pytest.fixture(scope="module")
def inputs(ray_local, tmp_path_factory, toy_world, smoke_config) -> Stage2Inputs:
    return stage2_inputs(tmp_path_factory, toy_world, smoke_config)


@pytest.fixture(scope="session")
def tracking(tmp_path_factory):
    """One MLflow server for the session's store (starting one costs ~10 s; every module logs to the same store)."""
    server = start_mlflow_server(mlflow_store(tmp_path_factory))
    yield server.uri
    server.stop()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, smoke_config, inputs, tracking):
    return baseline_run(tmp_path_factory, smoke_config, inputs, tracking)
