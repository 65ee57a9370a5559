"""A private Redis Cluster (3 masters + 3 replicas) for the cluster profile and the tests.

Six Debian ``redis-server`` processes with ``--cluster-enabled yes`` on free
loopback ports, each in its own folder under one data directory, joined by
``redis-cli --cluster create ... --cluster-replicas 1``. :meth:`LocalRedisCluster.start`
returns once every node reports ``cluster_state:ok`` and agrees on all 16384
slots; :meth:`stop` terminates every process it started. A real cluster is only
configuration away: point ``DERM_REDIS_CONNECTION_STRING`` at any of its nodes
with ``DERM_REDIS_TYPE=redis_cluster``.

Example::

    with LocalRedisCluster(Path("data/redis-cluster")) as cluster:
        os.environ["DERM_REDIS_TYPE"] = "redis_cluster"
        os.environ["DERM_REDIS_CONNECTION_STRING"] = cluster.connection_string
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis
from redis.cluster import RedisCluster

from derm.infra.redis_server import RedisServerError, find_redis_server, free_ports

SLOTS = 16384


def find_redis_cli() -> str:
    binary = shutil.which("redis-cli")
    if binary is None:
        raise RedisServerError("redis-cli not found on PATH: install it (Debian/Ubuntu: apt-get install redis-tools)")
    return binary


class LocalRedisCluster:
    """Start and stop a Redis Cluster of ``masters`` masters with ``replicas`` replicas each on 127.0.0.1.

    Args:
        data_dir: parent folder; node ``i`` keeps its ``nodes.conf`` and log in ``data_dir/node-<port>``.
        masters: number of masters (Redis Cluster needs at least 3).
        replicas: replicas per master.
        node_timeout_ms: ``cluster-node-timeout``; a master unreachable this long is failed over.
        startup_timeout: seconds to wait for the nodes and then for ``cluster_state:ok``.
    """

    def __init__(
        self,
        data_dir: Path,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 2000,
        startup_timeout: float = 60.0,
    ):
        if masters < 3:
            raise ValueError(f"Redis Cluster needs at least 3 masters, got {masters}")
        self.data_dir = Path(data_dir)
        self.node_timeout_ms = node_timeout_ms
        self.startup_timeout = startup_timeout
        self.replicas = replicas
        nodes = masters * (1 + replicas)
        # Each node also needs a cluster bus port; Redis defaults it to port + 10000, which overflows for the
        # high ports the OS hands out, so pick both (``cluster-port``).
        picked = free_ports(2 * nodes)
        self.ports = picked[:nodes]
        self.bus_ports = dict(zip(self.ports, picked[nodes:], strict=True))
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self._killed: set[int] = set()

    @property
    def connection_string(self) -> str:
        """Feast's connection string: every node (``redis_type: redis_cluster`` uses the first that answers)."""
        return ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def node_dir(self, port: int) -> Path:
        return self.data_dir / f"node-{port}"

    def node_client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def client(self) -> RedisCluster:
        return RedisCluster(host="127.0.0.1", port=self.ports[0])

    def _start_node(self, port: int) -> None:
        node_dir = self.node_dir(port)
        if node_dir.exists() and port not in self._killed:
            shutil.rmtree(node_dir)  # a stale nodes.conf of an earlier cluster on this port would not join this one
        node_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_redis_server(),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(node_dir),
            "--logfile", str(node_dir / "redis.log"),
            "--daemonize", "no",
            "--appendonly", "no",
            "--save", "",
            "--cluster-enabled", "yes",
            "--cluster-port", str(self.bus_ports[port]),
            "--cluster-config-file", str(node_dir / "nodes.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms),
        ]  # fmt: skip
        self._processes[port] = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            for port, process in self._processes.items():
                if port not in self._killed and process.poll() is not None:
                    log = self.node_dir(port) / "redis.log"
                    tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
                    raise RedisServerError(
                        f"redis-server on port {port} exited with code {process.returncode}: {' | '.join(tail)}"
                    )
            try:
                if ready():
                    return
            except (redis.ConnectionError, redis.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RedisServerError(f"Redis Cluster on ports {self.ports}: {what} within {self.startup_timeout}s")
            time.sleep(0.1)

    def _node_answers(self, port: int) -> bool:
        with self.node_client(port) as client:
            return client.info("server")["process_id"] == self._processes[port].pid

    def _cluster_ok(self) -> bool:
        for port in self.live_ports():
            with self.node_client(port) as client:
                info = client.cluster("info")
                if info["cluster_state"] != "ok" or int(info["cluster_slots_ok"]) != SLOTS:
                    return False
                if int(info["cluster_known_nodes"]) != len(self.ports):
                    return False
                # Replicas attach a moment after the slots are served: wait until every node sees them all.
                nodes = client.execute_command("CLUSTER", "NODES", NEVER_DECODE=True).decode().splitlines()
                if sum("slave" in line.split()[2].split(",") for line in nodes) != self._replica_count:
                    return False
        return True

    @property
    def _replica_count(self) -> int:
        return len(self.ports) // (1 + self.replicas) * self.replicas

    def start(self) -> LocalRedisCluster:
        try:
            for port in self.ports:
                self._start_node(port)
            self._wait(lambda: all(self._node_answers(port) for port in self.ports), "nodes did not answer")
            create = [
                find_redis_cli(),
                "--cluster", "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas", str(self.replicas),
                "--cluster-yes",
            ]  # fmt: skip
            created = subprocess.run(
                create,
                capture_output=True,
                text=True,
                timeout=self.startup_timeout,
            )
            if created.returncode != 0:
                raise RedisServerError(f"redis-cli --cluster create failed: {created.stdout[-500:]} {created.stderr}")
            self._wait(self._cluster_ok, "cluster_state did not become ok")
            self._wait(lambda: len(self.master_ports()) == len(self.ports) // (1 + self.replicas), "no masters")
        except BaseException:
            self.stop()
            raise
        return self

    def live_ports(self) -> list[int]:
        return [port for port, process in self._processes.items() if process.poll() is None]

    def master_ports(self) -> list[int]:
        """Ports of the live nodes that currently serve slots as masters."""
        masters = []
        for port in self.live_ports():
            with self.node_client(port) as client:
                if client.info("replication")["role"] == "master":
                    masters.append(port)
        return masters

    def kill(self, port: int) -> None:
        """SIGKILL one node (a crash, not a shutdown): its replica takes over after the node timeout."""
        process = self._processes[port]
        self._killed.add(port)
        process.kill()
        process.wait()

    def restart(self, port: int) -> None:
        """Start a killed node again with its ``nodes.conf``: it rejoins as a replica of whoever took over."""
        self._start_node(port)
        self._killed.discard(port)
        self._wait(lambda: self._node_answers(port), f"node {port} did not come back")

    def wait_until_healthy(self) -> None:
        """Wait until the live nodes report ``cluster_state:ok`` with every slot served (after a failover)."""

        def healthy() -> bool:
            for port in self.live_ports():
                with self.node_client(port) as client:
                    info = client.cluster("info")
                    if info["cluster_state"] != "ok" or int(info["cluster_slots_ok"]) != SLOTS:
                        return False
            return True

        self._wait(healthy, "the cluster did not recover")

    def stop(self) -> None:
        for process in self._processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self._processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._processes.clear()
        self._killed.clear()

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
