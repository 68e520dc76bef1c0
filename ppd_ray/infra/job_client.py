"""Ray Jobs from Python: submit an entrypoint to a head's Jobs API and follow it to the end, as `ray job submit` does.

`submit_and_wait` uploads the working directory, streams the job's log lines as the driver writes them
(`JobSubmissionClient.tail_job_logs`), and turns a job that did not succeed into a JobError carrying the tail of its
logs. Paths passed to a job must be absolute: the job runs in an uploaded copy of the working directory, without
its git-ignored files.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import tenacity

from ppd_ray.console import JobError
from ppd_ray.infra.ray_auth import TOKEN_HELP, bearer, user_token_headers

logger = logging.getLogger(__name__)

# Files a job never needs (and that must not be uploaded with the working directory).
DEFAULT_EXCLUDES = [".venv/", ".git/", "runs/", ".cache/", "**/__pycache__/", ".pytest_cache/", ".ruff_cache/"]


@dataclass(frozen=True)
class JobOutcome:
    """A finished job: its id, final status and complete logs."""

    job_id: str
    status: str
    logs: str


# Ray's client logs each upload at INFO (one "Ignoring upload to cluster for these files" line per .gitignore it
# finds, "package already exists", "WebSocket closed"): ~180 lines in a demo's terminal that say nothing to a user.
RAY_UPLOAD_LOGGERS = (
    "ray._private.runtime_env.packaging",
    "ray.dashboard.modules.dashboard_sdk",
    "ray.dashboard.modules.job.sdk",
)
# Ray warns once per process that it now leaves .git/ and .venv/ out of a working_dir; DEFAULT_EXCLUDES does too.
_DEFAULT_EXCLUDE_NOTICE = "is now ignored by default when packaging"


def _drop_default_exclude_notice(record: logging.LogRecord) -> bool:
    return _DEFAULT_EXCLUDE_NOTICE not in str(record.msg)


def quiet_ray_uploads() -> None:
    """Keep Ray's per-upload INFO chatter out of the terminal; its warnings and errors still show (idempotent)."""
    for name in RAY_UPLOAD_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    working_dir_logger = logging.getLogger("ray._private.runtime_env.working_dir")
    if _drop_default_exclude_notice not in working_dir_logger.filters:
        working_dir_logger.addFilter(_drop_default_exclude_notice)


def jobs_client(address: str, token: str | None = None):
    """A Jobs API client sending `token` (None: the user's own token, if any); a refused token is a JobError."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    quiet_ray_uploads()
    headers = bearer(token) if token is not None else user_token_headers()
    try:
        return JobSubmissionClient(address, headers=headers)  # its version check is the first authenticated call
    except AuthenticationError:
        have = "a token that the head refused" if headers else "no token"
        raise JobError(
            f"the Ray head at {address} requires token auth and this client has {have}: {TOKEN_HELP}"
        ) from None


def submit_job(
    address: str,
    entrypoint: Sequence[str] | str,
    *,
    working_dir: str | Path = ".",
    env_vars: dict[str, str] | None = None,
    excludes: Sequence[str] = DEFAULT_EXCLUDES,
    token: str | None = None,
) -> str:
    """Submit `entrypoint` (run in an uploaded copy of `working_dir`) to the head at `address`; returns the job id.

    `token`: the head's auth token (a `LocalCluster` passes its own); None = the user's own token, as `ray job submit`.
    """
    command = entrypoint if isinstance(entrypoint, str) else shlex.join(str(part) for part in entrypoint)
    runtime_env = {
        "working_dir": str(Path(working_dir).resolve()),
        "excludes": list(excludes),
        "env_vars": {**_forwarded_env(), **(env_vars or {})},
    }
    job_id = jobs_client(address, token).submit_job(entrypoint=command, runtime_env=runtime_env)
    logger.info(f"submitted job {job_id}: {command}")
    return job_id


def wait_for_job(
    address: str,
    job_id: str,
    *,
    timeout_s: float = 1800,
    on_log: Callable[[str], None] | None = None,
    token: str | None = None,
) -> JobOutcome:
    """Follow a job's log until it ends, passing each line to `on_log`; JobError (with the log tail) unless
    SUCCEEDED. Past `timeout_s` the job is stopped."""
    from ray.job_submission import JobStatus

    client = jobs_client(address, token)
    try:
        asyncio.run(asyncio.wait_for(_follow_log(client, job_id, on_log or (lambda line: None)), timeout_s))
    except TimeoutError:
        client.stop_job(job_id)
        raise JobError(
            f"job {job_id} still {client.get_job_status(job_id)} after {timeout_s:.0f}s (stopped it); last logs:\n"
            f"{_tail(client.get_job_logs(job_id))}"
        ) from None
    except RuntimeError as err:  # the log stream broke off (e.g. the head went away)
        raise JobError(f"lost the log stream of job {job_id}: {err}") from None
    # The stream closes once the job is terminal; its status may be recorded a moment later.
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    status = tenacity.Retrying(
        stop=tenacity.stop_after_delay(30),
        wait=tenacity.wait_fixed(0.5),
        retry=tenacity.retry_if_result(lambda status: status not in terminal),
        retry_error_callback=lambda state: state.outcome.result(),
    )(client.get_job_status, job_id)
    logs = client.get_job_logs(job_id)
    if status != JobStatus.SUCCEEDED:
        message = (client.get_job_info(job_id).message or "").splitlines()[:1]
        raise JobError(f"job {job_id} {status} ({' '.join(message)}); last log lines:\n{_tail(logs)}")
    logger.info(f"job {job_id} SUCCEEDED")
    return JobOutcome(job_id, str(status), logs)


async def _follow_log(client, job_id: str, on_line: Callable[[str], None]) -> None:
    pending = ""  # chunks end anywhere: a line is passed on once its newline has arrived
    async for chunk in client.tail_job_logs(job_id):
        *lines, pending = (pending + chunk).split("\n")
        for line in lines:
            on_line(line)
    if pending:
        on_line(pending)


def submit_and_wait(
    address: str,
    entrypoint: Sequence[str] | str,
    *,
    working_dir: str | Path = ".",
    env_vars: dict[str, str] | None = None,
    excludes: Sequence[str] = DEFAULT_EXCLUDES,
    timeout_s: float = 1800,
    on_log: Callable[[str], None] | None = None,
    token: str | None = None,
) -> JobOutcome:
    """`submit_job` then `wait_for_job`: what `ray job submit` does, from Python."""
    job_id = submit_job(address, entrypoint, working_dir=working_dir, env_vars=env_vars, excludes=excludes, token=token)
    return wait_for_job(address, job_id, timeout_s=timeout_s, on_log=on_log, token=token)


def _forwarded_env() -> dict[str, str]:
    # Settings the job must see as this process does: offline hub, the DeepSpeed op cache.
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TORCH_EXTENSIONS_DIR", "RAY_USAGE_STATS_ENABLED")
    return {name: os.environ[name] for name in names if name in os.environ}


def _tail(logs: str, lines: int = 40) -> str:
    return "\n".join(logs.rstrip().splitlines()[-lines:])
