from __future__ import annotations

from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from derm.infra.redis_server import LocalRedisServer, RedisServerError


def test_local_server_starts_answers_persists_and_stops(tmp_path: Path) -> None:
    server = LocalRedisServer(tmp_path, persist=True).start()
    server.client().set("k", "v")
    server.stop()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=server.port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)).ping()
    assert (tmp_path / "dump.rdb").exists(), "persisting server saves on shutdown"
    with LocalRedisServer(tmp_path) as again:
        assert again.client().get("k") == b"v"


def test_detached_server_is_found_and_shut_down(tmp_path: Path) -> None:
    server = LocalRedisServer(tmp_path, persist=False).start()
    server.detach()
    assert LocalRedisServer.running(tmp_path) == server.connection_string
    assert LocalRedisServer.shutdown_detached(tmp_path)
    assert LocalRedisServer.running(tmp_path) is None


def test_port_in_use_is_a_clear_error(tmp_path: Path, redis_server: LocalRedisServer) -> None:
    with pytest.raises(RedisServerError, match="exited with code"):
        LocalRedisServer(tmp_path, port=redis_server.port, persist=False).start()


def test_missing_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RedisServerError, match="redis-server not found"):
        LocalRedisServer(tmp_path).start()
