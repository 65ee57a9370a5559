"""Shared fixtures: per test module, one real redis-server and one tiny platform.

Every store the tests touch is real: a redis-server process started by the project's own module,
DuckDB over Parquet, Feast's own apply/materialize code. The fixtures are module-scoped so that no
module sees (or flushes) another module's Redis keys, registry or data directory, and modules run in
any order: pytest-randomly (a test dependency) shuffles the modules and the tests inside them on
every run; ``-p no:randomly`` runs them in file order.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest

from derm.core.paths import DATA_DIR_ENV, REDIS_CONNECTION_ENV, REDIS_TYPE_ENV, PlatformPaths
from derm.infra.redis_server import LocalRedisServer

TINY_START = date(2026, 1, 1)
_FEAST_VARIABLES = (DATA_DIR_ENV, REDIS_CONNECTION_ENV, REDIS_TYPE_ENV)

# The benchmarks (``python -m bench``) are a folder of the checkout, not part of the installed ``derm``
# package. They are registered here by path alone: putting the checkout on sys.path would also expose its
# folders under their bare names, which no code may rely on (tests run with --import-mode=importlib).
_BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
_bench_spec = importlib.util.spec_from_file_location(
    "bench", _BENCH_DIR / "__init__.py", submodule_search_locations=[str(_BENCH_DIR)]
)
sys.modules.setdefault("bench", importlib.util.module_from_spec(_bench_spec))
_bench_spec.loader.exec_module(sys.modules["bench"])


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    # pytest-randomly names its seed in the report header, which -q hides; a failure that depends on
    # the order is reproducible only with the seed, so the summary repeats it.
    if config.pluginmanager.hasplugin("randomly") and config.getoption("randomly_reorganize"):
        seed = config.getoption("randomly_seed")
        terminalreporter.write_line(f"random test order; reproduce it with: -p randomly --randomly-seed={seed}")


@pytest.hookimpl(trylast=True)  # after pytest-randomly's shuffle, which it keeps within each group
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The CI runs two xdist workers, each taking whole modules in this order; a module of minutes
    # (marked ``heavy``) drawn last would leave the other worker idle until it ends.
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


def _restore(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisServer]:
    """A redis-server of the module's own: every database in it belongs to that module."""
    with LocalRedisServer(tmp_path_factory.mktemp("redis"), persist=False) as server:
        yield server


@pytest.fixture(scope="module")
def platform_paths(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlatformPaths]:
    """The module's data directory; ``DERM_DATA_DIR`` points at it so the feature repo reads it."""
    paths = PlatformPaths(tmp_path_factory.mktemp("data"))
    saved = {name: os.environ.get(name) for name in _FEAST_VARIABLES}
    os.environ[DATA_DIR_ENV] = str(paths.data_dir)
    yield paths
    _restore(saved)


@pytest.fixture(scope="module")
def tiny_event_log(platform_paths: PlatformPaths) -> Path:
    from derm.events.synthetic import SyntheticConfig, generate_event_log

    generate_event_log(SyntheticConfig.preset("tiny", start_date=TINY_START), platform_paths.events_dir)
    return platform_paths.events_dir


@pytest.fixture(scope="module")
def feast_env(platform_paths: PlatformPaths, redis_server: LocalRedisServer) -> Iterator[dict[str, str]]:
    from derm.core.feast_repo import export_feast_environment, feast_environment

    saved = {name: os.environ.get(name) for name in _FEAST_VARIABLES}
    export_feast_environment(platform_paths, redis_server.connection_string)
    yield feast_environment(platform_paths, redis_server.connection_string)
    _restore(saved)


@pytest.fixture(scope="module")
def counting_features(tiny_event_log: Path, platform_paths: PlatformPaths) -> Path:
    from derm.materialization.counting_features import build_counting_features

    build_counting_features(tiny_event_log, platform_paths.stats_dir)
    return platform_paths.stats_dir


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray for a module (starting one costs ~20 s here); shut down after, unless it was already up."""
    import ray

    from derm.feast_plugins.ray_asof_offline_store import RayAsofOfflineStoreConfig, ensure_ray

    started = not ray.is_initialized()
    ensure_ray(RayAsofOfflineStoreConfig(num_cpus=2))
    yield
    if started:
        ray.shutdown()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine two spinning threads run several times slower.

    Modules that train use it for every test: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
