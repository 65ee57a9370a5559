"""Publishing snapshots into Feast: offline Parquet, registry, real Redis; promote, rollback, retire, crash safety."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from derm.core.feast_repo import FeatureRepo
from derm.core.naming import COUNTING_VIEWS, PIN_ATTRIBUTES_VIEW, feature_view_name
from derm.core.paths import PlatformPaths
from derm.core.snapshot import file_sha256, read_manifest, snapshot_dir
from derm.materialization.catalog import Catalog
from derm.training.upstream.export import snapshot_available_at, write_precomputed_snapshot

DIM = 8
USERS = 40
DAY1 = date(2026, 1, 2)
NOW = datetime(2026, 1, 6, 12, tzinfo=UTC)


def redis_contents(client) -> dict[bytes, dict[bytes, bytes]]:
    """Every key and hash field of a Redis database, for before/after comparisons."""
    return {key: client.hgetall(key) for key in client.scan_iter(count=1000)}


def _unit_rows(seed: int, n: int = USERS) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def make_snapshot(
    paths: PlatformPaths, day: date, vectors: np.ndarray, *, version_seed: str = "a", family: str = "ctr_user"
) -> Path:
    return write_precomputed_snapshot(
        paths, family, day, np.arange(len(vectors)), vectors, config_hash=version_seed * 64
    )


def drifted(previous: np.ndarray, seed: int) -> np.ndarray:
    """Next day's vectors: a small step from the previous ones, as the EMA refresh produces."""
    step = previous + 0.1 * _unit_rows(seed, len(previous))
    return (step / np.linalg.norm(step, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def published(platform_paths: PlatformPaths, counting_features: Path, feast_env: dict[str, str]):
    """ctr_user v1 published for two days (auto-promoted: the family had no version yet)."""
    from derm.materialization.publish import publish_snapshot

    day1 = _unit_rows(1)
    day2 = drifted(day1, 2)
    results = [
        publish_snapshot(
            make_snapshot(platform_paths, DAY1 + timedelta(days=i), v), platform_paths, repo=FeatureRepo(), now=NOW
        )
        for i, v in enumerate([day1, day2])
    ]
    return {"day1": day1, "day2": day2, "results": results}


def _online(ids: list[int], view: str = "ctr_user_emb_v1", family: str = "ctr_user") -> np.ndarray:
    from derm.core.feast_repo import feature_store
    from derm.core.naming import feature_name, join_key

    feature = feature_name(family)
    rows = [{join_key(family): i} for i in ids]
    return feature_store().get_online_features(features=[f"{view}:{feature}"], entity_rows=rows).to_dict()[feature]


def online_days(client, view: str) -> Counter:
    """How many entities Redis holds for a feature view, by the availability time of the row stored.

    Read from the store itself (the view's ``_ts:<view>`` field of each entity hash), not from what
    the publisher reports.
    """
    from google.protobuf.timestamp_pb2 import Timestamp

    held: Counter = Counter()
    for key in client.scan_iter(count=1000):
        stamp = client.hget(key, f"_ts:{view}")
        if stamp is not None:
            held[Timestamp.FromString(stamp).ToDatetime(tzinfo=UTC)] += 1
    return held


def test_publish_writes_offline_registers_view_and_serves_online(
    published, platform_paths: PlatformPaths, redis_server
) -> None:
    from derm.core.feast_repo import feature_store

    first, second = published["results"]
    assert first.promoted and not second.promoted and first.offline_written and second.offline_written
    # Redis holds every entity of the view, at the newest day published.
    day2_ts = snapshot_available_at(DAY1 + timedelta(days=1), timedelta(hours=1))
    assert online_days(redis_server.client(), "ctr_user_emb_v1") == {day2_ts: USERS}
    catalog = Catalog(platform_paths.embeddings_offline_dir)
    versions = [(p.family, p.version, p.days) for p in catalog.versions() if p.family == "ctr_user"]
    assert versions == [("ctr_user", "v1", (DAY1, DAY1 + timedelta(days=1)))]

    store = feature_store()
    view = store.get_feature_view("ctr_user_emb_v1")
    assert view.tags == {"family": "ctr_user", "model_version": "v1", "dim": str(DIM)}
    assert [f.name for f in view.features] == ["ctr_user_emb"]
    ranker = store.get_feature_service("ctr_ranker")
    # The counting views and every promoted embedding view; other tests of the module may have published and
    # promoted other families first (random order), so those are judged against the catalog.
    promoted = {f"{family}_emb_{version}" for family, version in catalog.read_state().promoted.items()}
    assert {p.name for p in ranker.feature_view_projections} == {"user_daily_stats", "pin_daily_stats"} | promoted
    assert "ctr_user_emb_v1" in promoted
    assert store.get_feature_service("ctr_embeddings_v1")

    online = np.asarray(_online(list(range(USERS))), dtype=np.float32)
    np.testing.assert_array_equal(online, published["day2"])
    assert _online([USERS + 5]) == [None]

    # Offline, point in time: an event between the two snapshots sees day 1, one after sees day 2.
    import pandas as pd

    entity_df = pd.DataFrame(
        {"user_id": [3, 3], "event_timestamp": [day2_ts - timedelta(minutes=1), day2_ts + timedelta(minutes=1)]}
    )
    hist = store.get_historical_features(entity_df=entity_df, features=["ctr_user_emb_v1:ctr_user_emb"]).to_df()
    hist = hist.sort_values("event_timestamp")
    np.testing.assert_array_equal(np.asarray(hist["ctr_user_emb"].iloc[0], np.float32), published["day1"][3])
    np.testing.assert_array_equal(np.asarray(hist["ctr_user_emb"].iloc[1], np.float32), published["day2"][3])


def _store_state(paths: PlatformPaths, redis_server) -> tuple:
    files = sorted((p, p.stat().st_mtime_ns) for p in paths.embeddings_offline_dir.rglob("*") if p.is_file())
    return files, redis_contents(redis_server.client()), paths.registry_path.read_bytes()


def test_republishing_the_same_day_is_a_no_op(published, platform_paths: PlatformPaths) -> None:
    from derm.materialization.publish import publish_snapshot

    source = snapshot_dir(platform_paths.snapshots_dir, "ctr_user", "v1", DAY1 + timedelta(days=1))
    again = publish_snapshot(source, platform_paths, repo=FeatureRepo(), now=NOW)
    assert not again.offline_written and not again.promoted


def _refused(platform_paths, redis_server, source: Path, error: type[Exception], match: str) -> None:
    from derm.materialization.publish import publish_snapshot

    before = _store_state(platform_paths, redis_server)
    with pytest.raises(error, match=match):
        publish_snapshot(source, platform_paths, repo=FeatureRepo(), now=NOW)
    assert _store_state(platform_paths, redis_server) == before, "a refused snapshot must not touch any store"


def test_different_content_for_a_published_day_is_refused(published, platform_paths, redis_server, tmp_path) -> None:
    from derm.materialization.publish import PublishError

    other = PlatformPaths(tmp_path)
    (other.snapshots_dir).mkdir(parents=True)
    (other.snapshots_dir / "versions.json").write_text((platform_paths.snapshots_dir / "versions.json").read_text())
    source = make_snapshot(other, DAY1, _unit_rows(99))
    _refused(platform_paths, redis_server, source, PublishError, "already published with different content")


def _set_row(table: pa.Table, column: str, row: int, value: object) -> pa.Table:
    values = table[column].to_pylist()
    values[row] = value
    return table.set_column(table.schema.get_field_index(column), column, pa.array(values, table[column].type))


BAD_SNAPSHOTS = {  # bad-input class -> corruption of a good snapshot's table
    "wrong_dim": lambda t: _set_row(t, "embedding", 7, [0.5] * (DIM - 1)),
    "nan": lambda t: _set_row(t, "embedding", 7, [float("nan")] * DIM),
    "inf": lambda t: _set_row(t, "embedding", 7, [float("inf")] + [0.0] * (DIM - 1)),
    "zero_vector": lambda t: _set_row(t, "embedding", 7, [0.0] * DIM),
    "duplicate_keys": lambda t: _set_row(t, "user_id", 7, 8),
    "future_timestamps": lambda t: _set_row(t, "event_timestamp", 7, NOW + timedelta(days=30)),
    "missing_column": lambda t: t.drop_columns(["model_version"]),
    "wrong_dtype": lambda t: t.set_column(2, "embedding", t["embedding"].cast(pa.list_(pa.float64()))),
    "empty": lambda t: t.slice(0, 0),
    "sudden_drift": lambda t: t.set_column(2, "embedding", pa.array(list(_unit_rows(77)), pa.list_(pa.float32()))),
}


@pytest.mark.parametrize("case", sorted(BAD_SNAPSHOTS))
def test_snapshot_failing_the_gate_is_refused_and_no_store_is_touched(
    case: str, published, platform_paths, redis_server
) -> None:
    from derm.validation.gate import ValidationFailed

    source = make_snapshot(platform_paths, DAY1 + timedelta(days=3), drifted(published["day2"], 3))
    data = source / "embeddings.parquet"
    table = BAD_SNAPSHOTS[case](pq.read_table(data))
    pq.write_table(table, data)
    # The manifest agrees with the corrupted data, so only the content checks can stop it.
    manifest = replace(read_manifest(source), row_count=table.num_rows, data_sha256=file_sha256(data))
    (source / "manifest.json").write_text(manifest.to_json())
    try:
        _refused(platform_paths, redis_server, source, ValidationFailed, str(source))
    finally:
        shutil.rmtree(source)


def test_unknown_version_and_family_are_refused(published, platform_paths, redis_server, tmp_path) -> None:
    from derm.materialization.publish import PublishError

    # Registered as v1 in another registry: same name, config the platform has never seen.
    source = make_snapshot(
        PlatformPaths(tmp_path), DAY1 + timedelta(days=2), drifted(published["day2"], 4), version_seed="z"
    )
    _refused(platform_paths, redis_server, source, PublishError, "unknown model version 'v1'")

    manifest = read_manifest(source).to_json().replace('"family": "ctr_user"', '"family": "ctr_board"')
    (source / "manifest.json").write_text(manifest)
    _refused(platform_paths, redis_server, source, PublishError, "unknown family 'ctr_board'")


def test_promote_rollback_retire(published, platform_paths: PlatformPaths, redis_server) -> None:
    from derm.core.feast_repo import feature_store
    from derm.materialization.promotion import promote, retire, rollback
    from derm.materialization.publish import PublishError, publish_snapshot

    v2_vectors = _unit_rows(20)
    result = publish_snapshot(
        make_snapshot(platform_paths, DAY1, v2_vectors, version_seed="b"), platform_paths, repo=FeatureRepo(), now=NOW
    )
    assert result.version == "v2" and not result.promoted, "a new version is never promoted implicitly"

    def ranker_views() -> set[str]:
        return {p.name for p in feature_store().get_feature_service("ctr_ranker").feature_view_projections}

    assert "ctr_user_emb_v1" in ranker_views()
    np.testing.assert_array_equal(np.asarray(_online([0, 1], "ctr_user_emb_v2"), np.float32), v2_vectors[:2])

    with pytest.raises(PublishError, match="one family of model ctr"):
        promote(platform_paths, "ctr_user", "v2", repo=FeatureRepo())
    alone = {"family_only": True, "reason": "only the user family has a v2 here"}
    promote(platform_paths, "ctr_user", "v2", repo=FeatureRepo(), **alone)
    assert "ctr_user_emb_v2" in ranker_views() and "ctr_user_emb_v1" not in ranker_views()
    with pytest.raises(PublishError, match="is promoted"):
        retire(platform_paths, "ctr_user", "v2", repo=FeatureRepo(), **alone)

    assert rollback(platform_paths, "ctr_user", repo=FeatureRepo(), **alone) == {"ctr_user": "v1"}
    assert "ctr_user_emb_v1" in ranker_views()

    offline_v2 = sorted((platform_paths.embeddings_offline_dir / "ctr_user" / "v2").rglob("*.parquet"))
    retire(platform_paths, "ctr_user", "v2", repo=FeatureRepo(), **alone)
    assert "ctr_user_emb_v2" not in {v.name for v in feature_store().list_feature_views()}
    from feast.infra.online_stores.helpers import _mmh3

    field = _mmh3(f"{feature_view_name('ctr_user', 'v2')}:ctr_user_emb")
    assert not any(field in fields for fields in redis_contents(redis_server.client()).values())
    assert sorted((platform_paths.embeddings_offline_dir / "ctr_user" / "v2").rglob("*.parquet")) == offline_v2
    np.testing.assert_array_equal(np.asarray(_online([0]), np.float32), published["day2"][:1])
    with pytest.raises(PublishError, match="not published"):
        promote(platform_paths, "ctr_user", "v2", repo=FeatureRepo(), **alone)


def test_freshness_reports_age_and_missing_days(published, platform_paths: PlatformPaths) -> None:
    from derm.materialization.publish import freshness

    report = {f.family: f for f in freshness(platform_paths, now=NOW)}
    ctr_user = report["ctr_user"]
    assert ctr_user.version == "v1" and ctr_user.newest_day == DAY1 + timedelta(days=1)
    assert ctr_user.age == NOW - snapshot_available_at(DAY1 + timedelta(days=1), timedelta(hours=1))
    assert ctr_user.missing_days == (date(2026, 1, 4), date(2026, 1, 5)), "days up to yesterday must be flagged"
    assert report["cvr_user"].version is None and not report["cvr_user"].ok  # never published in this module


def test_publish_killed_mid_way_keeps_promoted_version_served_and_completes_on_rerun(
    published, platform_paths: PlatformPaths, redis_server, feast_env: dict[str, str]
) -> None:
    from derm.core.feast_repo import feature_store
    from derm.materialization.publish import CRASH_AFTER_ENV, publish_snapshot

    # A family of its own (first published here, so promoted), so that no other test sees the third day.
    family, view = "cvr_pin", "cvr_pin_emb_v1"
    days = [_unit_rows(51)]
    days += [drifted(days[0], 52), drifted(drifted(days[0], 52), 53)]
    for i in (0, 1):
        make_snapshot(platform_paths, DAY1 + timedelta(days=i), days[i], family=family)
        publish_snapshot(
            snapshot_dir(platform_paths.snapshots_dir, family, "v1", DAY1 + timedelta(days=i)),
            platform_paths,
            repo=FeatureRepo(),
            now=NOW,
        )
    day3 = DAY1 + timedelta(days=2)
    vectors = days[2]
    source = make_snapshot(platform_paths, day3, vectors, family=family)
    script = (
        "import sys; from datetime import datetime; from pathlib import Path;"
        "from derm.materialization.publish import publish_snapshot; from derm.core.paths import PlatformPaths;"
        "from derm.core.feast_repo import FeatureRepo;"
        "publish_snapshot(Path(sys.argv[1]), PlatformPaths.from_env(), repo=FeatureRepo(),"
        " now=datetime.fromisoformat(sys.argv[2]))"
    )
    env = {**os.environ, **feast_env, CRASH_AFTER_ENV: "apply"}
    proc = subprocess.run([sys.executable, "-c", script, str(source), NOW.isoformat()], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]

    # The promoted version is still whole: every entity serves the last completed day, and the catalog
    # does not claim the new day is online.
    everyone = list(range(USERS))
    np.testing.assert_array_equal(np.asarray(_online(everyone, view, family), np.float32), days[1])
    day2_ts, day3_ts = (snapshot_available_at(d, timedelta(hours=1)) for d in (DAY1 + timedelta(days=1), day3))
    assert online_days(redis_server.client(), view) == {day2_ts: USERS}
    catalog = Catalog(platform_paths.embeddings_offline_dir)
    assert catalog.read_state().online[family]["v1"] == (DAY1 + timedelta(days=1)).isoformat()
    assert catalog.published(family, "v1", day3) is not None, "the offline day was renamed in whole"
    assert not list((platform_paths.embeddings_offline_dir / ".staging").glob("*"))

    rerun = publish_snapshot(source, platform_paths, repo=FeatureRepo(), now=NOW)
    assert not rerun.offline_written
    assert online_days(redis_server.client(), view) == {day3_ts: USERS}
    np.testing.assert_array_equal(np.asarray(_online(everyone, view, family), np.float32), vectors)
    assert catalog.read_state().online[family]["v1"] == day3.isoformat()
    views = {v.name for v in feature_store().list_feature_views()}
    assert views == {*COUNTING_VIEWS, PIN_ATTRIBUTES_VIEW} | {p.feature_view for p in catalog.versions()}


# --------------------------------------------------------------------------- issue 11: chains, accept, discard
#
# An isolated platform (own data directory, own Redis database on the session server) so that the chains
# below never meet the session platform's views: DERM-CTR refreshed for real over a tiny log, and
# precomputed DERM-CVR snapshots.

CHAIN_START = date(2026, 1, 1)
SMALL_UPSTREAM_DAYS = 4


def _small_upstream():
    from derm.training.upstream.config import RefreshConfig, TrainConfig, UpstreamConfig
    from derm.training.upstream.features import FeatureConfig
    from derm.training.upstream.model import DermConfig

    model = DermConfig(
        dim=DIM,
        token_dim=8,
        mlp_hidden=16,
        user_id_buckets=512,
        pin_id_buckets=128,
        category_buckets=16,
        advertiser_buckets=16,
        interaction_hidden=(16,),
    )
    return UpstreamConfig(
        model=model,
        features=FeatureConfig(count_window_days=7, seq_len=5),
        train=TrainConfig(epochs=1, batch_size=256),
        refresh=RefreshConfig(inference_batch_size=64),
    )


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory) -> PlatformPaths:
    """Tiny log, counting features and DERM-CTR (ctr_user, ctr_pin) refreshed for four days."""
    import torch

    from derm.events.synthetic import SyntheticConfig, generate_event_log
    from derm.materialization.counting_features import build_counting_features
    from derm.training.upstream.refresh import refresh

    torch.set_num_threads(1)
    paths = PlatformPaths(tmp_path_factory.mktemp("chains"))
    generate_event_log(
        SyntheticConfig.preset("tiny", start_date=CHAIN_START, n_days=SMALL_UPSTREAM_DAYS), paths.events_dir
    )
    build_counting_features(paths.events_dir, paths.stats_dir)
    refresh(paths, ("ctr",), _small_upstream())
    return paths


@pytest.fixture
def on_chains(chains: PlatformPaths, redis_server, monkeypatch: pytest.MonkeyPatch) -> PlatformPaths:
    from derm.core.paths import DATA_DIR_ENV, REDIS_CONNECTION_ENV, REDIS_TYPE_ENV

    monkeypatch.setenv(DATA_DIR_ENV, str(chains.data_dir))
    monkeypatch.setenv(REDIS_CONNECTION_ENV, f"{redis_server.connection_string},db=6")
    monkeypatch.setenv(REDIS_TYPE_ENV, "redis")
    return chains


def break_snapshot(source: Path, seed: int = 77) -> None:
    """Replace every vector by an unrelated unit vector (a broken export); the manifest agrees with the data."""
    data = source / "embeddings.parquet"
    table = pq.read_table(data)
    vectors = np.random.default_rng(seed).normal(size=(table.num_rows, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    table = table.set_column(2, "embedding", pa.array(list(vectors), pa.list_(pa.float32())))
    pq.write_table(table, data)
    manifest = replace(read_manifest(source), row_count=table.num_rows, data_sha256=file_sha256(data))
    (source / "manifest.json").write_text(manifest.to_json())


def _days(paths: PlatformPaths, family: str, n: int = SMALL_UPSTREAM_DAYS) -> list[Path]:
    return [snapshot_dir(paths.snapshots_dir, family, "v1", CHAIN_START + timedelta(days=i)) for i in range(n)]


def test_refusal_blocks_only_its_chain_then_discard_and_refresh_rederive_it(on_chains: PlatformPaths) -> None:
    from derm.materialization.publish import PublishError, discard_snapshots, pending_snapshots, publish_batch
    from derm.training.upstream.refresh import refresh
    from derm.training.upstream.train import checkpoint_path

    paths = on_chains
    users, pins = _days(paths, "ctr_user"), _days(paths, "ctr_pin")
    good_sha = {d: read_manifest(d).data_sha256 for d in users}
    break_snapshot(users[1])
    # The later days would be refused too if they were validated (unreadable): they must only be blocked.
    (users[2] / "embeddings.parquet").write_bytes(b"not parquet")

    batch = publish_batch(pending_snapshots(paths), paths, repo=FeatureRepo())
    assert not batch.ok
    assert [(r.family, r.day) for r in batch.published] == sorted(
        [("ctr_pin", read_manifest(d).snapshot_date) for d in pins] + [("ctr_user", CHAIN_START)],
        key=lambda fd: (fd[1], fd[0]),
    )
    (refusal,) = batch.refused
    assert (refusal.family, refusal.day, refusal.source) == ("ctr_user", CHAIN_START + timedelta(days=1), users[1])
    assert "expectations passed; failed: expect_" in refusal.summary and "\n" not in refusal.summary
    assert refusal.data_docs is not None and refusal.data_docs.exists()
    assert [(b.source, b.behind) for b in batch.blocked] == [(users[2], refusal.day), (users[3], refusal.day)]
    table = batch.table()
    assert "published 5, refused 1, blocked 2" in table and f"Data Docs: {refusal.data_docs}" in table
    assert "derm accept SNAPSHOT_DIR --reason TEXT" in table and "derm discard SNAPSHOT_DIR" in table
    catalog = Catalog(paths.embeddings_offline_dir)
    online = {family: days for family, days in catalog.read_state().online.items() if family.startswith("ctr_")}
    assert online == {"ctr_pin": {"v1": "2026-01-04"}, "ctr_user": {"v1": "2026-01-01"}}  # cvr_user: the test below

    # A re-run tries the refused day again (still refused) and nothing behind it.
    again = publish_batch(pending_snapshots(paths), paths, repo=FeatureRepo())
    assert (again.published, [r.day for r in again.refused]) == ([], [refusal.day])
    assert [b.source for b in again.blocked] == users[2:]

    # Never a published day: discarding day 1 would take the published day with it.
    with pytest.raises(PublishError, match="2026-01-01 already published; a published day is never discarded"):
        discard_snapshots(users[0], paths)
    assert all(d.exists() for d in users)

    checkpoints = [checkpoint_path(paths.models_dir, "ctr", "v1", CHAIN_START + timedelta(days=i)) for i in range(4)]
    before = [c.stat().st_mtime_ns for c in checkpoints]
    discarded = discard_snapshots(users[1], paths)
    assert [source for source, _ in discarded.moved] == [users[3], users[2], users[1]]
    assert all(not d.exists() for d in users[1:]) and all(target.exists() for _, target in discarded.moved)
    assert "derm train-upstream" in discarded.describe()

    # The refresh re-derives the chain from the last day left: the same bytes as before the export broke.
    refresh(paths, ("ctr",), _small_upstream())
    assert {d: read_manifest(d).data_sha256 for d in users} == good_sha
    assert [c.stat().st_mtime_ns for c in checkpoints] == before, "days are re-exported, not retrained"
    final = publish_batch(pending_snapshots(paths), paths, repo=FeatureRepo())
    assert final.ok and [r.day for r in final.published] == [CHAIN_START + timedelta(days=i) for i in (1, 2, 3)]
    assert not final.blocked and pending_snapshots(paths) == []


def test_accept_publishes_a_refused_day_with_its_reason_and_unblocks_its_chain(on_chains: PlatformPaths) -> None:
    from derm.materialization.publish import (
        PublishError,
        accept_snapshot,
        freshness,
        pending_snapshots,
        publish_batch,
        publish_snapshot,
    )
    from derm.validation.gate import ValidationFailed

    paths = on_chains
    day1 = _unit_rows(31)
    days = [
        make_snapshot(paths, CHAIN_START, day1, family="cvr_user"),
        make_snapshot(paths, CHAIN_START + timedelta(days=1), _unit_rows(32), family="cvr_user"),  # sudden drift
    ]
    days.append(make_snapshot(paths, CHAIN_START + timedelta(days=2), drifted(_unit_rows(32), 33), family="cvr_user"))
    batch = publish_batch(days, paths, repo=FeatureRepo())
    assert [r.day for r in batch.published] == [CHAIN_START] and [b.source for b in batch.blocked] == days[2:]

    with pytest.raises(PublishError, match="needs a reason"):
        accept_snapshot(days[1], paths, repo=FeatureRepo(), reason="  ")
    with pytest.raises(PublishError, match="earlier day 2026-01-02 of cvr_user v1 is not published"):
        accept_snapshot(days[2], paths, repo=FeatureRepo(), reason="later day first")
    with pytest.raises(PublishError, match=r"already published .*nothing to accept"):
        accept_snapshot(days[0], paths, repo=FeatureRepo(), reason="passed anyway")

    result = accept_snapshot(days[1], paths, repo=FeatureRepo(), reason="model retrained on purpose (ticket 42)")
    assert result.offline_written and result.accepted and "expectations passed; failed:" in result.accepted
    assert "ACCEPTED despite the gate" in result.summary()
    entry = Catalog(paths.embeddings_offline_dir).read_state().accepted["cvr_user"]["v1"]["2026-01-02"]
    assert entry["reason"] == "model retrained on purpose (ticket 42)" and entry["gate"] == result.accepted
    assert Path(entry["data_docs"]).exists()
    report = {f.family: f for f in freshness(paths)}["cvr_user"]
    assert report.accepted == ((CHAIN_START + timedelta(days=1), "model retrained on purpose (ticket 42)"),)
    assert "accepted 2026-01-02: model retrained on purpose (ticket 42)" in report.describe()

    # Only this test's chain: the ctr chains pending here belong to the test above, whatever the order.
    own = [d for d in pending_snapshots(paths) if d.parent.parent.name == "cvr_user"]
    final = publish_batch(own, paths, repo=FeatureRepo())
    assert final.ok and [r.day for r in final.published] == [CHAIN_START + timedelta(days=2)]

    # A snapshot that is not readable as one cannot be served, so it cannot be accepted.
    broken = make_snapshot(paths, CHAIN_START + timedelta(days=3), drifted(_unit_rows(32), 34), family="cvr_user")
    (broken / "embeddings.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValidationFailed):
        publish_snapshot(broken, paths, repo=FeatureRepo())
    with pytest.raises(PublishError, match="not readable as a snapshot, so it cannot be served"):
        accept_snapshot(broken, paths, repo=FeatureRepo(), reason="try anyway")
    assert Catalog(paths.embeddings_offline_dir).published("cvr_user", "v1", CHAIN_START + timedelta(days=3)) is None
    shutil.rmtree(broken)


def test_catalog_without_accepted_key_still_reads(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path)
    catalog.state_path.write_text('{"promoted": {"ctr_user": "v1"}, "history": {}, "retired": {}, "online": {}}')
    state = catalog.read_state()
    assert state.promoted == {"ctr_user": "v1"} and state.accepted == {}
    assert state.accepted_days("ctr_user", "v1") == {}


def test_freshness_collapses_long_gaps_into_ranges() -> None:
    from derm.materialization.publish import FamilyFreshness

    gap = tuple(date(2025, 1, 3) + timedelta(days=i) for i in range(300))
    singles = tuple(date(2026, 1, 1) + timedelta(days=2 * i) for i in range(8))
    report = FamilyFreshness("ctr_user", "v1", date(2025, 1, 2), timedelta(hours=3), gap)
    assert report.gaps == [(gap[0], gap[-1])] and report.missing_days == gap
    assert report.describe() == (
        "ctr_user v1: newest 2025-01-02, age 3.0 h, MISSING 300 days: 2025-01-03..2025-10-29 (300 days)"
    )
    many = replace(report, missing_days=gap + singles, accepted=((date(2025, 1, 2), "known outage"),))
    first, second = many.describe().splitlines()
    assert first.endswith(
        "MISSING 308 days: 2025-01-03..2025-10-29 (300 days), 2026-01-01, 2026-01-03, 2026-01-05, 2026-01-07, "
        "... 4 more gaps"
    )
    assert second == "  accepted 2025-01-02: known outage"
