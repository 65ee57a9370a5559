"""Materialization split into Ray tasks (``RayMaterializationEngine``) on a real Redis Cluster.

One local Ray (2 CPUs) and one 3+3 Redis Cluster (``derm.infra.redis_cluster``) for the
module. Stock Feast (local engine, ``redis`` store) writes project ``rstock``, the Ray
engine writes project ``rray``, with slices and task sizes small enough that every slot
range is written by several Ray tasks; every hash must be byte-identical once the project
suffix of its key is set aside.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from derm.infra.redis_cluster import LocalRedisCluster

feast = pytest.importorskip("feast")
ray = pytest.importorskip("ray")

from feast import Entity, FeatureStore, FeatureView, Field, FileSource, RepoConfig, ValueType  # noqa: E402
from feast.types import Array, Float32, Int64, String  # noqa: E402

from derm.feast_plugins.ray_engine import ENGINE_TYPE, RayMaterializationEngine  # noqa: E402

FAST_STORE = "derm.feast_plugins.redis_online_store.FastRedisOnlineStore"
WINDOW_START = datetime(2026, 1, 1, tzinfo=UTC)
WINDOW_END = datetime(2026, 1, 3, tzinfo=UTC)
DIM = 8
ENTITIES = 300


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    with LocalRedisCluster(tmp_path_factory.mktemp("ray-engine-cluster")) as cluster:
        yield cluster


def _dump(cluster: LocalRedisCluster, project: str) -> dict[bytes, dict[bytes, bytes]]:
    """Every hash of ``project`` on every master, keyed without the project suffix."""
    suffix = project.encode()
    out = {}
    for port in cluster.master_ports():
        with cluster.node_client(port) as client:
            for key in client.scan_iter(count=1000):
                if key.endswith(suffix):
                    out[key[: -len(suffix)]] = client.hgetall(key)
    return out


def _view(path: Path, vector_index: bool = False) -> tuple[Entity, FeatureView]:
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
    source = FileSource(
        name="emb", path=str(path), timestamp_field="event_timestamp", created_timestamp_column="created"
    )
    embedding = (
        Field(name="embedding", dtype=Array(Float32), vector_index=True, vector_length=DIM)
        if vector_index
        else Field(name="embedding", dtype=Array(Float32))
    )
    view = FeatureView(
        name="user_emb",
        entities=[user],
        ttl=timedelta(days=30),
        schema=[
            Field(name="user_id", dtype=Int64),
            embedding,
            Field(name="clicks", dtype=Int64),
            Field(name="label", dtype=String),
        ],
        source=source,
        online=True,
    )
    return user, view


def _rows(seed: int, entities: int) -> pa.Table:
    """1-4 rows per entity at shared times (ties broken by the created time), nulls in every feature."""
    rng = np.random.default_rng(seed)
    times = [WINDOW_START + timedelta(hours=12 * i) for i in range(5)]
    ids = np.arange(1, entities + 1, dtype=np.int64)
    ids[::9] += ord("{") << 8  # an id byte of 0x7B makes a "{" in the key: a hash tag for the slot
    user_ids = np.repeat(ids, rng.integers(1, 5, size=entities))
    rows = len(user_ids)
    vectors = rng.standard_normal((rows, DIM)).astype(np.float32)
    return pa.table(
        {
            "user_id": pa.array(user_ids),
            "embedding": pa.array([None if rng.random() < 0.1 else list(v) for v in vectors], pa.list_(pa.float32())),
            "clicks": pa.array(rng.integers(0, 1 << 40, rows), mask=rng.random(rows) < 0.2),
            "label": pa.array([f"l{i}" for i in range(rows)], mask=rng.random(rows) < 0.2),
            "event_timestamp": pa.array(rng.choice(times, rows), pa.timestamp("us", tz="UTC")),
            "created": pa.array(
                [datetime(2026, 2, 1, tzinfo=UTC) + timedelta(seconds=int(s)) for s in rng.permutation(rows)],
                pa.timestamp("us", tz="UTC"),
            ),
        }
    )


def _store(tmp_path: Path, project: str, online_store: dict, batch_engine: dict | str) -> FeatureStore:
    return FeatureStore(
        config=RepoConfig(
            project=project,
            provider="local",
            registry=str(tmp_path / f"{project}-registry.db"),
            offline_store={"type": "duckdb"},
            online_store=online_store,
            batch_engine=batch_engine,
            entity_key_serialization_version=3,
            repo_path=str(tmp_path),
        )
    )


def _ray_engine(tmp_path: Path, **settings) -> dict:
    # Small slices and tasks: every slot range is written by several Ray tasks, chunks cross file boundaries.
    return {"type": ENGINE_TYPE, "slices": 3, "task_rows": 40, "read_batch_rows": 53,
            "storage_path": str(tmp_path / "staging"), **settings}  # fmt: skip


def _engine(store: FeatureStore) -> RayMaterializationEngine:
    engine = store._get_provider().batch_engine
    assert isinstance(engine, RayMaterializationEngine)
    return engine


def test_ray_engine_is_byte_identical_to_stock_on_cluster(
    local_ray: None, redis_cluster: LocalRedisCluster, tmp_path: Path
) -> None:
    data = tmp_path / "embeddings.parquet"
    pq.write_table(_rows(seed=5, entities=ENTITIES), data)
    (tmp_path / "staging").mkdir()
    user, view = _view(data)
    online = {"redis_type": "redis_cluster", "connection_string": redis_cluster.connection_string}
    stock = _store(tmp_path, "rstock", {"type": "redis", **online}, "local")
    fast = _store(tmp_path, "rray", {"type": FAST_STORE, **online, "write_batch_rows": 17}, _ray_engine(tmp_path))
    for store in (stock, fast):
        store.apply([user, view])

    stock.materialize(start_date=WINDOW_START, end_date=WINDOW_END)
    fast.materialize(start_date=WINDOW_START, end_date=WINDOW_END)
    expected, got = _dump(redis_cluster, "rstock"), _dump(redis_cluster, "rray")
    assert len(expected) == ENTITIES
    assert got == expected
    # The work really was split: more tasks than slot ranges, every entity written by exactly one task.
    tasks = _engine(fast).last_task_rows
    assert len(tasks) > 3 and sum(tasks) == ENTITIES and max(tasks) <= 40
    assert os.listdir(tmp_path / "staging") == []  # staged slices are deleted once written

    # An older, overlapping window: rows not newer than what is stored are skipped, on both.
    earlier = (WINDOW_START - timedelta(days=3), WINDOW_START + timedelta(hours=12))
    stock.materialize(start_date=earlier[0], end_date=earlier[1])
    fast.materialize(start_date=earlier[0], end_date=earlier[1])
    assert _dump(redis_cluster, "rray") == _dump(redis_cluster, "rstock") == expected
    assert sum(_engine(fast).last_task_rows) == 0


def test_ray_engine_task_error_names_the_column_and_leaves_no_staged_files(
    local_ray: None, redis_cluster: LocalRedisCluster, tmp_path: Path
) -> None:
    rows = _rows(seed=6, entities=50)
    first = rows.column("user_id")[0].as_py()
    ragged = [
        [1.0, 2.0] if user == first else vector  # every row of one entity: 2 floats where the view declares 8
        for user, vector in zip(rows.column("user_id").to_pylist(), rows.column("embedding").to_pylist(), strict=True)
    ]
    data = tmp_path / "ragged.parquet"
    pq.write_table(rows.set_column(1, "embedding", pa.array(ragged, pa.list_(pa.float32()))), data)
    (tmp_path / "staging").mkdir()
    user, view = _view(data, vector_index=True)
    online = {"redis_type": "redis_cluster", "connection_string": redis_cluster.connection_string}
    fast = _store(tmp_path, "rbad", {"type": FAST_STORE, **online}, _ray_engine(tmp_path, task_rows=1000))
    fast.apply([user, view])
    with pytest.raises(ValueError, match="embedding"):
        fast.materialize(start_date=WINDOW_START, end_date=WINDOW_END)
    assert os.listdir(tmp_path / "staging") == []


def test_cluster_profile_selects_the_ray_engine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_cluster: LocalRedisCluster
) -> None:
    """DERM_PROFILE=cluster: feature_store.cluster.yaml's batch_engine is this engine, on the profile's Ray."""
    from derm.core.feast_repo import feast_environment, feature_store
    from derm.core.paths import PROFILE_ENV, RAY_ADDRESS_ENV, PlatformPaths

    monkeypatch.setenv(PROFILE_ENV, "cluster")
    monkeypatch.delenv(RAY_ADDRESS_ENV, raising=False)
    for name, value in feast_environment(PlatformPaths(tmp_path), redis_cluster.connection_string).items():
        monkeypatch.setenv(name, value)
    engine = _engine(feature_store())
    assert engine.config.ray_address in (None, "")  # empty: a local Ray
    assert engine.config.storage_path == f"{tmp_path}/materialize"
