"""Helpers (no tests): a real multi-node Ray cluster on one machine, and Earwitness deployed onto it.

Each node is its own ``ray start --block`` in a session of its own (so its processes can be killed as a
node crash would end them), with its own temp dir, CPUs, a custom resource naming it, and its own metrics
directory. The cluster keeps Ray's token authentication on, with a token of its own, and its nodes on
loopback addresses other than 127.0.0.1 (which Ray swaps for the host's address when a node joins).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from serving.proxy import proxy_env
from serving.runtime import MALLOC_ENV
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
RAY = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())"]
#: each node's replicas keep their metrics in the directory this variable names (Settings.metrics_dir)
NODE_METRICS_VAR = "NODE_METRICS_DIR"


@dataclass
class Node:
    name: str
    ip: str
    temp_dir: Path
    metrics_dir: Path
    log: Path
    process: subprocess.Popen

    def wait_started(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while "Ray runtime started" not in self.log.read_text():
            assert self.process.poll() is None and time.monotonic() < deadline, f"ray start {self.name} failed:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.3)

    def kill(self, workers: list[int] = ()) -> list[int]:
        """SIGKILL every process of this node (raylet, agents, workers), as a crash of its machine would; their pids."""
        pids = sorted({*workers, *(pid for pid in _pids_of(self.metrics_dir) if pid != os.getpid())})
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # `ray start --block`, the raylet and the agents
        except (ProcessLookupError, PermissionError):
            pass
        for pid in pids:  # workers run in process groups of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(10)
        return pids


@dataclass
class Cluster:
    address: str
    token: str
    nodes: list[Node] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a process that joins this cluster (a node, a driver)."""
        return {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                "RAY_USAGE_STATS_ENABLED": "0", **extra}

    def start_node(self, name: str, ip: str, cpus: int, base: Path, head: bool = False, wait: bool = True, **node_env: str) -> Node:
        """``ray start`` one node; with ``wait`` False it returns at once (``node.wait_started()`` later)."""
        temp_dir, metrics_dir = base / name, base / f"{name}-metrics"
        metrics_dir.mkdir(parents=True)
        args = [*RAY, "start", "--block", f"--node-ip-address={ip}", f"--num-cpus={cpus}", "--num-gpus=0",
                f"--resources={json.dumps({f'node_{name}': 1})}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
                f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}"]
        env = self.env(**{NODE_METRICS_VAR: str(metrics_dir)}, **proxy_env(), **MALLOC_ENV, **node_env)
        if head:
            args += ["--head", f"--port={self.address.rsplit(':', 1)[1]}", "--include-dashboard=false"]
        else:
            args += [f"--address={self.address}"]
        log = base / f"{name}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT)
        node = Node(name, ip, temp_dir, metrics_dir, log, process)
        self.nodes.append(node)
        if wait:
            node.wait_started()
        return node

    def run_driver(self, code: str, timeout: float = 90) -> dict:
        """Run ``code`` as a driver of this cluster (its ``result`` printed as JSON); pytest's own process may hold another Ray."""
        script = f"import json, ray\nray.init(address={self.address!r}, logging_level='ERROR')\n{code}\nprint('RESULT' + json.dumps(result))"
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=self.env(), cwd=ROOT)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
        assert out.returncode == 0 and lines, out.stdout[-2000:] + out.stderr[-3000:]
        return json.loads(lines[-1].removeprefix("RESULT"))

    def stop(self) -> None:
        """Kill every node, and wait until none of their processes is left."""
        for node in reversed(self.nodes):
            node.kill()
        deadline = time.monotonic() + 20
        while any(_pids_of(node.metrics_dir) for node in self.nodes) and time.monotonic() < deadline:
            time.sleep(0.5)


def new_cluster() -> Cluster:
    return Cluster(address=f"127.0.0.2:{free_port()}", token=secrets.token_hex(16))


def _pids_of(metrics_dir: Path) -> list[int]:
    """This node's processes (`ray start`, raylet, agents, workers): all inherit its ``NODE_METRICS_DIR``."""
    marker = f"{NODE_METRICS_VAR}={metrics_dir}".encode() + b"\0"
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes() + b"\0"
            except OSError:
                continue
            if marker in environ:
                pids.append(int(entry.name))
    return pids


PLACEMENT = """
from ray.serve.context import _get_global_client
details = _get_global_client().get_serve_details()["applications"]["earwitness"]["deployments"]
names = {n["NodeID"]: next((k.removeprefix("node_") for k in n["Resources"] if k.startswith("node_")), "?") for n in ray.nodes() if n["Alive"]}
result = {name: sorted((names.get(r.get("node_id"), "none"), r["state"], r.get("pid") or 0) for r in d["replicas"]) for name, d in details.items()}
"""


def placement(cluster: Cluster) -> dict[str, list[tuple[str, str, int]]]:
    """Serve's status: per deployment, its replicas as (node name, state, pid); "none" for a replica on no live node."""
    return {k: [tuple(r) for r in v] for k, v in cluster.run_driver(PLACEMENT).items()}

