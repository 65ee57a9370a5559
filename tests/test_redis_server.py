"""The local redis-server: one per data directory, shared, stopped by its last user, private and durable.

Real ``redis-server`` processes throughout; the signal tests kill a real ``derm redis up --foreground``
process (the same ``session()`` every command uses) and then look for the servers of the folder in
the process table, not only in ``server.json``.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from redis.backoff import NoBackoff
from redis.retry import Retry

from derm.core.paths import DATA_DIR_ENV, PROFILE_ENV, REDIS_CONNECTION_ENV
from derm.infra.redis_server import DataDirRedis, LocalRedisServer, RedisServerError

DERM = Path(sys.executable).with_name("derm")


def _servers_of(redis_dir: Path) -> list[int]:
    """Pids of the live redis-server processes running in ``redis_dir`` (from /proc, not from our files)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"redis-server" not in (entry / "cmdline").read_bytes():
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if Path(os.readlink(entry / "cwd")) == redis_dir.resolve():
                found.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def _client(connection: str) -> redis.Redis:
    address, _, password = connection.partition(",password=")
    host, port = address.rsplit(":", 1)
    return redis.Redis(host=host, port=int(port), password=password or None, retry=Retry(NoBackoff(), 0))


def _start_foreground(data_dir: Path) -> subprocess.Popen[str]:
    env = {**os.environ, DATA_DIR_ENV: str(data_dir), PROFILE_ENV: "local"}
    env.pop(REDIS_CONNECTION_ENV, None)
    # SIGHUP back to its default before exec: under nohup (a CI job started that way) the test process
    # ignores it, derm would rightly keep it ignored, and the SIGHUP case would wait forever.
    start = "import os, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
    return subprocess.Popen(
        [sys.executable, "-c", start, str(DERM), "redis", "up", "--foreground"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for_line(process: subprocess.Popen[str], word: str) -> str:
    assert process.stderr is not None
    for line in process.stderr:
        if word in line:
            return line
    raise AssertionError(f"derm exited with {process.wait()} before printing {word!r}")


def test_local_server_starts_answers_persists_and_stops(tmp_path: Path) -> None:
    server = LocalRedisServer(tmp_path, persist=True).start()
    server.client().set("k", "v")
    server.stop()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=server.port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)).ping()
    assert (tmp_path / "dump.rdb").exists(), "persisting server saves on shutdown"
    with LocalRedisServer(tmp_path) as again:
        assert again.client().get("k") == b"v"


def test_local_profile_has_a_password_aof_and_private_files(tmp_path: Path) -> None:
    redis_dir = tmp_path / "redis"
    with DataDirRedis(redis_dir).session() as connection:
        assert connection.startswith("127.0.0.1:") and ",password=" in connection
        client = _client(connection)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        client.set("k", "v")
        port = client.connection_pool.connection_kwargs["port"]
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0)).get("k")
        password = (redis_dir / "password").read_text().strip()
        assert connection.endswith(f",password={password}")
        assert password not in " ".join(Path(f"/proc/{pid}/cmdline").read_text() for pid in _servers_of(redis_dir))
    assert (redis_dir / "appendonlydir").is_dir(), "append-only file on"
    modes = {p.relative_to(redis_dir): stat.S_IMODE(p.stat().st_mode) for p in [redis_dir, *redis_dir.rglob("*")]}
    assert modes[Path(".")] == 0o700
    assert {p: m for p, m in modes.items() if (redis_dir / p).is_file() and m != 0o600} == {}
    assert len([p for p in modes if (redis_dir / p).is_file()]) >= 5  # password, redis.conf, log, locks, AOF
    with DataDirRedis(redis_dir).session() as again:
        assert _client(again).get("k") == b"v", "the data comes back from the append-only file"


def test_data_kept_by_an_rdb_only_server_survives_the_switch_to_aof(tmp_path: Path) -> None:
    redis_dir = tmp_path / "redis"
    with LocalRedisServer(redis_dir, persist=False) as old:  # the local profile before AOF: an RDB file
        old.client().set("day", "2026-01-02")
        old.client().save()
    for _ in range(2):  # the switch, then a plain restart from the append-only file
        with DataDirRedis(redis_dir).session() as connection:
            assert _client(connection).get("day") == b"2026-01-02"
            assert _client(connection).config_get("appendonly") == {"appendonly": "yes"}
        assert (redis_dir / "appendonlydir").is_dir()


def test_a_server_of_the_previous_version_is_replaced_not_doubled(tmp_path: Path) -> None:
    redis_dir = tmp_path / "redis"
    old = LocalRedisServer(redis_dir, persist=False).start()  # what `derm redis up` of 0.2 left running
    old.client().config_set("save", "3600 1")
    old.client().set("k", "v")
    (redis_dir / "server.port").write_text(str(old.port))
    old_pid = old.pid
    old.release()
    assert _servers_of(redis_dir) == [old_pid]
    with DataDirRedis(redis_dir).session() as connection:
        assert _servers_of(redis_dir) == [DataDirRedis(redis_dir).read_state().pid] != [old_pid]
        assert _client(connection).get("k") == b"v", "saved by the old server on SIGTERM, loaded by the new one"
    assert not (redis_dir / "server.port").exists()


def test_two_commands_at_once_share_one_server_and_the_last_out_stops_it(tmp_path: Path) -> None:
    redis_dir = tmp_path / "redis"
    first, second = DataDirRedis(redis_dir), DataDirRedis(redis_dir)
    barrier = threading.Barrier(2)
    connections: dict[str, str] = {}

    def command(name: str, server: DataDirRedis) -> None:
        barrier.wait()
        connections[name] = server.acquire()

    threads = [threading.Thread(target=command, args=item) for item in (("a", first), ("b", second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert connections["a"] == connections["b"]
    assert [first.started, second.started].count(True) == 1, "exactly one of them started it"
    (pid,) = _servers_of(redis_dir)
    starter, reuser = (first, second) if first.started else (second, first)
    assert starter.release() is False, "the other command still uses it"
    assert _servers_of(redis_dir) == [pid] and _client(connections["a"]).ping()
    assert reuser.release() is True, "the last user out stops it"
    assert _servers_of(redis_dir) == [] and not (redis_dir / "server.json").exists()


def test_redis_up_pins_the_server_and_down_leaves_it_to_its_last_user(tmp_path: Path) -> None:
    redis_dir = tmp_path / "redis"
    pinned = DataDirRedis(redis_dir)
    connection, started = pinned.up()
    assert started and len(_servers_of(redis_dir)) == 1
    serve = DataDirRedis(redis_dir)
    assert serve.acquire() == connection and not serve.started
    assert serve.release() is False, "a command reusing the pinned server never stops it"
    assert _client(connection).ping()
    assert DataDirRedis(redis_dir).up() == (connection, False), "a second `redis up` finds it"
    serve.acquire()
    assert pinned.down() == "in use"
    assert _client(connection).ping(), "`redis down` does not pull Redis from under a running command"
    assert serve.release() is True
    assert _servers_of(redis_dir) == []
    assert pinned.down() == "not running"


def test_a_stale_record_is_replaced_and_a_foreign_pid_never_touched(tmp_path: Path) -> None:
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    # A record left by a crash whose pid now belongs to another process (here: this test).
    (redis_dir / "server.json").write_text(f'{{"pid": {os.getpid()}, "port": 1, "pinned": false}}')
    server = DataDirRedis(redis_dir)
    with server.session() as connection:
        assert server.started and _client(connection).ping()
        assert server.read_state().pid == _servers_of(redis_dir)[0] != os.getpid()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_the_starter_stops_its_server_on_sigterm_and_sighup(tmp_path: Path, signum: int) -> None:
    redis_dir = tmp_path / "redis"
    command = _start_foreground(tmp_path)
    try:
        assert "started" in _wait_for_line(command, "redis-server at")
        (pid,) = _servers_of(redis_dir)
        assert DataDirRedis(redis_dir).read_state().pid == pid
        command.send_signal(signum)
        assert command.wait(timeout=60) == 128 + signum
        assert _servers_of(redis_dir) == [], f"{signal.Signals(signum).name} left the server running"
        assert not (redis_dir / "server.json").exists()
    finally:
        command.kill()


def test_a_sigterm_while_the_server_starts_is_held_back_until_it_is_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_dir = tmp_path / "redis"
    record = DataDirRedis._write_state

    def record_then_sigterm(self: DataDirRedis, state: object) -> None:
        record(self, state)
        if state is not None:  # the server is up and recorded, the lease not taken yet
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(DataDirRedis, "_write_state", record_then_sigterm)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exited, DataDirRedis(redis_dir).session():
        pytest.fail("the command must not go on after SIGTERM")
    assert exited.value.code == 128 + signal.SIGTERM
    assert _servers_of(redis_dir) == [], "the server started during the signal is stopped, not leaked"
    assert signal.getsignal(signal.SIGTERM) is handler, "the previous handler is back"


def test_a_server_started_but_never_recorded_is_stopped_not_doubled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_dir = tmp_path / "redis"
    record = DataDirRedis._write_state

    def die_before_recording(self: DataDirRedis, state: object) -> None:
        if state is not None:
            raise RuntimeError("killed between starting the server and recording it")
        record(self, state)

    with monkeypatch.context() as patch:
        patch.setattr(DataDirRedis, "_write_state", die_before_recording)
        with pytest.raises(RuntimeError, match="killed between"):
            DataDirRedis(redis_dir).acquire()
    (orphan,) = _servers_of(redis_dir)
    assert not (redis_dir / "server.json").exists()
    with DataDirRedis(redis_dir).session():
        assert _servers_of(redis_dir) == [DataDirRedis(redis_dir).read_state().pid] != [orphan]
    assert _servers_of(redis_dir) == []


def test_a_server_left_by_a_sigkilled_command_is_reused_never_doubled(tmp_path: Path) -> None:
    redis_dir = tmp_path / "redis"
    killed = _start_foreground(tmp_path)
    _wait_for_line(killed, "redis-server at")
    (pid,) = _servers_of(redis_dir)
    killed.kill()
    killed.wait()
    assert _servers_of(redis_dir) == [pid], "SIGKILL cannot stop the server: it is left running"
    following = _start_foreground(tmp_path)
    try:
        assert "reusing" in _wait_for_line(following, "redis-server at")
        assert _servers_of(redis_dir) == [pid] and DataDirRedis(redis_dir).read_state().pid == pid
        following.send_signal(signal.SIGTERM)
        assert following.wait(timeout=60) == 128 + signal.SIGTERM
        assert _servers_of(redis_dir) == [], "the last user stops the server it reused"
    finally:
        following.kill()


def test_env_masks_the_password_and_quotes_for_eval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from derm.cli.main import cli

    data_dir = tmp_path / "it's a dir"
    secret = 's3cr\'et $HOME `x` "y"'
    monkeypatch.setenv(DATA_DIR_ENV, str(data_dir))
    monkeypatch.setenv(PROFILE_ENV, "production")
    monkeypatch.setenv(REDIS_CONNECTION_ENV, f"redis.internal:6379,password={secret},ssl=true")
    masked = CliRunner().invoke(cli, ["env"])
    assert masked.exit_code == 0, masked.output
    assert "s3cr" not in masked.stdout and "password=****,ssl=true" in masked.stdout
    assert "--show-secrets" in masked.stderr
    shown = CliRunner().invoke(cli, ["env", "--show-secrets"])
    assert shown.exit_code == 0, shown.output
    script = 'eval "$1"; printf "%s\\n%s" "$DERM_DATA_DIR" "$DERM_REDIS_CONNECTION_STRING"'
    evaluated = subprocess.run(
        ["bash", "-c", script, "-", shown.stdout],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert evaluated.split("\n") == [str(data_dir), f"redis.internal:6379,password={secret},ssl=true"]


def test_env_finds_the_local_server_of_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from derm.cli.main import cli

    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(PROFILE_ENV, "local")
    monkeypatch.delenv(REDIS_CONNECTION_ENV, raising=False)
    with DataDirRedis(tmp_path / "redis").session() as connection:
        password = connection.rsplit("=", 1)[1]
        masked = CliRunner().invoke(cli, ["env"])
        assert password not in masked.stdout and connection.split(",")[0] in masked.stdout
        assert connection in CliRunner().invoke(cli, ["env", "--show-secrets"]).stdout


def test_port_in_use_is_a_clear_error(tmp_path: Path, redis_server: LocalRedisServer) -> None:
    with pytest.raises(RedisServerError, match="exited with code"):
        LocalRedisServer(tmp_path, port=redis_server.port, persist=False).start()


def test_missing_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RedisServerError, match="redis-server not found"):
        LocalRedisServer(tmp_path).start()
