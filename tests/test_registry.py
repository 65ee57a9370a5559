"""Feast's SQL registry on SQLite: concurrent writers keep each other's changes, a SIGKILL mid-write leaves a
readable registry, a file registry of an older data directory is migrated, readers see changes (issue 12).

Real parts: Feast's SqlRegistry over a SQLite file in the module's data directory, the project's
``feature_repo`` applied through ``feast apply``'s own code, forked processes writing at once, the ``feast`` CLI.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from derm.core.feast_repo import FeatureRepo, apply_repo, export_feast_environment, feature_store
from derm.core.paths import DATA_DIR_ENV, FEATURE_REPO_DIR, PlatformPaths

TRIALS = int(os.environ.get("DERM_KILL_TRIALS", "3"))
WRITES = 12


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory, redis_server):
    previous = os.environ.get(DATA_DIR_ENV)
    paths = PlatformPaths(tmp_path_factory.mktemp("registry"))
    export_feast_environment(paths, redis_server.connection_string)
    apply_repo()  # nothing published: the entities, counting views and their services
    yield paths
    if previous is not None:
        export_feast_environment(PlatformPaths(previous), redis_server.connection_string)


def _probe(name: str):
    from feast import FeatureService

    view = feature_store().get_feature_view("user_daily_stats")
    return FeatureService(name=name, features=[view], tags={"probe": name})


def _in_child(work) -> int:
    """Run ``work`` in a forked child (Feast already imported); its pid. The child never returns."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        finally:
            os._exit(code)
    return pid


def _integrity(path: Path) -> str:
    with sqlite3.connect(path) as con:
        return con.execute("PRAGMA integrity_check").fetchone()[0]


def test_the_registry_is_a_sqlite_file_in_the_data_dir(paths: PlatformPaths) -> None:
    from feast.infra.registry.sql import SqlRegistry

    store = FeatureRepo().store()
    assert isinstance(store.registry, SqlRegistry)
    assert paths.registry_path.read_bytes()[:16] == b"SQLite format 3\x00"
    assert _integrity(paths.registry_path) == "ok"
    assert {"ctr_ranker", "cvr_ranker"} <= {s.name for s in store.list_feature_services()}


def test_concurrent_apply_and_materialize_keep_each_others_changes(paths: PlatformPaths) -> None:
    """One process registers feature services while another records materialization intervals of a view.

    Feast's file registry rewrote the whole file on each write, so each process overwrote the other's
    changes (this scenario run by hand on the file registry: one run lost 12 of the 24 changes, another
    lost the view itself); the SQL registry writes one row per object.
    """
    start = datetime(2026, 1, 1, tzinfo=UTC)

    def register() -> None:
        store = feature_store()
        for i in range(WRITES):
            store.apply([_probe(f"concurrent_{i}")])

    def materialize() -> None:
        store = feature_store()
        view = store.get_feature_view("pin_daily_stats")
        for i in range(WRITES):
            begin = start + timedelta(days=i)
            store.registry.apply_materialization(view, store.project, begin, begin + timedelta(hours=1))

    pids = [_in_child(register), _in_child(materialize)]
    statuses = [os.waitpid(pid, 0)[1] for pid in pids]
    assert [os.waitstatus_to_exitcode(s) for s in statuses] == [0, 0]
    store = feature_store()
    services = {s.name for s in store.list_feature_services()}
    assert {f"concurrent_{i}" for i in range(WRITES)} <= services
    intervals = store.get_feature_view("pin_daily_stats").materialization_intervals
    assert {begin for begin, _ in intervals} >= {start + timedelta(days=i) for i in range(WRITES)}
    assert {"ctr_ranker", "cvr_ranker"} <= services  # the applied repository is untouched


def test_sigkill_during_registry_writes_leaves_a_readable_registry(paths: PlatformPaths) -> None:
    rng = random.Random(7)
    for trial in range(TRIALS):

        def write_forever(trial: int = trial) -> None:
            store = feature_store()
            for i in range(10_000):
                store.apply([_probe(f"killed_{trial}_{i}")])

        pid = _in_child(write_forever)
        time.sleep(rng.uniform(1.0, 4.0))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), "the writer ended before the kill"
        assert _integrity(paths.registry_path) == "ok"
        store = feature_store()
        probes = [s for s in store.list_feature_services() if s.name.startswith(f"killed_{trial}_")]
        # Every service is whole (its view, its tag), and they were written in order: no gap.
        assert all(
            s.tags == {"probe": s.name} and [p.name for p in s.feature_view_projections] == ["user_daily_stats"]
            for s in probes
        )
        assert sorted(int(s.name.rsplit("_", 1)[1]) for s in probes) == list(range(len(probes)))
    apply_repo()  # and the next apply works on it
    assert feature_store().get_feature_service("ctr_ranker")


def test_readers_see_a_change_within_the_cache_ttl(paths: PlatformPaths) -> None:
    reader = feature_store()
    reader.get_feature_service("ctr_ranker", allow_cache=True)  # loads the reader's cache
    feature_store().apply([_probe("promoted_meanwhile")])
    names = {s.name for s in reader.registry.list_feature_services(reader.project, allow_cache=True)}
    assert "promoted_meanwhile" not in names  # cached: within cache_ttl_seconds a reader may lag
    assert reader.get_feature_service("promoted_meanwhile", allow_cache=False)  # an uncached read sees it now
    ttl = reader.config.registry.cache_ttl_seconds
    assert ttl == 60
    # Once the cache is older than the TTL, the next cached read refreshes it (the clock moved, not Feast's code).
    reader.registry.cached_registry_proto_created -= timedelta(seconds=ttl + 1)
    assert reader.get_feature_service("promoted_meanwhile", allow_cache=True)


def test_a_file_registry_is_migrated_with_its_intervals(paths: PlatformPaths, tmp_path: Path) -> None:
    """A data directory from before the switch: its protobuf registry becomes the SQLite one, nothing lost."""
    from feast import FeatureStore
    from feast.infra.registry.sql import SqlRegistry
    from feast.repo_config import RegistryConfig, load_repo_config
    from feast.repo_operations import apply_total

    from derm.core.paths import feature_store_yaml

    old = PlatformPaths(tmp_path / "old")
    old.data_dir.mkdir()
    os.environ[DATA_DIR_ENV] = str(old.data_dir)
    try:
        config = load_repo_config(FEATURE_REPO_DIR, feature_store_yaml())
        config.registry_config = RegistryConfig(registry_type="file", path=str(old.registry_path))
        config._registry = None
        cwd = os.getcwd()
        try:
            apply_total(config, FEATURE_REPO_DIR, skip_source_validation=False)
        finally:
            os.chdir(cwd)
        file_store = FeatureStore(repo_path=str(FEATURE_REPO_DIR), config=config)
        view = file_store.get_feature_view("user_daily_stats")
        begin = datetime(2026, 2, 1, tzinfo=UTC)
        file_store.registry.apply_materialization(view, file_store.project, begin, begin + timedelta(days=1))
        before = {v.name: v.materialization_intervals for v in file_store.list_feature_views()}
        services = sorted(s.name for s in file_store.list_feature_services())
        assert old.registry_path.read_bytes()[:16] != b"SQLite format 3\x00"

        migrated = feature_store()
        assert isinstance(migrated.registry, SqlRegistry)
        assert {v.name: v.materialization_intervals for v in migrated.list_feature_views()} == before
        assert sorted(s.name for s in migrated.list_feature_services()) == services
        assert old.registry_path.read_bytes()[:16] == b"SQLite format 3\x00"
        assert (old.data_dir / "registry.db.file-registry").exists()

        # The feast CLI reads the migrated registry as it is.
        listed = subprocess.run(
            [str(Path(sys.executable).with_name("feast")), "-c", str(FEATURE_REPO_DIR), "feature-views", "list"],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        ).stdout
        assert {"user_daily_stats", "pin_daily_stats", "pin_attributes"} <= {
            line.split()[0] for line in listed.splitlines()[1:] if line.strip()
        }
    finally:
        os.environ[DATA_DIR_ENV] = str(paths.data_dir)


def test_a_data_dir_sqlalchemy_would_misread_is_refused(paths: PlatformPaths, tmp_path: Path) -> None:
    from derm.core.feast_repo import RegistryPathError

    odd = tmp_path / "what?now"
    odd.mkdir()
    os.environ[DATA_DIR_ENV] = str(odd)
    try:
        with pytest.raises(RegistryPathError, match=r"what\?now"):
            feature_store()
    finally:
        os.environ[DATA_DIR_ENV] = str(paths.data_dir)


def test_an_apply_killed_part_way_is_finished_before_the_registry_is_read(paths: PlatformPaths, tmp_path: Path) -> None:
    """The SQL registry writes each object on its own: a killed ``feast apply`` left a view without its entity
    (seen in the publish kill suite). Its mark makes the next :func:`feature_store` apply again first."""
    fresh = PlatformPaths(tmp_path / "fresh")
    fresh.data_dir.mkdir()
    os.environ[DATA_DIR_ENV] = str(fresh.data_dir)
    try:
        began = time.perf_counter()
        apply_repo()
        span = time.perf_counter() - began
        complete = _registry_objects(feature_store())
        rng = random.Random(11)
        for trial in range(TRIALS):
            fresh.registry_path.unlink()
            pid = _in_child(apply_repo)
            time.sleep(rng.uniform(0.3 * span, 0.9 * span))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            assert _registry_objects(feature_store()) == complete, f"trial {trial}"
            assert not fresh.registry_path.with_name(".registry.db.applying").exists()
    finally:
        os.environ[DATA_DIR_ENV] = str(paths.data_dir)


def _registry_objects(store) -> dict[str, list[str]]:
    return {
        "entities": sorted(e.name for e in store.list_entities()),
        "views": sorted(v.name for v in store.list_feature_views()),
        "services": sorted(s.name for s in store.list_feature_services()),
    }
