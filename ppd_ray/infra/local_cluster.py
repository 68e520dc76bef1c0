"""Ray Jobs on this machine: a local head (and extra nodes) started with `ray start`, jobs submitted and followed.

The documented way to run a job is the CLI against a head's dashboard:

    ray start --head --num-cpus 2 --dashboard-host 127.0.0.1
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m ppd_ray.jobs.prepare --input /abs/toy/pairs/population --out /abs/prepared

`local_head()` does the first line on free ports, in a temporary directory of its own with a token of its own
(`ppd_ray.infra.ray_auth`: nothing read from or written to the user's home directory), and stops exactly the processes it
started (never `ray stop`, which would stop every Ray on the machine). `submit_and_wait` does the second
through the Python `JobSubmissionClient`: it polls, streams the job's log lines, and turns a failed job into a
JobError carrying the tail of its logs. Paths passed to a job must be absolute: the job runs in an uploaded copy of
the working directory, without its git-ignored files.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ppd_ray.infra.ray_auth import TOKEN_HELP, bearer, new_token_file, token_env, user_token_headers
from ppd_ray.jobs.common import JobError, log

# Files a job never needs (and that must not be uploaded with the working directory).
DEFAULT_EXCLUDES = [".venv/", ".git/", "runs/", ".cache/", "**/__pycache__/", ".pytest_cache/", ".ruff_cache/"]


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class RayNode:
    """One `ray start --block` process group (a node of the local cluster)."""

    process: subprocess.Popen
    log_path: Path
    num_cpus: float

    def kill(self) -> None:
        """Lose the node abruptly, as a crashed machine would: SIGKILL to its whole process group."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, timeout_s: float = 30) -> None:
        """Stop the node cleanly (SIGTERM lets `ray start` drain and stop its processes), then clear leftovers."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # workers left by a node that did not drain in time
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


@dataclass
class LocalCluster:
    """A Ray cluster of `ray start` processes on this machine."""

    dashboard_address: str  # http://127.0.0.1:<port>: what `ray job submit --address` and the Jobs API take
    gcs_address: str  # 127.0.0.1:<port>: what `ray start --address` and `ray.init(address=...)` take
    temp_dir: Path
    token_path: Path  # this cluster's own auth token (Ray 2.60 token mode): every node, job and client uses it
    head: RayNode
    nodes: list[RayNode] = field(default_factory=list)
    nodes_started: int = 0  # names each node's log: a new log per node, even after others were killed

    def add_node(self, num_cpus: float, timeout_s: float = 120) -> RayNode:
        """Start a worker node with `num_cpus` logical CPUs; returns once it has joined the cluster."""
        command = ["--address", self.gcs_address, *_node_arguments(num_cpus)]
        self.nodes_started += 1
        node = _start_ray(command, self.temp_dir / f"node-{self.nodes_started}.log", num_cpus, self.token_path)
        self.nodes.append(node)
        # `ray start` prints this once its raylet has registered with the head.
        _wait_for(lambda: _STARTED in _log_tail(node, None), timeout_s, f"a node with {num_cpus} CPU(s) to join", node)
        return node

    def kill_node(self, node: RayNode) -> None:
        """Kill a worker node as a machine failure would; the head notices within its health-check period."""
        node.kill()
        self.nodes.remove(node)

    @property
    def auth_token(self) -> str:
        """The token clients of this cluster send (`Authorization: Bearer <token>`)."""
        return self.token_path.read_text().strip()

    def submit_and_wait(self, entrypoint: Sequence[str] | str, **options) -> JobOutcome:
        """`submit_and_wait` against this cluster's Jobs API with its token."""
        return submit_and_wait(self.dashboard_address, entrypoint, token=self.auth_token, **options)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        self.nodes.clear()
        self.head.stop()


@contextlib.contextmanager
def local_head(num_cpus: float = 2, *, timeout_s: float = 180) -> Iterator[LocalCluster]:
    """`ray start --head` on free loopback ports in a private temporary directory; yields the cluster, stops it after.

    Add worker nodes with `cluster.add_node(num_cpus)`; submit jobs to `cluster.dashboard_address`.
    """
    # Short path: Ray's socket paths under it must stay below the 107-character limit of Unix sockets.
    temp_dir = Path(tempfile.mkdtemp(prefix="ppd-ray-", dir="/tmp"))
    token_path = new_token_file(temp_dir)
    gcs, dashboard, client = _free_ports(3)
    command = [
        "--head",
        "--port",
        str(gcs),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--ray-client-server-port",
        str(client),
        *_node_arguments(num_cpus),
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
    ]
    head = _start_ray(command, temp_dir / "head.log", num_cpus, token_path)
    cluster = LocalCluster(f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}", temp_dir, token_path, head)
    try:
        _wait_for(
            lambda: _dashboard_up(cluster.dashboard_address, cluster.auth_token),
            timeout_s,
            "the Ray head's dashboard",
            head,
        )
        log(f"Ray head at {cluster.gcs_address}, dashboard {cluster.dashboard_address}")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _node_arguments(num_cpus: float) -> list[str]:
    """What every `ray start` here passes, head or worker: its CPUs, loopback, and free ports of its own."""
    node_manager, object_manager, metrics, agent, agent_grpc, runtime_env = _free_ports(6)
    return [
        "--num-cpus",
        str(num_cpus),
        "--node-ip-address",
        "127.0.0.1",
        "--node-manager-port",
        str(node_manager),
        "--object-manager-port",
        str(object_manager),
        "--metrics-export-port",
        str(metrics),
        "--dashboard-agent-listen-port",
        str(agent),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--runtime-env-agent-port",
        str(runtime_env),
        *_RANDOM_WORKER_PORTS,
    ]


def _start_ray(arguments: list[str], log_path: Path, num_cpus: float, token_path: Path) -> RayNode:
    ray_cli = Path(sys.executable).with_name("ray")
    # The interpreter's bin/ first on PATH: entrypoints say `python -m ppd_ray.jobs.<job>` (as documented for
    # `ray job submit`) and must get this environment's python even when the virtualenv was never activated.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    inherited = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}  # would win over the cluster's file
    env = {**inherited, **token_env(token_path), "RAY_USAGE_STATS_ENABLED": "0", "PATH": path}
    memory = ["--object-store-memory", str(OBJECT_STORE_BYTES)]
    with open(log_path, "ab") as log_file:
        # A process group of its own: the node can be stopped (or killed, to simulate a crash) as one unit.
        process = subprocess.Popen(
            [str(ray_cli), "start", "--block", *arguments, *memory],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    return RayNode(process, log_path, num_cpus)


# Workers bind random free ports (as ray.cluster_utils does): several nodes and other clusters share this machine.
_RANDOM_WORKER_PORTS = ("--min-worker-port", "0", "--max-worker-port", "0")
_STARTED = "Ray runtime started."
# Each node's shared-memory object store; Ray's default (30% of RAM per node) is far more than local jobs need.
OBJECT_STORE_BYTES = 1 << 30


def _dashboard_up(address: str, token: str) -> bool:
    try:
        _client(address, token)  # connects, authenticates and checks the version
        return True
    except Exception:  # ConnectionError until the dashboard listens; RuntimeError while it starts its modules
        return False


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str, node: RayNode | None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        if node is not None and node.process.poll() is not None:
            raise JobError(
                f"`ray start` exited with status {node.process.returncode} while waiting for {what}:\n{_log_tail(node)}"
            )
        time.sleep(0.5)
    raise JobError(f"timed out after {timeout_s:.0f}s waiting for {what}" + (f":\n{_log_tail(node)}" if node else ""))


def _log_tail(node: RayNode, chars: int | None = 2000) -> str:
    text = node.log_path.read_text(errors="replace") if node.log_path.exists() else ""
    return text if chars is None else text[-chars:]


# --- jobs ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobOutcome:
    """A finished job: its id, final status and complete logs."""

    job_id: str
    status: str
    logs: str


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
    command = entrypoint if isinstance(entrypoint, str) else " ".join(shlex.quote(str(part)) for part in entrypoint)
    runtime_env = {
        "working_dir": str(Path(working_dir).resolve()),
        "excludes": list(excludes),
        "env_vars": {**_forwarded_env(), **(env_vars or {})},
    }
    job_id = _client(address, token).submit_job(entrypoint=command, runtime_env=runtime_env)
    log(f"submitted job {job_id}: {command}")
    return job_id


def wait_for_job(
    address: str,
    job_id: str,
    *,
    timeout_s: float = 1800,
    poll_s: float = 1.0,
    on_log: Callable[[str], None] | None = None,
    token: str | None = None,
) -> JobOutcome:
    """Poll a job until it ends, passing new log lines to `on_log`; JobError (with the log tail) unless SUCCEEDED."""
    from ray.job_submission import JobStatus

    client = _client(address, token)
    deadline = time.monotonic() + timeout_s
    shown = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if on_log is not None:
            for line in logs[shown:].splitlines():
                on_log(line)
        shown = len(logs)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            break
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            raise JobError(
                f"job {job_id} still {status} after {timeout_s:.0f}s (stopped it); last logs:\n{_tail(logs)}"
            )
        time.sleep(poll_s)
    logs = client.get_job_logs(job_id)
    if status != JobStatus.SUCCEEDED:
        message = (client.get_job_info(job_id).message or "").splitlines()[:1]
        raise JobError(f"job {job_id} {status} ({' '.join(message)}); last log lines:\n{_tail(logs)}")
    log(f"job {job_id} SUCCEEDED")
    return JobOutcome(job_id, str(status), logs)


def submit_and_wait(
    address: str,
    entrypoint: Sequence[str] | str,
    *,
    working_dir: str | Path = ".",
    env_vars: dict[str, str] | None = None,
    excludes: Sequence[str] = DEFAULT_EXCLUDES,
    timeout_s: float = 1800,
    poll_s: float = 1.0,
    on_log: Callable[[str], None] | None = None,
    token: str | None = None,
) -> JobOutcome:
    """`submit_job` then `wait_for_job`: what `ray job submit` does, from Python."""
    job_id = submit_job(address, entrypoint, working_dir=working_dir, env_vars=env_vars, excludes=excludes, token=token)
    return wait_for_job(address, job_id, timeout_s=timeout_s, poll_s=poll_s, on_log=on_log, token=token)


def _client(address: str, token: str | None = None):
    """A Jobs API client sending `token` (None: the user's own token, if any); a refused token is a JobError."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    headers = bearer(token) if token is not None else user_token_headers()
    try:
        return JobSubmissionClient(address, headers=headers)  # its version check is the first authenticated call
    except AuthenticationError:
        have = "a token that the head refused" if headers else "no token"
        raise JobError(
            f"the Ray head at {address} requires token auth and this client has {have}: {TOKEN_HELP}"
        ) from None


def _forwarded_env() -> dict[str, str]:
    # Settings the job must see as this process does: offline hub, the DeepSpeed op cache.
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TORCH_EXTENSIONS_DIR", "RAY_USAGE_STATS_ENABLED")
    return {name: os.environ[name] for name in names if name in os.environ}


def _tail(logs: str, lines: int = 40) -> str:
    return "\n".join(logs.rstrip().splitlines()[-lines:])
