"""Set-up shared by the tests that compare the project's Redis writer with stock Feast, byte for byte.

The same Feast definitions are applied to two repositories: stock Feast (``local`` engine, ``redis``
online store) and the fast path (``FastRedisOnlineStore`` and a batch engine of the project's). Both
materialize the same Parquet file and the tests compare what lands in Redis::

    from tests.stock_comparison import VECTOR_ENGINE, hash_tagged_rows, stock_and_fast_stores, user_embedding_view

    pq.write_table(hash_tagged_rows(seed=3, entities=300, dim=8), data)
    user, view = user_embedding_view(data)
    stock, fast = stock_and_fast_stores(
        tmp_path, [user, view], ("clstock", "clfast"),
        stock_online=online, fast_online=online, fast_engine={"type": VECTOR_ENGINE},
    )

On a Redis Cluster the two projects share the cluster and :func:`cluster_hashes` reads one project's
hashes back, keyed without the project suffix, so the two dumps compare with ``==``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from feast import Entity, FeatureStore, FeatureView, Field, FileSource, RepoConfig, ValueType
from feast.types import Array, Float32, Float64, Int64, String

if TYPE_CHECKING:
    from derm.infra.redis_cluster import LocalRedisCluster

FAST_STORE = "derm.feast_plugins.redis_online_store.FastRedisOnlineStore"
VECTOR_ENGINE = "derm.feast_plugins.vector_engine.VectorMaterializationEngine"
# hash_tagged_rows' event times span the window exactly (both ends are inclusive in Feast's materialize).
WINDOW_START = datetime(2026, 1, 1, tzinfo=UTC)
WINDOW_END = datetime(2026, 1, 3, tzinfo=UTC)


def feature_store_in(
    tmp_path: Path, project: str, online_store: dict, batch_engine: dict | str, registry: str | None = None
) -> FeatureStore:
    """A Feast repository in ``tmp_path``: DuckDB offline store, the given online store and batch engine.

    Args:
        project: the Feast project (the suffix of every Redis key the store writes).
        online_store: the ``online_store`` block of ``feature_store.yaml``, ``type`` included.
        batch_engine: the ``batch_engine`` block (``"local"`` is stock Feast's engine).
        registry: stem of the registry file, ``<registry>-registry.db`` (default: the project), so that two
            repositories of one project can live in one folder.
    """
    return FeatureStore(
        config=RepoConfig(
            project=project,
            provider="local",
            registry=str(tmp_path / f"{registry or project}-registry.db"),
            offline_store={"type": "duckdb"},
            online_store=online_store,
            batch_engine=batch_engine,
            entity_key_serialization_version=3,
            repo_path=str(tmp_path),
        )
    )


def stock_and_fast_stores(
    tmp_path: Path,
    definitions: Sequence[object],
    projects: tuple[str, str],
    stock_online: dict,
    fast_online: dict,
    fast_engine: dict,
) -> tuple[FeatureStore, FeatureStore]:
    """Stock Feast and the fast path, with ``definitions`` applied to both; ``(stock, fast)``.

    Args:
        definitions: the Feast objects (entity, feature view) both repositories apply.
        projects: stock's and the fast path's project (equal when the two write different Redis databases).
        stock_online: settings of stock Feast's ``redis`` online store (connection, ``redis_type``).
        fast_online: settings of ``FastRedisOnlineStore`` (connection, ``write_batch_rows``, ...).
        fast_engine: the fast path's ``batch_engine`` block.

    Registries are ``stock-registry.db`` and ``fast-registry.db`` in ``tmp_path``.
    """
    stock = feature_store_in(tmp_path, projects[0], {"type": "redis", **stock_online}, "local", registry="stock")
    fast = feature_store_in(tmp_path, projects[1], {"type": FAST_STORE, **fast_online}, fast_engine, registry="fast")
    for store in (stock, fast):
        store.apply(list(definitions))
    return stock, fast


def user_embedding_view(
    path: Path,
    *,
    source_name: str = "emb",
    score: bool = False,
    vector_length: int | None = None,
    tags: dict[str, str] | None = None,
) -> tuple[Entity, FeatureView]:
    """The ``user`` entity and the ``user_emb`` view over ``path``: ``embedding``, ``clicks``, ``label``.

    Args:
        path: Parquet file with ``user_id``, the features, ``event_timestamp`` and ``created``.
        source_name: name of the ``FileSource``.
        score: also a ``score`` (Float64) feature, between ``clicks`` and ``label``.
        vector_length: declare ``embedding`` a vector index of this length (None: a plain float list).
        tags: the view's tags (the serving reader takes the vector width from ``dim``).
    """
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
    source = FileSource(
        name=source_name, path=str(path), timestamp_field="event_timestamp", created_timestamp_column="created"
    )
    embedding = (
        Field(name="embedding", dtype=Array(Float32), vector_index=True, vector_length=vector_length)
        if vector_length is not None
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
            *([Field(name="score", dtype=Float64)] if score else []),
            Field(name="label", dtype=String),
        ],
        source=source,
        online=True,
        tags=tags,
    )
    return user, view


def hash_tagged_rows(seed: int, entities: int, dim: int, start: datetime = WINDOW_START) -> pa.Table:
    """Rows for :func:`user_embedding_view`: 1-4 per entity at shared times (ties broken by ``created``).

    Every ninth id holds a ``{`` byte, which makes a Redis Cluster hash tag in its key; every feature has
    nulls. Event times are ``start`` + 0, 12, ..., 48 h; ``created`` times are unique and shuffled.

    Args:
        dim: length of the ``embedding`` vectors.
    """
    rng = np.random.default_rng(seed)
    times = [start + timedelta(hours=12 * i) for i in range(5)]
    ids = np.arange(1, entities + 1, dtype=np.int64)
    ids[::9] += ord("{") << 8  # an id byte of 0x7B makes a "{" in the key: a hash tag for the slot
    user_ids = np.repeat(ids, rng.integers(1, 5, size=entities))
    rows = len(user_ids)
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
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


def cluster_hashes(cluster: LocalRedisCluster, project: str) -> dict[bytes, dict[bytes, bytes]]:
    """Every hash of ``project`` on every master of ``cluster``, keyed without the project suffix."""
    suffix = project.encode()
    out = {}
    for port in cluster.master_ports():
        with cluster.node_client(port) as client:
            for key in client.scan_iter(count=1000):
                if key.endswith(suffix):
                    out[key[: -len(suffix)]] = client.hgetall(key)
    return out
