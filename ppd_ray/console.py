"""What a person sees of a job or a command: one-line errors (`JobError`) and progress lines on stderr (`logging`).

Modules log through `logging.getLogger(__name__)`; `setup_logging()` (called by every entry point, and by Ray actors
and Train workers, which are processes of their own) gives the `ppd_ray` logger one stderr handler whose lines read
`[ppd   12.3s] message` (seconds since the process started logging). `ppd demo` forwards exactly these lines (and
error lines) from the jobs' logs to the terminal: `progress_line`.
"""

from __future__ import annotations

import logging
import re
import sys

ROOT_LOGGER = "ppd_ray"
LINE_PREFIX = "[ppd "


class JobError(RuntimeError):
    """A problem the user can fix (bad input, bad config): printed as one line, never as a traceback."""

    exit_code = 2


class _ElapsedFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{LINE_PREFIX}{record.relativeCreated / 1000:7.1f}s] {record.getMessage()}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a line is logged (test runners swap it for each command)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(_ElapsedFormatter())

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Progress lines of every `ppd_ray` module on stderr (idempotent: one handler per process)."""
    # A job runs as `python -m ppd_ray.jobs.<job>`: its own module's logger is then `__main__`, outside `ppd_ray`.
    for name in (ROOT_LOGGER, "__main__"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = False  # Ray and pytest configure the root logger their own way
        if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
            logger.addHandler(_StderrHandler())


# Ray prefixes what its worker processes print with the process, coloured: "\x1b[36m(RayTrainWorker pid=3765)\x1b[0m "
# (a Ray Data actor: "(MapWorker(MapBatches(Generator)) pid=12, ip=10.0.0.2)"). Training progress comes so.
_RAY_PROCESS_PREFIX = re.compile(r"^(?:\x1b\[[\d;]*m)?\(.*? pid=\d+(?:, ip=[^)]*)?\)(?:\x1b\[[\d;]*m)?\s*")


# Lines that mention "error" without being one: Ray's system processes logging their own shutdown (the GCS's
# "KillActor RPC failed ... RpcError" as a job's workers exit) and Ray Train echoing each report, whose metrics
# include our `model_error_*` / `ref_error_*`.
_RAY_SYSTEM_PROCESS = re.compile(r"\(pid=(?:gcs_server|raylet|log_monitor|dashboard\w*)\)")
_RAY_TRAIN_REPORT_ECHO = "Reporting training result"


def progress_line(line: str) -> str | None:
    """The part of a job's log line worth showing in the terminal — our own progress lines (also those of the job's
    Ray workers, without Ray's process prefix) and errors — or None."""
    text = _RAY_PROCESS_PREFIX.sub("", line, count=1)
    if text.startswith(LINE_PREFIX):
        return text
    if "error" not in text.lower() or _RAY_SYSTEM_PROCESS.search(line) or text.startswith(_RAY_TRAIN_REPORT_ECHO):
        return None
    return text
