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
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from derm.infra.redis_cluster import LocalRedisCluster

feast = pytest.importorskip("feast")
ray = pytest.importorskip("ray")

from feast import FeatureStore  # noqa: E402

from derm.feast_plugins.ray_engine import ENGINE_TYPE, RayMaterializationEngine  # noqa: E402
from tests import stock_comparison as compare  # noqa: E402
from tests.stock_comparison import FAST_STORE, WINDOW_END, WINDOW_START  # noqa: E402

DIM = 8
ENTITIES = 300


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    with LocalRedisCluster(tmp_path_factory.mktemp("ray-engine-cluster")) as cluster:
        yield cluster


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
    pq.write_table(compare.hash_tagged_rows(seed=5, entities=ENTITIES, dim=DIM), data)
    (tmp_path / "staging").mkdir()
    online = {"redis_type": "redis_cluster", "connection_string": redis_cluster.connection_string}
    stock, fast = compare.stock_and_fast_stores(
        tmp_path,
        compare.user_embedding_view(data),
        ("rstock", "rray"),
        stock_online=online,
        fast_online={**online, "write_batch_rows": 17},
        fast_engine=_ray_engine(tmp_path),
    )

    stock.materialize(start_date=WINDOW_START, end_date=WINDOW_END)
    fast.materialize(start_date=WINDOW_START, end_date=WINDOW_END)
    expected, got = compare.cluster_hashes(redis_cluster, "rstock"), compare.cluster_hashes(redis_cluster, "rray")
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
    assert compare.cluster_hashes(redis_cluster, "rray") == compare.cluster_hashes(redis_cluster, "rstock") == expected
    assert sum(_engine(fast).last_task_rows) == 0


def test_ray_engine_task_error_names_the_column_and_leaves_no_staged_files(
    local_ray: None, redis_cluster: LocalRedisCluster, tmp_path: Path
) -> None:
    rows = compare.hash_tagged_rows(seed=6, entities=50, dim=DIM)
    first = rows.column("user_id")[0].as_py()
    ragged = [
        [1.0, 2.0] if user == first else vector  # every row of one entity: 2 floats where the view declares 8
        for user, vector in zip(rows.column("user_id").to_pylist(), rows.column("embedding").to_pylist(), strict=True)
    ]
    data = tmp_path / "ragged.parquet"
    pq.write_table(rows.set_column(1, "embedding", pa.array(ragged, pa.list_(pa.float32()))), data)
    (tmp_path / "staging").mkdir()
    user, view = compare.user_embedding_view(data, vector_length=DIM)
    online = {"redis_type": "redis_cluster", "connection_string": redis_cluster.connection_string}
    engine = _ray_engine(tmp_path, task_rows=1000)
    fast = compare.feature_store_in(tmp_path, "rbad", {"type": FAST_STORE, **online}, engine)
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
