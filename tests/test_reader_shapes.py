"""The serving reader on inputs not shaped like the generator's: sparse 64-bit ids, an event time
per entity (far more than 16 distinct ones), and every timestamp unit of the offline source.

Stock Feast materializes (local engine, ``redis`` online store) into the module's own redis-server;
the reader's values must equal ``get_online_features`` and its event times the source's.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from feast import Entity, FeatureStore, FeatureView, Field, FileSource, RepoConfig, ValueType
from feast.types import Array, Float32, Int64

from derm.infra.redis_server import LocalRedisServer

DIM = 4
ENTITIES = 40
START = datetime(2026, 3, 1, tzinfo=UTC)
PER_SECOND = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}
EXTREME_IDS = [-(2**63), 2**63 - 1, -1, 0]


def _source_table(unit: str, seed: int) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """One row per entity, each at its own time (sub-second where the unit allows it)."""
    rng = np.random.default_rng(seed)
    ids = np.unique(np.concatenate([EXTREME_IDS, rng.integers(-(2**63), 2**63 - 1, ENTITIES, dtype=np.int64)]))
    rng.shuffle(ids)
    step = PER_SECOND[unit]
    base = int(START.timestamp()) * step
    # Distinct times across two days; a fraction of a second in the finer units (to the microsecond,
    # what Feast keeps of a time).
    offsets = rng.choice(2 * 86_400, size=len(ids), replace=False) * step
    if step > 1:
        offsets += rng.integers(0, step, size=len(ids)) // max(step // 10**6, 1) * max(step // 10**6, 1)
    stamps = base + offsets
    vectors = rng.standard_normal((len(ids), DIM)).astype(np.float32)
    table = pa.table(
        {
            "user_id": pa.array(ids, pa.int64()),
            "embedding": pa.array(list(vectors), pa.list_(pa.float32())),
            "clicks": pa.array(rng.integers(-(2**40), 2**40, size=len(ids)), pa.int64()),
            "event_timestamp": pa.array(stamps, pa.timestamp(unit, tz="UTC")),
        }
    )
    return table, ids, stamps / step


@pytest.fixture(scope="module", params=sorted(PER_SECOND))
def shaped(request, tmp_path_factory: pytest.TempPathFactory, redis_server: LocalRedisServer):
    unit = request.param
    root = tmp_path_factory.mktemp(f"shapes_{unit}")
    table, ids, seconds = _source_table(unit, seed=len(unit))
    pq.write_table(table, root / "embeddings.parquet")
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
    view = FeatureView(
        name="user_emb",
        entities=[user],
        ttl=timedelta(days=30),
        schema=[
            Field(name="user_id", dtype=Int64),
            Field(name="embedding", dtype=Array(Float32)),
            Field(name="clicks", dtype=Int64),
        ],
        source=FileSource(name="shapes", path=str(root / "embeddings.parquet"), timestamp_field="event_timestamp"),
        online=True,
        tags={"dim": str(DIM)},
    )
    store = FeatureStore(
        config=RepoConfig(
            project=f"shapes_{unit}",  # the project is part of every Redis key: one key space per unit
            provider="local",
            registry=str(root / "registry.db"),
            offline_store={"type": "duckdb"},
            online_store={"type": "redis", "connection_string": redis_server.connection_string},
            entity_key_serialization_version=3,
            repo_path=str(root),
        )
    )
    store.apply([user, view])
    store.materialize(start_date=START - timedelta(days=1), end_date=START + timedelta(days=3))
    return store, ids, seconds


def test_reader_equals_feast_on_sparse_ids_many_times_and_every_unit(shaped) -> None:
    from derm.serving.embedding_reader import EmbeddingReader

    store, ids, seconds = shaped
    assert len(np.unique(seconds)) > 16, "the reader's path for many distinct event times must run"
    unknown = np.array([12345, -(2**62)], dtype=np.int64)
    query = np.concatenate([ids, unknown, ids[:3]])  # repeated ids too
    refs = ["user_emb:embedding", "user_emb:clicks"]
    feast = store.get_online_features(features=refs, entity_rows=[{"user_id": int(i)} for i in query]).to_dict()

    features = EmbeddingReader.for_features(store, refs).read({"user_id": query})

    found = features.found["user_emb:embedding"]
    assert found.tolist() == [value is not None for value in feast["embedding"]]
    assert found.sum() == len(ids) + 3 and not found[len(ids) : len(ids) + 2].any()
    np.testing.assert_array_equal(
        features.columns["user_emb:embedding"][found], np.array([v for v in feast["embedding"] if v is not None])
    )
    assert features.columns["user_emb:clicks"][found].tolist() == [c for c in feast["clicks"] if c is not None]
    assert features.stats.fallback == 0
    # Event times, to the microsecond Feast stores: the source's own, NaN for unknown ids.
    expected = np.concatenate([seconds, [np.nan, np.nan], seconds[:3]])
    np.testing.assert_allclose(features.event_seconds["user_emb"], expected, rtol=0, atol=1e-6)
