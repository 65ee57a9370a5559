"""Benchmark: materializing N rows x 64-d float32 embeddings into Redis (rows/s).

Three ways to put the same table into a private ``redis-server`` (started here, not persisted):

* fast: ``FeatureStore.materialize`` with the vector engine + ``FastRedisOnlineStore``
  (DuckDB read of the latest row per entity, vectorized encoding, pipelined writes);
* stock: ``FeatureStore.materialize`` with Feast's local engine + ``redis`` online store
  (per-row protobuf); it is measured on ``stock_rows`` rows (default 100k), because at a
  million rows its per-row protobuf objects take minutes and gigabytes here;
* raw: redis-py pipelined ``HSET`` of the very same precomputed keys and bytes, in chunks
  of 5,000 rows: the limit for a redis-py client, with no reading and no encoding at all.

Each is warmed up once, then repeated ``repeats`` times on an empty database; medians are reported.

Usage::

    python -m bench.materialize_redis --rows 1000000 --stock-rows 100000 --repeats 3

Example::

    from bench.materialize_redis import run
    result = run(rows=2_000, stock_rows=500, repeats=1)   # {"fast_over_raw": ..., ...}
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import redis

from derm.infra.redis_server import LocalRedisServer

DIM = 64
SNAPSHOT_TIME = datetime(2026, 1, 2, tzinfo=UTC)
RAW_CHUNK_ROWS = 5000
PROJECT = "bench"


def embedding_table(rows: int, seed: int = 0) -> pa.Table:
    """One daily snapshot: sparse int64 ids, a 64-d float32 embedding each, one event time."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((rows, DIM), dtype=np.float32)
    return pa.table(
        {
            "user_id": pa.array(np.arange(rows, dtype=np.int64) * 7 + 3),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM).cast(
                pa.list_(pa.float32())
            ),
            "event_timestamp": pa.array(np.full(rows, SNAPSHOT_TIME.timestamp() * 1e6, dtype=np.int64)).cast(
                pa.timestamp("us", tz="UTC")
            ),
        }
    )


def _definitions(path: Path):
    from feast import Entity, FeatureView, Field, FileSource, ValueType
    from feast.types import Array, Float32, Int64

    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
    view = FeatureView(
        name="bench_user_embedding",
        entities=[user],
        ttl=timedelta(days=7),
        schema=[Field(name="user_id", dtype=Int64), Field(name="embedding", dtype=Array(Float32))],
        source=FileSource(name="bench_source", path=str(path), timestamp_field="event_timestamp"),
        online=True,
    )
    return user, view


def _feature_store(workdir: Path, name: str, parquet: Path, online_store: dict[str, Any], batch_engine: Any):
    from feast import FeatureStore, RepoConfig

    config = RepoConfig(
        project=PROJECT,
        provider="local",
        registry=str(workdir / f"{name}-registry.db"),
        offline_store={"type": "duckdb"},
        online_store=online_store,
        batch_engine=batch_engine,
        entity_key_serialization_version=3,
        repo_path=str(workdir),
    )
    store = FeatureStore(config=config)
    user, view = _definitions(parquet)
    with contextlib.redirect_stdout(io.StringIO()):
        store.apply([user, view])
    return store, view


def _time_materialize(store, client, repeats: int) -> list[float]:
    # Warm-up on an empty window: first-call costs (imports, registry, DuckDB/Ibis setup) are not throughput.
    with contextlib.redirect_stdout(io.StringIO()):
        store.materialize(start_date=datetime(2000, 1, 1, tzinfo=UTC), end_date=datetime(2000, 1, 2, tzinfo=UTC))
    seconds = []
    for _ in range(repeats):
        client.flushdb()  # an empty database each time: otherwise dedup skips every row
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # Feast prints a progress line per view
            store.materialize(start_date=SNAPSHOT_TIME - timedelta(days=1), end_date=SNAPSHOT_TIME + timedelta(days=1))
        seconds.append(time.perf_counter() - started)
    return seconds


def _time_raw_hset(store, view, table: pa.Table, client, repeats: int) -> list[float]:
    from derm.feast_plugins.redis_online_store import encode_rows

    chunks = [encode_rows(store.config, view, batch).rows() for batch in table.to_batches(max_chunksize=RAW_CHUNK_ROWS)]
    seconds = []
    for _ in range(repeats):
        client.flushdb()
        started = time.perf_counter()
        for rows in chunks:
            with client.pipeline(transaction=False) as pipe:
                for key, mapping in rows:
                    pipe.hset(key, mapping=mapping)
                pipe.execute()
        seconds.append(time.perf_counter() - started)
    return seconds


def run(rows: int = 1_000_000, stock_rows: int = 100_000, repeats: int = 3) -> dict[str, Any]:
    """Median rows/s of the fast path, stock Feast and raw pipelined HSET, and their ratios."""
    with tempfile.TemporaryDirectory(prefix="bench-materialize-") as tmp:
        workdir = Path(tmp)
        table = embedding_table(rows)
        fast_parquet, stock_parquet = workdir / "fast.parquet", workdir / "stock.parquet"
        pq.write_table(table, fast_parquet)
        pq.write_table(table.slice(0, stock_rows), stock_parquet)
        with LocalRedisServer(workdir / "redis", persist=False) as server:
            connection = server.connection_string
            fast_store, view = _feature_store(
                workdir,
                "fast",
                fast_parquet,
                {
                    "type": "derm.feast_plugins.redis_online_store.FastRedisOnlineStore",
                    "connection_string": f"{connection},db=1",
                },
                {"type": "derm.feast_plugins.vector_engine.VectorMaterializationEngine"},
            )
            stock_store, _ = _feature_store(
                workdir, "stock", stock_parquet, {"type": "redis", "connection_string": f"{connection},db=0"}, "local"
            )
            stock_client, fast_client, raw_client = (
                redis.Redis(host="127.0.0.1", port=server.port, db=db) for db in (0, 1, 2)
            )
            fast = _time_materialize(fast_store, fast_client, repeats)
            assert fast_client.dbsize() == rows
            stock = _time_materialize(stock_store, stock_client, repeats)
            assert stock_client.dbsize() == stock_rows
            raw = _time_raw_hset(fast_store, view, table, raw_client, repeats)
            assert raw_client.dbsize() == rows
            for client in (stock_client, fast_client, raw_client):
                client.close()
    fast_rate = rows / statistics.median(fast)
    stock_rate = stock_rows / statistics.median(stock)
    raw_rate = rows / statistics.median(raw)
    return {
        "rows": rows,
        "stock_rows": stock_rows,
        "dim": DIM,
        "repeats": repeats,
        "fast_rows_per_s": fast_rate,
        "stock_rows_per_s": stock_rate,
        "raw_rows_per_s": raw_rate,
        "fast_over_raw": fast_rate / raw_rate,
        "fast_over_stock": fast_rate / stock_rate,
        "fast_seconds": fast,
        "stock_seconds": stock,
        "raw_seconds": raw,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows for the fast path and raw HSET")
    parser.add_argument("--stock-rows", type=int, default=100_000, help="rows for stock Feast (slow)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    result = run(rows=args.rows, stock_rows=args.stock_rows, repeats=args.repeats)
    print(
        f"{args.rows:,} rows x {DIM}-d float32 into Redis, median of {args.repeats}:\n"
        f"  fast  (vector engine + FastRedisOnlineStore): {result['fast_rows_per_s']:>12,.0f} rows/s\n"
        f"  raw   (redis-py pipelined HSET, same bytes):  {result['raw_rows_per_s']:>12,.0f} rows/s\n"
        f"  stock (local engine + redis, {args.stock_rows:,} rows):   {result['stock_rows_per_s']:>12,.0f} rows/s\n"
        f"  fast/raw = {result['fast_over_raw']:.2f}x   fast/stock = {result['fast_over_stock']:.1f}x"
        + (
            f"\n  (stock measured on {args.stock_rows:,} rows, not {args.rows:,}: per-row protobuf is too slow here)"
            if args.stock_rows < args.rows
            else ""
        )
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
