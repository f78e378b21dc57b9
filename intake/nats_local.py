"""A local NATS JetStream cluster from Debian's ``nats-server``: tests, benchmarks, a laptop.

:class:`LocalNatsCluster` writes one config file per node (client port, cluster routes to
every other node, a JetStream ``store_dir``) into a folder, starts the nodes as child
processes on free localhost ports and waits, with a deadline, until the cluster has elected
a JetStream meta leader. ``kill(i)`` sends SIGKILL to one node (the node-loss test);
``start_node(i)`` brings it back on the same ports and store. Nothing here is used in
production: deploy/ runs the same server image as a 3-node StatefulSet / compose services.
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from ecomrec.errors import ConfigError

log = logging.getLogger(__name__)

FALLBACK_PATHS = ("/usr/sbin/nats-server",)  # Debian's package, when /usr/sbin is not on PATH
INSTALL_HINT = "install it with `apt-get update && apt-get install -y nats-server` (Debian)"


def nats_server_binary() -> str:
    """The path of ``nats-server``; a ConfigError saying how to install it when missing."""
    path = shutil.which("nats-server") or next(
        (p for p in FALLBACK_PATHS if Path(p).exists()), None
    )
    if path is None:
        raise ConfigError(f"nats-server is not on PATH: {INSTALL_HINT}")
    return path


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class LocalNatsCluster:
    """``nodes`` nats-server processes forming one JetStream cluster under ``root``."""

    def __init__(self, root: str | Path, nodes: int = 3, name: str = "ecomrec") -> None:
        self.root = Path(root)
        self.nodes = nodes
        self.name = name
        self.binary = nats_server_binary()
        ports = _free_ports(2 * nodes)
        self.client_ports = ports[:nodes]
        self.cluster_ports = ports[nodes:]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * nodes

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{p}" for p in self.client_ports]

    def _config(self, i: int) -> Path:
        routes = ", ".join(
            f"nats-route://127.0.0.1:{p}" for j, p in enumerate(self.cluster_ports) if j != i
        )
        store = self.root / f"n{i}" / "store"
        store.mkdir(parents=True, exist_ok=True)
        text = (
            f"server_name: n{i}\n"
            f"listen: 127.0.0.1:{self.client_ports[i]}\n"
            "jetstream {\n"
            f'  store_dir: "{store}"\n'
            "  max_memory_store: 64MB\n"
            "  max_file_store: 2GB\n"
            "}\n"
            "cluster {\n"
            f"  name: {self.name}\n"
            f"  listen: 127.0.0.1:{self.cluster_ports[i]}\n"
            f"  routes: [{routes}]\n"
            "}\n"
        )
        path = self.root / f"n{i}" / "nats.conf"
        path.write_text(text)
        return path

    def start_node(self, i: int) -> None:
        conf = self._config(i)
        logf = (self.root / f"n{i}" / "server.log").open("ab")
        self.procs[i] = subprocess.Popen(
            [self.binary, "-c", str(conf)], stdout=logf, stderr=subprocess.STDOUT
        )
        logf.close()

    def start(self, deadline_s: float = 30.0) -> LocalNatsCluster:
        for i in range(self.nodes):
            self.start_node(i)
        self.wait_ready(deadline_s)
        return self

    def wait_ready(self, deadline_s: float = 30.0) -> None:
        """Every running node accepts clients and the cluster has a JetStream meta leader."""
        from intake.live_log_nats import wait_for_jetstream  # no import cycle at module load

        end = time.monotonic() + deadline_s
        for i, p in enumerate(self.procs):
            if p is None:
                continue
            while not _port_open(self.client_ports[i]):
                if p.poll() is not None:
                    raise ConfigError(f"nats-server n{i} exited: see {self.root}/n{i}/server.log")
                if time.monotonic() > end:
                    raise TimeoutError(f"nats-server n{i} did not open its port in {deadline_s}s")
                time.sleep(0.05)
        wait_for_jetstream(self.urls, max(1.0, end - time.monotonic()))

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` (no shutdown, no flush) and reap it."""
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
        self.procs[i] = None

    def stop(self) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.terminate()
        for i, p in enumerate(self.procs):
            if p is None:
                continue
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            self.procs[i] = None

    def store_bytes(self) -> bytes:
        """Every byte under every node's store (the forget test searches it)."""
        return b"".join(
            f.read_bytes()
            for f in sorted(self.root.rglob("*"))
            if f.is_file() and "store" in f.parts
        )

    def __enter__(self) -> LocalNatsCluster:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
