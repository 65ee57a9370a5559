"""SIGKILL promote, rollback, retire and the counting-features job at random instants; the re-run completes or
undoes the operation and every invariant holds (issue 12).

Each trial starts from the same state (ctr v1, v2 and v3 published, v2 promoted after v1; counting
features built from a two-day log), runs one operation in a forked child (Feast already imported, so a
trial costs the operation, not an interpreter), kills it with SIGKILL after a delay drawn over the length
of an uninterrupted run of that operation (fixed seed), and checks:

* at the kill instant: the catalog promotes one version for both families of the model, the old or the
  new one, and so does the registered ``ctr_ranker`` feature service (serving reads no mixed version);
  each counting table is the old or the new table, complete, never missing;
* after re-running the operation: the catalog (no pending change), the registry's feature services and
  views and Redis (every live view ``ok``, a retired version's fields gone, the promoted vectors served)
  agree on the operation's outcome;
* a second re-run changes nothing: catalog bytes, registry objects, Redis contents, counting tables.

``DERM_KILL_TRIALS`` sets the trials per operation (12 by default: with the publisher's 4 of
tests/test_kill_publish.py, 52 kill trials per CI run).
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest

from bench.online_read import unit_vectors
from derm.core.paths import DATA_DIR_ENV, PlatformPaths
from derm.infra.redis_server import LocalRedisServer
from tests.kill_trials import run_killed, template_redis, template_start

pytestmark = pytest.mark.heavy  # minutes of CI: scheduled first (tests/conftest.py)

DAY = date(2026, 3, 1)
FAMILIES = ("ctr_user", "ctr_pin")
VERSIONS = ("v1", "v2", "v3")
ENTITIES = 40
DIM = 8
TRIALS = int(os.environ.get("DERM_KILL_TRIALS", "12"))
TEMPLATE_DB = 1  # the template's Redis keys are kept here; each trial copies them into db 0
COUNTING_TABLES = ("user_daily_stats", "pin_daily_stats", "pin_attributes")


@dataclass
class Template:
    root: Path
    data_dir: Path
    server: LocalRedisServer
    vectors: dict[tuple[str, str], np.ndarray]
    ids: np.ndarray
    new_events: Path
    counting: dict[str, dict[str, list[tuple]]]  # "old" / "new" -> table -> sorted rows
    record: dict[str, list[str]] = field(default_factory=dict)  # operation -> outcome of each trial


def _rows(table_dir: Path) -> list[tuple] | None:
    from derm.core.sql import connect

    files = sorted(str(p) for p in table_dir.glob("*/*.parquet"))
    if not files:
        return None
    with connect() as con:
        return con.execute("SELECT * FROM read_parquet($files) ORDER BY ALL", {"files": files}).fetchall()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Template]:
    from derm.core.feast_repo import FeatureRepo
    from derm.events.synthetic import SyntheticConfig, generate_event_log
    from derm.materialization.counting_features import build_counting_features
    from derm.materialization.promotion import promote
    from derm.materialization.publish import pending_snapshots, publish_batch
    from derm.training.upstream.export import snapshot_available_at, write_precomputed_snapshot

    root, paths, ids, rng = template_start(tmp_path_factory, "kill-ops", first_id=7_000, entities=ENTITIES)
    vectors = {}
    for config, version in zip("abc", VERSIONS, strict=True):
        for family in FAMILIES:
            vectors[family, version] = unit_vectors(rng, ENTITIES, DIM)
            write_precomputed_snapshot(paths, family, DAY, ids, vectors[family, version], config * 64)
    # Counting features: the old tables from a two-day log, the new ones (the job's input) from three days.
    log = SyntheticConfig.preset("tiny", start_date=DAY - timedelta(days=2), n_days=3)
    new_events = root / "events-new"
    generate_event_log(log, new_events)
    shutil.copytree(new_events, paths.events_dir, ignore=shutil.ignore_patterns(f"date={DAY.isoformat()}"))
    build_counting_features(paths.events_dir, paths.stats_dir)
    reference = root / "stats-new"
    build_counting_features(new_events, reference)
    counting = {
        "old": {t: _rows(paths.stats_dir / t) for t in COUNTING_TABLES},
        "new": {t: _rows(reference / t) for t in COUNTING_TABLES},
    }
    assert all(counting["old"][t] != counting["new"][t] for t in COUNTING_TABLES)
    with template_redis(root, paths) as server:
        repo = FeatureRepo()
        now = snapshot_available_at(DAY, timedelta(hours=1))
        batch = publish_batch(pending_snapshots(paths), paths, repo=repo, now=now)
        assert len(batch.published) == len(FAMILIES) * len(VERSIONS), batch.table()
        promote(paths, "ctr", "v2", repo=repo)
        client = server.client()
        for key in client.scan_iter():
            client.copy(key, key, destination_db=TEMPLATE_DB)
        yield Template(root, paths.data_dir, server, vectors, ids, new_events, counting)


def _fresh(template: Template, name: str) -> PlatformPaths:
    """A copy of the template's data directory and Redis, as this trial's."""
    paths = PlatformPaths(template.root / name)
    shutil.copytree(template.data_dir, paths.data_dir)
    template.server.client().flushdb()
    source = template.server.client(db=TEMPLATE_DB)
    for key in source.scan_iter():
        source.copy(key, key, destination_db=0)
    os.environ[DATA_DIR_ENV] = str(paths.data_dir)
    return paths


# ------------------------------------------------------------------------------------------ operations


def _promote(paths: PlatformPaths) -> None:
    from derm.core.feast_repo import FeatureRepo
    from derm.materialization.promotion import promote

    promote(paths, "ctr", "v3", repo=FeatureRepo())


def _rollback(paths: PlatformPaths) -> None:
    from derm.core.feast_repo import FeatureRepo
    from derm.materialization.promotion import rollback

    rollback(paths, "ctr", repo=FeatureRepo(), from_version="v2")


def _retire(paths: PlatformPaths) -> None:
    from derm.core.feast_repo import FeatureRepo
    from derm.materialization.promotion import retire

    retire(paths, "ctr", "v3", repo=FeatureRepo())


def _counting(template: Template) -> Callable[[PlatformPaths], None]:
    def run(paths: PlatformPaths) -> None:
        from derm.materialization.counting_features import build_counting_features

        build_counting_features(template.new_events, paths.stats_dir)

    return run


# operation -> (promoted before, promoted after, history after, retired after)
EXPECTED = {
    "promote": ("v2", "v3", ["v1", "v2"], []),
    "rollback": ("v2", "v1", [], []),
    "retire": ("v2", "v2", ["v1"], ["v3"]),
}


# ------------------------------------------------------------------------------------------ invariants


def _registry_versions(store) -> tuple[dict[str, str], set[str]]:
    """(family -> version in the registered ctr_ranker service, names of the registered ctr embedding views)."""
    service = store.get_feature_service("ctr_ranker", allow_cache=False)
    served = {}
    for projection in service.feature_view_projections:
        for family in FAMILIES:
            if projection.name.startswith(f"{family}_emb_"):
                served[family] = projection.name.removeprefix(f"{family}_emb_")
    views = {v.name for v in store.list_feature_views(allow_cache=False) if v.name.startswith("ctr_")}
    return served, views


def _check_kill_instant(template: Template, paths: PlatformPaths, operation: str) -> str:
    """What a reader finds right after the kill, before anything re-runs; where the kill landed."""
    from derm.core.feast_repo import FeatureRepo
    from derm.core.naming import feature_view_name
    from derm.materialization.catalog import Catalog

    if operation == "counting":
        found = []
        for table in COUNTING_TABLES:
            rows = _rows(paths.stats_dir / table)
            assert rows is not None, f"{table} missing after the kill"
            assert rows in (template.counting["old"][table], template.counting["new"][table]), f"{table} mixed"
            found.append("new" if rows == template.counting["new"][table] else "old")
        return "tables " + "/".join(found)
    before, after, _, _ = EXPECTED[operation]
    state = Catalog(paths.embeddings_offline_dir).read_state()
    promoted = state.promoted
    assert promoted["ctr_user"] == promoted["ctr_pin"] in (before, after), promoted
    served, views = _registry_versions(FeatureRepo().store())
    assert set(served) == set(FAMILIES) and served["ctr_user"] == served["ctr_pin"] in (before, after), served
    # Where the kill landed: the catalog, then the registry (and for a retirement Redis) show how far it got.
    catalog = "pending" if state.pending else ("done" if state.last_change else "untouched")
    if operation == "retire":
        client = template.server.client()
        gone = {f"_ts:{feature_view_name(f, 'v3')}".encode() for f in FAMILIES}
        held = sum(1 for key in client.scan_iter() if gone & set(client.hkeys(key)))
        dropped = sum(feature_view_name(f, "v3") not in views for f in FAMILIES)
        return f"catalog {catalog}, Redis keys with v3 {held}, registry views dropped {dropped}/2"
    return f"catalog {catalog}, registry serves {served['ctr_user']}"


def _check_outcome(template: Template, paths: PlatformPaths, operation: str) -> None:
    from derm.core.feast_repo import FeatureRepo
    from derm.core.naming import feature_name, feature_view_name, join_key
    from derm.materialization.catalog import Catalog
    from derm.materialization.online_state import online_status

    if operation == "counting":
        for table in COUNTING_TABLES:
            assert _rows(paths.stats_dir / table) == template.counting["new"][table], table
        return
    _, promoted, history, retired = EXPECTED[operation]
    state = Catalog(paths.embeddings_offline_dir).read_state()
    assert state.pending is None
    assert {f: state.promoted[f] for f in FAMILIES} == dict.fromkeys(FAMILIES, promoted)
    assert {f: state.history.get(f, []) for f in FAMILIES} == dict.fromkeys(FAMILIES, history)
    assert {f: state.retired.get(f, []) for f in FAMILIES} == dict.fromkeys(FAMILIES, retired)
    store = FeatureRepo().store()
    served, views = _registry_versions(store)
    live = [v for v in VERSIONS if v not in retired]
    assert served == dict.fromkeys(FAMILIES, promoted)
    assert views == {feature_view_name(f, v) for f in FAMILIES for v in live}
    statuses = {s.view: s.status for s in online_status(paths, FeatureRepo(), sample=ENTITIES)}
    assert {s for v, s in statuses.items() if v.startswith("ctr_")} == {"ok"}, statuses
    client = template.server.client()
    gone = {f"_ts:{feature_view_name(f, v)}".encode() for f in FAMILIES for v in retired}
    stranded = [key for key in client.scan_iter() if gone & set(client.hkeys(key))]
    assert not stranded, f"{len(stranded)} Redis keys still hold a retired view"
    for family in FAMILIES:
        served_rows = store.get_online_features(
            features=[f"{feature_view_name(family, promoted)}:{feature_name(family)}"],
            entity_rows=[{join_key(family): int(i)} for i in template.ids],
        ).to_dict()[feature_name(family)]
        np.testing.assert_array_equal(np.array(served_rows, dtype=np.float32), template.vectors[family, promoted])


def _fingerprint(template: Template, paths: PlatformPaths) -> tuple:
    """Everything an operation could change: catalog bytes, registry objects, Redis contents, counting tables."""
    from derm.core.feast_repo import FeatureRepo
    from derm.materialization.catalog import Catalog

    store = FeatureRepo().store()
    registry = sorted(
        (kind, obj.name, obj.to_proto().spec.SerializeToString(deterministic=True))
        for kind, objs in (("view", store.list_feature_views()), ("service", store.list_feature_services()))
        for obj in objs
    )
    client = template.server.client()
    redis_digest = hashlib.sha256()
    for key in sorted(client.scan_iter()):
        redis_digest.update(key)
        for name, value in sorted(client.hgetall(key).items()) if client.type(key) == b"hash" else []:
            redis_digest.update(name + value)
    tables = tuple(str(_rows(paths.stats_dir / t)) for t in COUNTING_TABLES)
    catalog = Catalog(paths.embeddings_offline_dir).state_path.read_bytes()
    return catalog, registry, redis_digest.hexdigest(), tables


# ------------------------------------------------------------------------------------------ the trials


@pytest.mark.parametrize("operation", ["promote", "rollback", "retire", "counting"])
def test_operation_killed_at_random_instants_recovers(template: Template, operation: str) -> None:
    run = (
        _counting(template)
        if operation == "counting"
        else {"promote": _promote, "rollback": _rollback, "retire": _retire}[operation]
    )
    # An uninterrupted run, for the span the kill instants are drawn from.
    paths = _fresh(template, f"{operation}-0")
    began = time.perf_counter()
    run(paths)
    span = time.perf_counter() - began
    _check_outcome(template, paths, operation)

    rng = random.Random(f"kill-{operation}")
    outcomes = template.record.setdefault(operation, [])
    for trial in range(1, TRIALS + 1):
        paths = _fresh(template, f"{operation}-{trial}")
        ended = run_killed(functools.partial(run, paths), rng.uniform(0.0, span))
        outcomes.append(ended)
        print(f"{operation} trial {trial}: {ended}; {_check_kill_instant(template, paths, operation)}")
        run(paths)  # the re-run finishes (or redoes) whatever the kill interrupted
        _check_outcome(template, paths, operation)
        before = _fingerprint(template, paths)
        run(paths)  # and a second re-run changes nothing
        assert _fingerprint(template, paths) == before, "a second re-run changed something"
    print(
        f"{operation}: {TRIALS} kill trials, {outcomes.count('killed')} killed mid-run, span {span:.2f} s, "
        "0 invariant violations"
    )
