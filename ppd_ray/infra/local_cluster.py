"""A Ray cluster on this machine: a head (and extra nodes) started with `ray start`, each with a token of its own.

The documented way to run a job is the CLI against a head's dashboard:

    ray start --head --num-cpus 2 --dashboard-host 127.0.0.1
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m ppd_ray.jobs.prepare --input /abs/toy/pairs/population --out /abs/prepared

`local_head()` does the first line on free ports, in a temporary directory of its own with a token of its own
(`ppd_ray.infra.ray_auth`: nothing read from or written to the user's home directory), and stops exactly the
processes it started (never `ray stop`, which would stop every Ray on the machine). `LocalCluster.submit_and_wait`
does the second (`ppd_ray.infra.job_client`).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ppd_ray.infra.job_client import JobOutcome, jobs_client, submit_and_wait
from ppd_ray.infra.processes import LocalProcess, free_ports, path_with_interpreter_bin, start_process, wait_until
from ppd_ray.infra.ray_auth import new_token_file, token_env

logger = logging.getLogger(__name__)

# Workers bind random free ports (as ray.cluster_utils does): several nodes and other clusters share this machine.
_RANDOM_WORKER_PORTS = ("--min-worker-port", "0", "--max-worker-port", "0")
_STARTED = "Ray runtime started."
# Each node's shared-memory object store; Ray's default (30% of RAM per node) is far more than local jobs need.
OBJECT_STORE_BYTES = 1 << 30


@dataclass
class RayNode(LocalProcess):
    """One `ray start --block` process group (a node of the local cluster). `kill()` loses it as a crashed machine
    would; `stop()` lets `ray start` stop its processes (without the drain: see `_start_ray`), then clears leftovers."""

    num_cpus: float = 0


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
        wait_until(
            lambda: _STARTED in node.log_tail(None),
            timeout_s=timeout_s,
            what=f"a node with {num_cpus} CPU(s) to join",
            process=node,
        )
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
        """`job_client.submit_and_wait` against this cluster's Jobs API with its token."""
        return submit_and_wait(self.dashboard_address, entrypoint, token=self.auth_token, **options)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        self.nodes.clear()
        self.head.stop()


@contextmanager
def local_head(num_cpus: float = 2, *, timeout_s: float = 180) -> Iterator[LocalCluster]:
    """`ray start --head` on free loopback ports in a private temporary directory; yields the cluster, stops it after.

    Add worker nodes with `cluster.add_node(num_cpus)`; submit jobs to `cluster.dashboard_address`.
    """
    # Short path: Ray's socket paths under it must stay below the 107-character limit of Unix sockets.
    temp_dir = Path(tempfile.mkdtemp(prefix="ppd-ray-", dir="/tmp"))
    token_path = new_token_file(temp_dir)
    gcs, dashboard, client = free_ports(3)
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
        wait_until(
            lambda: _dashboard_up(cluster.dashboard_address, cluster.auth_token),
            timeout_s=timeout_s,
            what="the Ray head's dashboard",
            process=head,
        )
        logger.info(f"Ray head at {cluster.gcs_address}, dashboard {cluster.dashboard_address}, temp dir {temp_dir}")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _node_arguments(num_cpus: float) -> list[str]:
    """What every `ray start` here passes, head or worker: its CPUs, loopback, and free ports of its own."""
    node_manager, object_manager, metrics, agent, agent_grpc, runtime_env = free_ports(6)
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
    path = path_with_interpreter_bin()
    inherited = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}  # would win over the cluster's file
    env = {**inherited, **token_env(token_path), "RAY_USAGE_STATS_ENABLED": "0", "PATH": path}
    # Ray 2.60's `ray start --block` answers SIGTERM by draining its node for up to 30 s (meant for Serve replicas
    # on Kubernetes pods, where other nodes' proxies still route to it) before stopping anything: every stop of a
    # node that had run a job took 30 s, 2 s without (BENCHMARKS.md). Nothing outlives a local cluster's stop; a
    # drain timeout set in the environment still wins.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    memory = ["--object-store-memory", str(OBJECT_STORE_BYTES)]
    started = start_process([str(ray_cli), "start", "--block", *arguments, *memory], log_path, env=env)
    return RayNode(started.process, started.log_path, num_cpus)


def _dashboard_up(address: str, token: str) -> bool:
    try:
        jobs_client(address, token)  # connects, authenticates and checks the version
        return True
    except Exception:  # ConnectionError until the dashboard listens; RuntimeError while it starts its modules
        return False
