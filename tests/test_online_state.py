"""Redis compared with the catalog, and the repair (issue 12: a Redis that comes back empty is noticed).

A private redis-server of this module's own (its keys are counted and flushed), a data dir of its own,
real Feast publishes: the catalog's online days are checked against Redis entity by entity.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, timedelta

import numpy as np
import pytest
from click.testing import CliRunner

from bench.online_read import feast_environment, unit_vectors
from derm.core.paths import PlatformPaths
from derm.infra.redis_server import LocalRedisServer

DAYS = (date(2026, 2, 1), date(2026, 2, 2))
USERS = 40
DIM = 8


@dataclass
class Published:
    paths: PlatformPaths
    server: LocalRedisServer
    vectors: dict[date, np.ndarray]

    def client(self):
        return self.server.client()


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    return unit_vectors(rng, n, DIM)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    from derm.core.feast_repo import FeatureRepo
    from derm.materialization.publish import publish_snapshot
    from derm.training.upstream.export import snapshot_available_at, write_precomputed_snapshot

    root = tmp_path_factory.mktemp("online-state")
    with LocalRedisServer(root / "redis", persist=False) as server:
        paths = PlatformPaths(root / "data")
        with feast_environment(paths, server.connection_string):
            rng = np.random.default_rng(0)
            base = _unit(rng, USERS)
            vectors = {}
            ids = np.arange(10**12, 10**12 + USERS, dtype=np.int64)  # sparse 64-bit ids, not 0..n
            for offset, day in enumerate(DAYS):
                moved = base + 0.05 * offset * _unit(rng, USERS)
                vectors[day] = moved / np.linalg.norm(moved, axis=1, keepdims=True)
                directory = write_precomputed_snapshot(paths, "ctr_user", day, ids, vectors[day], "e" * 64)
                result = publish_snapshot(
                    directory, paths, repo=FeatureRepo(), now=snapshot_available_at(day, timedelta(hours=1))
                )
                # The count comes from Redis, not from the manifest.
                assert result.online_rows == USERS and "40 of the snapshot's 40 rows held" in result.summary()
            yield Published(paths, server, vectors)


def _status(published: Published, view: str = "ctr_user_emb_v1") -> dict[str, str]:
    from derm.core.feast_repo import FeatureRepo
    from derm.materialization.online_state import online_status

    return {state.view: state.status for state in online_status(published.paths, FeatureRepo()) if state.view == view}


def _served(published: Published) -> np.ndarray:
    from derm.core.feast_repo import FeatureRepo

    ids = [10**12 + i for i in range(USERS)]
    response = (
        FeatureRepo()
        .store()
        .get_online_features(features=["ctr_user_emb_v1:ctr_user_emb"], entity_rows=[{"user_id": i} for i in ids])
    )
    values = response.to_dict()["ctr_user_emb"]
    return np.array([[np.nan] * DIM if v is None else v for v in values], dtype=np.float32)


def test_published_days_carry_a_watermark_in_redis(published: Published) -> None:
    from derm.core.feast_repo import FeatureRepo
    from derm.materialization.online_state import read_watermarks

    assert _status(published) == {"ctr_user_emb_v1": "ok"}
    watermarks = read_watermarks(published.client(), FeatureRepo().store().project)
    # Other tests of the module may publish another version first (random order): judge this view's own.
    assert watermarks["ctr_user_emb_v1"] == (DAYS[-1], USERS)
    np.testing.assert_allclose(_served(published), published.vectors[DAYS[-1]], rtol=1e-6)


def test_a_redis_restarted_empty_is_reported_and_repaired(published: Published) -> None:
    from derm.cli.publishing import freshness_command, repair_command

    published.client().flushall()
    assert _status(published) == {"ctr_user_emb_v1": "empty"}
    checked = CliRunner().invoke(freshness_command, [])
    assert (
        checked.exit_code == 1
        and "empty" in checked.output
        and "ctr_user_emb_v1: empty" in checked.output
        and "derm repair" in checked.output
    )

    repaired = CliRunner().invoke(repair_command, [])

    assert repaired.exit_code == 0, repaired.output
    assert "ctr_user_emb_v1: 2 published days re-materialized; Redis holds 40 of the newest day's 40" in repaired.output
    assert _status(published) == {"ctr_user_emb_v1": "ok"}
    np.testing.assert_allclose(_served(published), published.vectors[DAYS[-1]], rtol=1e-6)
    again = CliRunner().invoke(repair_command, [])
    assert again.exit_code == 0 and "nothing to repair" in again.output, "a second repair is a no-op"


def test_lost_entities_make_the_view_stale_until_repaired(published: Published) -> None:
    from derm.core.feast_repo import FeatureRepo
    from derm.materialization.online_state import repair

    client = published.client()
    user_keys = [key for key in client.scan_iter() if not key.startswith(b"derm:")]
    client.delete(*user_keys[: len(user_keys) // 2])
    # The watermark survived (the same server), but half of the day's entities did not.
    assert _status(published) == {"ctr_user_emb_v1": "stale"}

    # Other user views published by other tests of the module lost their keys too: judge this view's repair.
    item = {repaired.view: repaired for repaired in repair(published.paths, FeatureRepo())}["ctr_user_emb_v1"]

    assert (item.rows_held, item.rows_expected) == (USERS, USERS)
    assert _status(published) == {"ctr_user_emb_v1": "ok"}
    np.testing.assert_allclose(_served(published), published.vectors[DAYS[-1]], rtol=1e-6)


def test_an_older_day_restored_is_stale(published: Published) -> None:
    from derm.core.feast_repo import FeatureRepo
    from derm.materialization.online_state import WATERMARK_KEY, repair

    project = FeatureRepo().store().project
    client = published.client()
    client.flushall()
    # A dump from before the second day: the first day's rows and watermark only.
    first = DAYS[0]
    FeatureRepo().store().materialize(
        start_date=_at(first) - timedelta(seconds=1), end_date=_at(first) + timedelta(seconds=1),
        feature_views=["ctr_user_emb_v1"],
    )  # fmt: skip
    client.hset(WATERMARK_KEY.format(project=project), "ctr_user_emb_v1", f"{first.isoformat()}|{USERS}")
    assert _status(published) == {"ctr_user_emb_v1": "stale"}
    repair(published.paths, FeatureRepo())
    assert _status(published) == {"ctr_user_emb_v1": "ok"}


def _at(day: date):
    from derm.training.upstream.export import snapshot_available_at

    return snapshot_available_at(day, timedelta(hours=1)).astimezone(UTC)


def test_a_day_offline_but_never_online_is_stale_until_repaired(published: Published) -> None:
    """A publish killed between its offline and online steps: the catalog never marked the day online."""
    from derm.core.feast_repo import FeatureRepo
    from derm.core.snapshot import read_manifest
    from derm.materialization.catalog import Catalog
    from derm.materialization.online_state import online_status, repair
    from derm.materialization.publish import publish_snapshot, write_offline_partition
    from derm.training.upstream.export import write_precomputed_snapshot

    rng = np.random.default_rng(5)
    ids = np.arange(7, 7 + USERS, dtype=np.int64)
    vectors = [_unit(rng, USERS) for _ in DAYS]
    # Another model version, so the other tests' view is left alone.
    first = write_precomputed_snapshot(published.paths, "ctr_user", DAYS[0], ids, vectors[0], "f" * 64)
    publish_snapshot(first, published.paths, repo=FeatureRepo(), now=_at(DAYS[0]) + timedelta(hours=1))
    second = write_precomputed_snapshot(published.paths, "ctr_user", DAYS[1], ids, vectors[1], "f" * 64)
    catalog = Catalog(published.paths.embeddings_offline_dir)
    write_offline_partition(catalog, read_manifest(second), second)  # ... and the process died here

    [state] = [s for s in online_status(published.paths, FeatureRepo()) if s.view == "ctr_user_emb_v2"]
    assert state.status == "stale" and state.catalog_day == DAYS[0] and state.offline_day == DAYS[1]
    assert "offline up to 2026-02-02" in state.describe()

    repaired = {item.view: item for item in repair(published.paths, FeatureRepo())}

    assert (repaired["ctr_user_emb_v2"].rows_held, repaired["ctr_user_emb_v2"].days) == (USERS, 2)
    assert catalog.read_state().online["ctr_user"]["v2"] == DAYS[1].isoformat()
    assert _status(published, "ctr_user_emb_v2") == {"ctr_user_emb_v2": "ok"}
    response = (
        FeatureRepo()
        .store()
        .get_online_features(features=["ctr_user_emb_v2:ctr_user_emb"], entity_rows=[{"user_id": int(i)} for i in ids])
    )
    np.testing.assert_allclose(np.array(response.to_dict()["ctr_user_emb"]), vectors[1], rtol=1e-6)


def test_the_promoted_state_serving_checks_sees_a_redis_restarted_empty(published: Published) -> None:
    """What ``/health`` reports under ``online`` and what makes ``/rank`` answer 503 (serving/service.py)."""
    from derm.core.feast_repo import FeatureRepo
    from derm.materialization.catalog import Catalog
    from derm.materialization.online_state import promoted_online_state, repair

    catalog, client = Catalog(published.paths.embeddings_offline_dir), published.client()
    project = FeatureRepo().store().project
    assert promoted_online_state(catalog, client, project)["ctr_user"] == "ok"
    client.flushall()
    assert promoted_online_state(catalog, client, project)["ctr_user"] == "empty"
    repair(published.paths, FeatureRepo())
    assert promoted_online_state(catalog, client, project)["ctr_user"] == "ok"
    key = "derm:online_watermark:" + project
    client.hdel(key, "ctr_user_emb_v1")
    assert promoted_online_state(catalog, client, project)["ctr_user"] == "missing"
    repair(published.paths, FeatureRepo())
