"""A private ``redis-server`` for the local profile and the tests.

It binds a free loopback port, keeps its files in its own data directory and is
stopped by whoever started it, so nothing is assumed to be running and nothing
is left behind. The production profile never starts one: it reads the
connection string from ``DERM_REDIS_CONNECTION_STRING`` instead.

Example::

    with LocalRedisServer(Path("data/redis")) as server:
        os.environ["DERM_REDIS_CONNECTION_STRING"] = server.connection_string
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


class RedisServerError(RuntimeError):
    """The local redis-server could not be found or did not come up."""


def find_redis_server() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisServerError(
            "redis-server not found on PATH: install it (Debian/Ubuntu: apt-get install redis-server) "
            "or point DERM_REDIS_CONNECTION_STRING at an existing Redis with DERM_PROFILE=production"
        )
    return binary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalRedisServer:
    """Start and stop one ``redis-server`` process on 127.0.0.1.

    Args:
        data_dir: the server's working directory (RDB file and log).
        port: TCP port; a free one is picked when omitted.
        persist: save an RDB snapshot on shutdown and reload it on start, so the
            online store of the local profile survives between runs. Tests pass
            ``False``.
        startup_timeout: seconds to wait for the first PING.
    """

    def __init__(self, data_dir: Path, port: int | None = None, persist: bool = True, startup_timeout: float = 20.0):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.persist = persist
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def connection_string(self) -> str:
        """Feast's Redis connection string for this server."""
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port)

    def start(self) -> LocalRedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
            "--appendonly", "no",
            "--save", "3600 1" if self.persist else "",
        ]  # fmt: skip
        # Own session: Ctrl-C in the terminal goes to the pipeline, which then shuts Redis down cleanly.
        self._process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + self.startup_timeout
        client = self.client()
        while True:
            if self._process.poll() is not None:
                raise RedisServerError(f"redis-server exited with code {self._process.returncode}: {self._log_tail()}")
            try:
                # Another server on the same port would answer PING too: only our own process counts.
                if client.info("server")["process_id"] == self._process.pid:
                    return self
                self._process.wait(timeout=self.startup_timeout)
            except redis.ConnectionError:
                # A busy server may still be loading its RDB file: keep waiting until the deadline.
                if time.monotonic() > deadline:
                    self.stop()
                    raise RedisServerError(
                        f"redis-server on port {self.port} did not answer within {self.startup_timeout}s: "
                        f"{self._log_tail()}"
                    ) from None
                time.sleep(0.05)
            finally:
                client.close()

    @property
    def state_path(self) -> Path:
        return self.data_dir / "server.port"

    @classmethod
    def running(cls, data_dir: Path) -> str | None:
        """Connection string of a server started earlier with ``detach`` in ``data_dir``, if it answers."""
        state = Path(data_dir) / "server.port"
        if not state.exists():
            return None
        port = int(state.read_text())
        try:
            with redis.Redis(
                host="127.0.0.1", port=port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
            ) as client:
                client.ping()
        except redis.ConnectionError:
            state.unlink(missing_ok=True)
            return None
        return f"127.0.0.1:{port}"

    def detach(self) -> None:
        """Leave the server running after this process exits; ``derm redis down`` stops it."""
        self.state_path.write_text(str(self.port))
        self._process = None

    @classmethod
    def shutdown_detached(cls, data_dir: Path, timeout: float = 30.0) -> bool:
        connection = cls.running(data_dir)
        if connection is None:
            return False
        port = int(connection.rsplit(":", 1)[1])
        with redis.Redis(host="127.0.0.1", port=port) as client:
            pid = client.info("server")["process_id"]
        os.kill(pid, signal.SIGTERM)  # redis-server saves (if configured to) and exits on SIGTERM
        deadline = time.monotonic() + timeout
        while cls.running(data_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        (Path(data_dir) / "server.port").unlink(missing_ok=True)
        return True

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        # SIGTERM is redis-server's graceful shutdown (RDB save when persisting); SHUTDOWN over the
        # wire would make redis-py retry the dropped connection with back-off.
        self._process.terminate()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def _log_tail(self, lines: int = 5) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])

    def __enter__(self) -> LocalRedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
