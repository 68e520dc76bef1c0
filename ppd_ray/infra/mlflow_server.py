"""The MLflow tracking server of the embedded default: a real `mlflow server` on loopback, started and stopped here.

Multi-node workers cannot share a sqlite file, so even locally every run goes through a server process (sqlite
backend store, local artifact root).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ppd_ray.infra.processes import LocalProcess, free_port, http_ok, start_process, wait_until

logger = logging.getLogger(__name__)


@dataclass
class MlflowServer(LocalProcess):
    """A running `mlflow server` process group bound to 127.0.0.1."""

    uri: str = ""


def start_mlflow_server(root: Path, port: int | None = None, timeout_s: float = 90.0) -> MlflowServer:
    """Start `mlflow server` with a sqlite store and artifacts under `root`; wait until /health answers."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    # MLflow 3 also starts huey job-runner processes (~6 x 240 MB) for its server-side jobs, which we never use.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    started = start_process(command, root / "server.log", env=env)
    server = MlflowServer(started.process, started.log_path, uri=f"http://127.0.0.1:{port}")
    try:
        wait_until(lambda: http_ok(f"{server.uri}/health"), timeout_s=timeout_s, what="mlflow server", process=server)
    except BaseException:
        server.stop()
        raise
    logger.info(f"MLflow server at {server.uri} (store {root})")
    return server


@contextmanager
def tracking_uri(configured: str | None, root: Path) -> Iterator[str]:
    """The configured tracking URI (else MLFLOW_TRACKING_URI), or a loopback server under `root` while the block runs.

    The environment variable is how a driver that started a server (`ppd demo`) hands it to the jobs it submits."""
    configured = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        yield configured
        return
    server = start_mlflow_server(root)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = server.uri
    try:
        yield server.uri
    finally:
        server.stop(timeout_s=20)
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
