"""A private ``redis-server`` for the local profile and the tests; one per data directory.

Two layers:

* :class:`LocalRedisServer` starts and stops one ``redis-server`` process on a
  free loopback port (what the tests and benchmarks use, ``persist=False``:
  no password, no files kept).
* :class:`DataDirRedis` is *the* server of a data directory for the local
  profile: every ``derm`` command that needs Redis goes through it, finds the
  server of its ``<data_dir>/redis`` and reuses it, or starts it when there is
  none. There is never a second server on one directory.

Files under ``<data_dir>/redis`` (the folder is 0700, every file 0600: the
server runs with umask 077)::

    server.lock     flock'd (exclusive) around every find / start / stop decision
    users.lock      flock'd *shared* by every command using the server, for its lifetime
    server.json     {"pid", "port", "pinned"} of the running server (written atomically)
    password        the generated ``requirepass`` (never on a command line: redis.conf)
    redis.conf      the password, read by redis-server
    appendonlydir/  the append-only file (``appendonly yes``, ``appendfsync everysec``)
    dump.rdb, redis.log

**Who stops the server: reference counting by lease.** A command holds a
shared flock on ``users.lock`` while it uses the server; when it leaves it
drops its lease and, still under ``server.lock``, tries an exclusive flock: if
that succeeds no other command is using the server, and it stops it, whether
it started it or merely reused it. So two commands run at once share one
server, the first to finish leaves it to the other, and the last one out stops
it; the kernel drops the lease of a SIGKILLed command, so a server it left is
found (``server.json``, checked against the live process: its pid answers on
its port and runs in this folder) and reused by the next command, which then
stops it as the last user. A server that no longer answers is terminated and
replaced, under the lock, never run beside a second one. SIGTERM and SIGHUP of
a command end it like Ctrl-C does (``SystemExit``), so its lease is dropped
and the server stopped if it was the last user (a SIGHUP already ignored,
e.g. under ``nohup``, stays ignored).

``derm redis up`` *pins* the server: it then outlives every command until
``derm redis down``, which unpins it and stops it at once when no command
uses it, else leaves the stop to the last command out. So ``derm serve``
reusing a server of ``derm redis up`` never stops it, and ``derm redis down``
under a running ``derm serve`` does not pull Redis away from it.

Upgrading keeps the data: a folder holding only the RDB file of an older
server is loaded with AOF off and switched to AOF at run time (Redis started
with AOF on would ignore the RDB file and come up empty), and a server left
running by the previous ``derm redis up`` (``server.port``, no password) is
stopped (it saves its RDB file) before the new one starts.

The production profile never starts one: it reads the connection string from
``DERM_REDIS_CONNECTION_STRING`` instead.

Example::

    with DataDirRedis(Path("data/redis")).session() as connection:   # "127.0.0.1:PORT,password=..."
        os.environ["DERM_REDIS_CONNECTION_STRING"] = connection

    with LocalRedisServer(tmp_path, persist=False) as server:        # tests: no password
        server.client().ping()
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports free now: all bound at once, since the OS may hand a port it just
    released to the next ``bind(0)`` (a cluster's 12 ports picked one by one once held a duplicate)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def connection_string(port: int, password: str | None) -> str:
    """Feast's Redis connection string (``host:port,password=...``) of a loopback server."""
    return f"127.0.0.1:{port}" + (f",password={password}" if password else "")


_PASSWORD = re.compile(r"[A-Za-z0-9_-]{16,}")


class LocalRedisServer:
    """Start and stop one ``redis-server`` process on 127.0.0.1.

    Args:
        data_dir: the server's working directory (append-only file, RDB file, log).
        port: TCP port; a free one is picked when omitted.
        persist: the local profile's durability: ``appendonly yes`` with ``appendfsync everysec``
            (at most a second of writes lost on a crash), plus an RDB snapshot on shutdown; the
            data is reloaded on start. Tests pass ``False`` (nothing written to disk).
        startup_timeout: seconds to wait for the first PING.
        password: ``requirepass`` of the server (written to a 0600 ``redis.conf``, never on the
            command line); ``None``: no password (tests, benchmarks).
        extra_args: more ``--name value`` options, after the platform's (tests that need a server
            configured otherwise: ``--maxmemory``, ``--enable-debug-command``, ``--key-load-delay``...).
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        persist: bool = True,
        startup_timeout: float = 20.0,
        password: str | None = None,
        extra_args: tuple[str, ...] = (),
    ):
        self.data_dir = Path(data_dir)
        self.extra_args = tuple(extra_args)
        self.port = port or free_port()
        self.persist = persist
        self.startup_timeout = startup_timeout
        self.password = password
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def connection_string(self) -> str:
        """Feast's Redis connection string for this server (with its password, if any)."""
        return connection_string(self.port, self.password)

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def client(self, **kwargs: Any) -> redis.Redis:
        """A redis-py client of this server, authenticated."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, **kwargs)

    def start(self) -> LocalRedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [find_redis_server()]
        # Data kept by an RDB-only server (before the append-only file): started with AOF off so the RDB
        # file is loaded, then AOF is switched on at run time, which writes it from the loaded data.
        # Started with AOF on, Redis would ignore the RDB file and come up empty.
        migrate = self.persist and (self.data_dir / "dump.rdb").exists() and not self._aof_dir.exists()
        if self.password is not None:
            if not _PASSWORD.fullmatch(self.password):
                raise RedisServerError("redis password must be 16+ characters of [A-Za-z0-9_-]")
            config = self.data_dir / "redis.conf"
            _write_private(config, f"requirepass {self.password}\n")
            args.append(str(config))  # the config file first, as redis-server expects
        # The server runs in its folder ("--dir ."), so the folder's name is never parsed by Redis.
        args += [
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", ".",
            "--logfile", "redis.log",
            "--daemonize", "no",
            "--appendonly", "yes" if self.persist and not migrate else "no",
            "--appendfsync", "everysec",
            "--save", "3600 1" if self.persist else "",
            *self.extra_args,
        ]  # fmt: skip
        if self.persist:
            _tighten(self.data_dir)
        # Own session: Ctrl-C or a hang-up in the terminal goes to the command, which then stops Redis
        # cleanly. umask 077: the append-only file, the RDB file and the log are the owner's only.
        self._process = subprocess.Popen(
            args,
            cwd=self.data_dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            umask=0o077,
        )
        deadline = time.monotonic() + self.startup_timeout
        client = self.client(socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
        while True:
            if self._process.poll() is not None:
                raise RedisServerError(f"redis-server exited with code {self._process.returncode}: {self._log_tail()}")
            try:
                # Another server on the same port would answer PING too: only our own process counts.
                if client.info("server")["process_id"] == self._process.pid:
                    if migrate:
                        self._switch_to_aof(client, deadline)
                    return self
                self._process.wait(timeout=self.startup_timeout)
            except (redis.ConnectionError, redis.AuthenticationError):
                # A busy server may still be loading its data: keep waiting until the deadline.
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
    def _aof_dir(self) -> Path:
        return self.data_dir / "appendonlydir"

    def _switch_to_aof(self, client: redis.Redis, deadline: float) -> None:
        """``CONFIG SET appendonly yes`` and wait until the AOF holds the data loaded from the RDB file."""
        client.config_set("appendonly", "yes")
        while True:
            info = client.info("persistence")
            if info["aof_enabled"] and not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
                if info.get("aof_last_bgrewrite_status", "ok") != "ok":
                    raise RedisServerError(f"redis-server could not write its append-only file: {self._log_tail()}")
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RedisServerError(f"redis-server did not write its append-only file in time: {self._log_tail()}")
            time.sleep(0.05)

    def release(self) -> None:
        """Forget the process without stopping it (its data-dir owner stops it by pid)."""
        self._process = None

    def kill(self) -> None:
        """SIGKILL the server, as a crash or the OOM killer would: nothing is saved or flushed."""
        if self._process is None:
            return
        self._process.kill()
        self._process.wait()
        self._process = None

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        # SIGTERM is redis-server's graceful shutdown (AOF fsync, RDB save when persisting); SHUTDOWN
        # over the wire would make redis-py retry the dropped connection with back-off.
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


@dataclass(frozen=True)
class ServerState:
    """``server.json``: the running server of a data directory."""

    pid: int
    port: int
    pinned: bool = False


class DataDirRedis:
    """The one local ``redis-server`` of a data directory, shared by every command (see the module docstring).

    Args:
        redis_dir: ``<data_dir>/redis``.
        startup_timeout: seconds to wait for a server to answer (also for one still loading its data).

    Example::

        server = DataDirRedis(paths.redis_dir)
        with server.session() as connection:  # reuses the running server, or starts it
            FeatureRepo().store()  # ... with DERM_REDIS_CONNECTION_STRING=connection
    """

    def __init__(self, redis_dir: Path, startup_timeout: float = 20.0):
        self.redis_dir = Path(redis_dir)
        self.startup_timeout = startup_timeout
        self._lease_fd: int | None = None
        self._started: LocalRedisServer | None = None
        self._deferring = False
        self._pending_signal: int | None = None

    # ------------------------------------------------------------------ files

    @property
    def state_path(self) -> Path:
        return self.redis_dir / "server.json"

    @property
    def password_path(self) -> Path:
        return self.redis_dir / "password"

    def password(self) -> str:
        """The server's password: generated once (0600 file), then read."""
        self._ensure_dir()
        try:
            fd = os.open(self.password_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            password = self.password_path.read_text().strip()
            if not password:  # a command killed between creating and filling it: made again
                self.password_path.unlink()
                return self.password()
            if not _PASSWORD.fullmatch(password):
                raise RedisServerError(
                    f"{self.password_path}: not a password of 16+ characters of [A-Za-z0-9_-]; delete it "
                    "to generate a new one"
                ) from None
            return password
        os.close(fd)
        # Written beside and renamed over the placeholder, so the file is never seen half-written.
        tmp = self.password_path.with_name(".password.tmp")
        _write_private(tmp, secrets.token_urlsafe(32) + "\n")
        os.replace(tmp, self.password_path)
        return self.password()

    def read_state(self) -> ServerState | None:
        try:
            raw = json.loads(self.state_path.read_text())
            return ServerState(pid=int(raw["pid"]), port=int(raw["port"]), pinned=bool(raw.get("pinned", False)))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return None  # a torn or foreign file: treated as no record (the live process is checked anyway)

    def _write_state(self, state: ServerState | None) -> None:
        if state is None:
            self.state_path.unlink(missing_ok=True)
            return
        tmp = self.state_path.with_name(".server.json.tmp")
        _write_private(tmp, json.dumps(asdict(state)))
        os.replace(tmp, self.state_path)

    def _ensure_dir(self) -> None:
        self.redis_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.redis_dir, 0o700)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._ensure_dir()
        fd = os.open(self.redis_dir / "server.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def _in_use(self) -> bool:
        """Whether any command (other than a released one) holds a lease; call under the lock."""
        fd = os.open(self.redis_dir / "users.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    # ------------------------------------------------------------------ the live server

    def _connection(self, state: ServerState) -> str:
        return connection_string(state.port, self.password())

    def _is_ours(self, pid: int) -> bool:
        """The process ``pid`` is alive, a redis-server, and runs in this folder (not a reused pid)."""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                return False
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            return False
        return b"redis-server" in cmdline and Path(cwd) == self.redis_dir.resolve()

    def _answers(self, state: ServerState, timeout: float) -> bool:
        """The server of ``state`` answers on its port as that very process (waits while it loads)."""
        deadline = time.monotonic() + timeout
        with redis.Redis(
            host="127.0.0.1",
            port=state.port,
            password=self.password(),
            socket_connect_timeout=1,
            socket_timeout=5,
            retry=Retry(NoBackoff(), 0),
        ) as client:
            while True:
                try:
                    return client.info("server")["process_id"] == state.pid
                except (redis.ConnectionError, redis.AuthenticationError, redis.ResponseError):
                    if time.monotonic() > deadline or not self._is_ours(state.pid):
                        return False
                    time.sleep(0.1)

    def _find(self) -> ServerState | None:
        """The running server recorded in ``server.json``, checked; a dead or hung one is cleaned up. Under the lock."""
        state = self.read_state()
        # The record of the previous `derm redis up` (port only); its server is stopped just below.
        (self.redis_dir / "server.port").unlink(missing_ok=True)
        if state is not None and not (self._is_ours(state.pid) and self._answers(state, self.startup_timeout)):
            if self._is_ours(state.pid):
                _terminate(state.pid)  # ours but hung: replaced, never run beside a second server
            self._write_state(None)
            state = None
        # A server running in this folder without a record (its starter was killed between starting and
        # recording it, or the previous version's `derm redis up` left it) is stopped: it saves its data
        # (AOF or RDB), which the next server loads.
        for pid in self._servers_in_folder():
            if state is None or pid != state.pid:
                _terminate(pid)
        return state

    def _servers_in_folder(self) -> list[int]:
        """Pids of the live redis-server processes whose working directory is this folder."""
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and self._is_ours(int(entry.name)):
                pids.append(int(entry.name))
        return pids

    def running(self) -> str | None:
        """Connection string of the data directory's running server, if any (takes no lease)."""
        if not self.redis_dir.exists():
            return None
        with self._locked():
            state = self._find()
        return None if state is None else self._connection(state)

    # ------------------------------------------------------------------ leases

    def acquire(self) -> str:
        """Reuse the running server or start it; hold a lease until :meth:`release`. Returns the connection string."""
        if self._lease_fd is not None:
            raise RuntimeError("this DataDirRedis already holds a lease")
        with self._locked():
            state = self._find()
            if state is None:
                server = LocalRedisServer(
                    self.redis_dir, persist=True, startup_timeout=self.startup_timeout, password=self.password()
                )
                server.start()
                state = ServerState(pid=server.pid, port=server.port)  # type: ignore[arg-type]
                self._write_state(state)
                self._started = server
            fd = os.open(self.redis_dir / "users.lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_SH)  # never blocks: exclusive holders hold server.lock too
            self._lease_fd = fd
            return self._connection(state)

    @property
    def started(self) -> bool:
        """Whether this instance started the server (rather than reusing one)."""
        return self._started is not None

    def release(self) -> bool:
        """Drop the lease; stop the server when no other command uses it and it is not pinned. Returns stopped."""
        if self._lease_fd is None:
            return False
        with self._locked():
            os.close(self._lease_fd)
            self._lease_fd = None
            state = self.read_state()
            stopped = False
            if state is not None and not state.pinned and not self._in_use():
                self._stop(state)
                stopped = True
            if self._started is not None and not stopped:
                self._started.release()  # left to the last user, who stops it by pid
            self._started = None
            return stopped

    def _stop(self, state: ServerState) -> None:
        if self._started is not None and self._started.pid == state.pid:
            self._started.stop()  # our child: terminate and reap
        elif self._is_ours(state.pid):
            _terminate(state.pid)
        self._write_state(None)

    # ------------------------------------------------------------------ commands

    @contextlib.contextmanager
    def session(self) -> Iterator[str]:
        """Hold the server for a command: acquire, and release on exit, on SIGTERM and on SIGHUP.

        While the session is open, SIGTERM and SIGHUP raise ``SystemExit(128 + signal)`` in the
        main thread (so ``finally`` blocks run; Ctrl-C raises ``KeyboardInterrupt`` as always);
        during the acquire and the release themselves all three are held back and raised right
        after, so no server is left unrecorded or half-stopped.
        """
        previous = self._install_signal_handlers()
        try:
            with self._signals_deferred():
                connection = self.acquire()
            yield connection
        finally:
            try:
                with self._signals_deferred():
                    self.release()
            finally:
                self._restore_signal_handlers(previous)

    @contextlib.contextmanager
    def _signals_deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending_signal is not None:
            signum, self._pending_signal = self._pending_signal, None
            raise _interruption(signum)

    def up(self) -> tuple[str, bool]:
        """Start (or find) the server and pin it so it outlives every command. Returns (connection, started)."""
        connection = self.acquire()
        started = self.started
        with self._locked():
            state = self.read_state()
            if state is not None:
                self._write_state(ServerState(state.pid, state.port, pinned=True))
        self.release()
        return connection, started

    def down(self) -> str:
        """Unpin; stop the server now unless a command uses it. Returns ``stopped``, ``in use`` or ``not running``."""
        if not self.redis_dir.exists():
            return "not running"
        with self._locked():
            state = self._find()
            if state is None:
                return "not running"
            if self._in_use():
                self._write_state(ServerState(state.pid, state.port, pinned=False))
                return "in use"
            self._stop(state)
            return "stopped"

    def _on_signal(self, signum: int, frame: object) -> None:
        if self._deferring:
            self._pending_signal = signum
            return
        raise _interruption(signum)

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            handler = signal.getsignal(signum)
            if handler is signal.SIG_IGN or (signum == signal.SIGINT and handler is not signal.default_int_handler):
                continue  # e.g. SIGHUP under nohup stays ignored; someone else's Ctrl-C handler stays theirs
            previous[signum] = handler
            signal.signal(signum, self._on_signal)
        return previous

    def _restore_signal_handlers(self, previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _interruption(signum: int) -> BaseException:
    """What a signal raises in a session: Ctrl-C stays a KeyboardInterrupt, SIGTERM/SIGHUP exit 128 + signal."""
    return KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)


def _terminate(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM a server that is not our child (saves its data and exits), SIGKILL after ``timeout``."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child: reap it
                return False
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)


def _tighten(data_dir: Path) -> None:
    """Owner-only permissions on what an older version left world-readable."""
    os.chmod(data_dir, 0o700)
    for path in [data_dir, *data_dir.glob("appendonlydir")]:
        for child in path.iterdir():
            if child.is_file():
                os.chmod(child, 0o600)
            elif child.name == "appendonlydir":
                os.chmod(child, 0o700)
