"""Shared fixtures: one real redis-server and one tiny platform per test session.

Feast is imported once per session (it is slow to import here); every store
the tests touch is real: a redis-server process started by the project's own
module, DuckDB over Parquet, Feast's own apply/materialize code.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest

from infra.redis_server import LocalRedisServer
from pipeline.config import DATA_DIR_ENV, PlatformPaths

TINY_START = date(2026, 1, 1)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisServer]:
    with LocalRedisServer(tmp_path_factory.mktemp("redis"), persist=False) as server:
        yield server


@pytest.fixture(scope="session")
def platform_paths(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlatformPaths]:
    """A session data directory; ``DERM_DATA_DIR`` points at it so the feature repo reads it."""
    paths = PlatformPaths(tmp_path_factory.mktemp("data"))
    previous = os.environ.get(DATA_DIR_ENV)
    os.environ[DATA_DIR_ENV] = str(paths.data_dir)
    yield paths
    if previous is None:
        os.environ.pop(DATA_DIR_ENV, None)
    else:
        os.environ[DATA_DIR_ENV] = previous


@pytest.fixture(scope="session")
def tiny_event_log(platform_paths: PlatformPaths) -> Path:
    from events.synthetic import SyntheticConfig, generate_event_log

    generate_event_log(SyntheticConfig.preset("tiny", start_date=TINY_START), platform_paths.events_dir)
    return platform_paths.events_dir


@pytest.fixture(scope="session")
def feast_env(platform_paths: PlatformPaths, redis_server: LocalRedisServer) -> dict[str, str]:
    from pipeline.feast_repo import export_feast_environment, feast_environment

    export_feast_environment(platform_paths, redis_server.connection_string)
    return feast_environment(platform_paths, redis_server.connection_string)


@pytest.fixture(scope="session")
def counting_features(tiny_event_log: Path, platform_paths: PlatformPaths) -> Path:
    from materialization.counting_features import build_counting_features

    build_counting_features(tiny_event_log, platform_paths.stats_dir)
    return platform_paths.stats_dir


def redis_contents(client) -> dict[bytes, dict[bytes, bytes]]:
    """Every key and hash field of a Redis database, for before/after comparisons."""
    return {key: client.hgetall(key) for key in client.scan_iter(count=1000)}
