"""What a job submission shows in the terminal: Ray's per-upload INFO lines are dropped, its warnings are not."""

from __future__ import annotations

import logging

import pytest

from ppd_ray.infra.job_client import quiet_ray_uploads


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def ray_lines():
    """Every line Ray's own loggers emit while the test runs (Ray's modules log under the `ray` logger)."""
    import ray._private.runtime_env.packaging  # noqa: F401  (configures Ray's loggers as a submission does)

    collect = _Collect()
    ray_logger = logging.getLogger("ray")
    ray_logger.addHandler(collect)
    try:
        yield collect.messages
    finally:
        ray_logger.removeHandler(collect)


def test_upload_chatter_is_dropped_but_warnings_stay(ray_lines):
    packaging = logging.getLogger("ray._private.runtime_env.packaging")
    working_dir = logging.getLogger("ray._private.runtime_env.working_dir")
    packaging.setLevel(logging.INFO)
    packaging.info("before: Ignoring upload to cluster for these files: [.gitignore]")
    quiet_ray_uploads()
    quiet_ray_uploads()  # idempotent: one filter, not two
    packaging.info("Ignoring upload to cluster for these files: [.gitignore]")
    logging.getLogger("ray.dashboard.modules.job.sdk").info("WebSocket closed for job raysubmit_x")
    packaging.warning("package is large: 600 MiB")
    working_dir.warning("Directory '.git' is now ignored by default when packaging the working directory.")
    working_dir.warning("working_dir does not exist")
    assert ray_lines == [
        "before: Ignoring upload to cluster for these files: [.gitignore]",
        "package is large: 600 MiB",
        "working_dir does not exist",
    ]
    assert len(working_dir.filters) == 1
