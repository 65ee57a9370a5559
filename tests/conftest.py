"""Shared fixtures: one real redis-server and one tiny platform per test session.

Feast is imported once per session (it is slow to import here); every store
the tests touch is real: a redis-server process started by the project's own
module, DuckDB over Parquet, Feast's own apply/materialize code.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest

from derm.core.paths import DATA_DIR_ENV, PlatformPaths
from derm.infra.redis_server import LocalRedisServer

TINY_START = date(2026, 1, 1)

# The benchmarks (``python -m bench``) are a folder of the checkout, not part of the installed ``derm``
# package. They are registered here by path alone: putting the checkout on sys.path would also expose its
# folders under their bare names, which no code may rely on (tests run with --import-mode=importlib).
_BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
_bench_spec = importlib.util.spec_from_file_location(
    "bench", _BENCH_DIR / "__init__.py", submodule_search_locations=[str(_BENCH_DIR)]
)
sys.modules.setdefault("bench", importlib.util.module_from_spec(_bench_spec))
_bench_spec.loader.exec_module(sys.modules["bench"])


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
    from derm.events.synthetic import SyntheticConfig, generate_event_log

    generate_event_log(SyntheticConfig.preset("tiny", start_date=TINY_START), platform_paths.events_dir)
    return platform_paths.events_dir


@pytest.fixture(scope="session")
def feast_env(platform_paths: PlatformPaths, redis_server: LocalRedisServer) -> dict[str, str]:
    from derm.core.feast_repo import export_feast_environment, feast_environment

    export_feast_environment(platform_paths, redis_server.connection_string)
    return feast_environment(platform_paths, redis_server.connection_string)


@pytest.fixture(scope="session")
def counting_features(tiny_event_log: Path, platform_paths: PlatformPaths) -> Path:
    from derm.materialization.counting_features import build_counting_features

    build_counting_features(tiny_event_log, platform_paths.stats_dir)
    return platform_paths.stats_dir
