"""Shared fixtures: offline hub, one local Ray per session, a small toy world."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(autouse=True, scope="session")
def progress_lines():
    """The progress lines every entry point sets up (`setup_logging`), also for jobs' `run` called in-process: a test
    that reads them must not depend on an earlier test having gone through a CLI."""
    from ppd_ray.console import setup_logging

    setup_logging()


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray shared by every test that needs one (start-up costs seconds)."""
    import ray

    from ppd_ray.infra.ray_auth import use_private_token

    if not ray.is_initialized():
        use_private_token()  # as every Ray the project starts: a token of its own, never the one in $HOME
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smoke_config():
    from ppd.config import smoke

    return smoke()


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory, smoke_config) -> Path:
    """The smoke-preset toy world (seed 0), written once per session."""
    from ppd.data.toyworld import write_toy_world

    out = tmp_path_factory.mktemp("toy")
    write_toy_world(out, smoke_config.data.toy, seed=0)
    return out
