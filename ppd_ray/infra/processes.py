"""Processes this project starts on this machine (a Ray node, the MLflow server; in tests `ppd serve` and a vLLM
server): free loopback ports, a process in a session of its own with its output in a log file, and waiting until
it answers."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import not_
from pathlib import Path

import tenacity

from ppd_ray.console import JobError


def path_with_interpreter_bin(path: str | None = None) -> str:
    """`path` (default: this process's PATH) with this interpreter's bin/ first, once: what the environment installed
    (`python`, `ray`, pip's `ninja`) wins over the system's even when the virtualenv was never activated."""
    env_bin = str(Path(sys.executable).parent)
    rest = [entry for entry in (os.environ.get("PATH", "") if path is None else path).split(os.pathsep) if entry]
    return os.pathsep.join([env_bin, *(entry for entry in rest if entry != env_bin)])


# Ray's default worker ports (`--min-worker-port` / `--max-worker-port`): a Ray that `ppd serve` starts uses them.
_RAY_DEFAULT_WORKER_PORTS = (10002, 19999)
# Where /proc does not say: Linux's default range widened to cover macOS's and the BSDs' (49152-65535) too.
_FALLBACK_EPHEMERAL_PORTS = (32768, 65535)


def ephemeral_port_range() -> tuple[int, int]:
    """The ports the kernel hands to sockets bound to port 0 (`ip_local_port_range`), inclusive."""
    try:
        low, high = (int(p) for p in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return _FALLBACK_EPHEMERAL_PORTS
    return low, high


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports free right now (all held open until every one is chosen).

    Chosen outside the kernel's ephemeral range and Ray's worker ports: between this check and the server's own bind,
    a port from the ephemeral range can be handed to any other socket, and a Ray node opens hundreds (a test's
    `ppd serve` once failed with "Failed to bind to address" that way)."""
    low, high = ephemeral_port_range()
    candidates = [port for port in range(_RAY_DEFAULT_WORKER_PORTS[1] + 1, 65536) if not low <= port <= high]
    random.SystemRandom().shuffle(candidates)  # not seeded: two processes must not try the same order
    sockets = []
    try:
        for port in candidates:
            if len(sockets) == count:
                break
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # taken
                sock.close()
                continue
            sockets.append(sock)
        if len(sockets) < count:
            raise JobError(f"found only {len(sockets)} of {count} free loopback ports outside {low}-{high}")
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """One loopback port free right now."""
    return free_ports(1)[0]


@dataclass
class LocalProcess:
    """A process started by `start_process`: the leader of a process group of its own, its output in `log_path`."""

    process: subprocess.Popen
    log_path: Path

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int | None = 2000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text if chars is None else text[-chars:]

    def kill(self) -> None:
        """Lose the whole group at once, as a crashed machine would (SIGKILL)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM to the leader (it shuts its own children down, as `ray start` does), then SIGKILL to
        whatever is left of the group."""
        if self.running:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


def start_process(command: Sequence[str], log_path: Path, env: dict[str, str] | None = None, cwd=None) -> LocalProcess:
    """Start `command` in a session of its own (Ctrl-C in the terminal reaches us first, and the group can be
    stopped as one unit), stdout and stderr appended to `log_path`."""
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            list(command), stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
    return LocalProcess(process, Path(log_path))


def wait_until(
    ready: Callable[[], bool], *, timeout_s: float, what: str, process: LocalProcess | None = None, poll_s: float = 0.5
) -> None:
    """Poll `ready` until it is true; a JobError (with the log tail) if `process` exits first or time runs out."""

    def check() -> bool:
        if process is not None and not process.running:
            raise JobError(
                f"the process exited with status {process.process.returncode} while waiting for {what}:\n"
                f"{process.log_tail()}"
            )
        return ready()

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(timeout_s),
        wait=tenacity.wait_fixed(poll_s),
        retry=tenacity.retry_if_result(not_),  # an exception (the process exited) ends the wait at once
    )
    try:
        retrying(check)
    except tenacity.RetryError:
        tail = f":\n{process.log_tail()}" if process is not None else ""
        raise JobError(f"timed out after {timeout_s:.0f}s waiting for {what}{tail}") from None


def http_ok(url: str, headers: dict[str, str] | None = None, timeout_s: float = 2) -> bool:
    """True when GET `url` answers 200 (False while nothing listens there yet)."""
    import httpx

    try:
        return httpx.get(url, headers=headers, timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False
