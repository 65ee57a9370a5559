"""Benchmark P1-cluster: materializing N rows x 64-d embeddings into a 3-master Redis Cluster (rows/s).

A private Redis Cluster (3 masters + 3 replicas, ``derm.infra.redis_cluster``) on this
machine, and three ways to fill it with the same snapshot:

* fast: ``FeatureStore.materialize`` with the vector engine + ``FastRedisOnlineStore``
  (``redis_type: redis_cluster``): keys hashed to slots with NumPy, one pipelined RESP
  stream per master (``replica_acks: 0``, as stock);
* redis-py cluster pipelines: the same store forced onto redis-py's ``ClusterPipeline``
  (what the fast writer did on a cluster before: same bytes, per-row Python commands);
* Ray engine: ``FeatureStore.materialize`` with ``RayMaterializationEngine`` (the cluster
  profile's ``batch_engine``): the same pull sliced by slot range, each slice written by a
  Ray task (local Ray, ``num_cpus`` CPUs) through the same slot-grouped writer;
* stock: ``FeatureStore.materialize`` with Feast's local engine + ``redis`` store on the
  cluster, on ``stock_rows`` rows (per-row protobuf is too slow for the full size here).

Each runs ``repeats`` times on an empty cluster; medians are reported. All six nodes and
the benchmark share this machine's cores, so absolute rates are far below a real cluster's;
the ratios are the comparison.

Usage::

    python -m bench.materialize_cluster --rows 1000000 --stock-rows 50000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from bench.materialize_redis import DIM, _feature_store, _time_materialize, embedding_table
from derm.infra.redis_cluster import LocalRedisCluster

FAST_STORE = "derm.feast_plugins.redis_online_store.FastRedisOnlineStore"
VECTOR_ENGINE = "derm.feast_plugins.vector_engine.VectorMaterializationEngine"
RAY_ENGINE = "derm.feast_plugins.ray_engine.RayMaterializationEngine"


class _ClusterKeys:
    """``flushdb``/``dbsize`` over every master, as ``_time_materialize`` expects of a client."""

    def __init__(self, cluster: LocalRedisCluster):
        self.cluster = cluster

    def flushdb(self) -> None:
        for port in self.cluster.master_ports():
            with self.cluster.node_client(port) as client:
                client.flushall()

    def dbsize(self) -> int:
        total = 0
        for port in self.cluster.master_ports():
            with self.cluster.node_client(port) as client:
                total += client.dbsize()
        return total


def _force_redis_py_pipelines(store: Any) -> None:
    """Make the store's fast writer use redis-py's cluster pipelines (the writer before slot grouping)."""
    from derm.feast_plugins import compat
    from derm.feast_plugins.redis_online_store import _PipelineWriter

    online = store._get_provider().online_store

    def writer(config: Any) -> _PipelineWriter:
        return _PipelineWriter(compat.redis_client(online, config.online_store), config.online_store)

    online._writer = writer


def _warm_ray_workers(num_cpus: int) -> None:
    """Start the local Ray and have each worker import the engine: process start-up is not throughput."""
    import ray

    from derm.feast_plugins.ray_asof_offline_store import RayAsofOfflineStoreConfig, ensure_ray

    ensure_ray(RayAsofOfflineStoreConfig(num_cpus=num_cpus))

    def load() -> None:
        import derm.feast_plugins.ray_engine  # noqa: F401

    ray.get([ray.remote(num_cpus=1)(load).remote() for _ in range(num_cpus)])


def run(
    rows: int = 1_000_000,
    stock_rows: int = 50_000,
    repeats: int = 3,
    num_cpus: int = 2,
    slices: int = 4,
    task_rows: int = 250_000,
) -> dict[str, Any]:
    """Median rows/s of the slot-grouped fast path, the Ray engine, redis-py cluster pipelines and stock Feast.

    Args:
        num_cpus: CPUs of the local Ray (Ray tasks writing at once).
        slices: the Ray engine's slot ranges; task_rows: its rows per Ray task.
    """
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        workdir = Path(tmp)
        table = embedding_table(rows)
        fast_parquet, stock_parquet = workdir / "fast.parquet", workdir / "stock.parquet"
        pq.write_table(table, fast_parquet)
        pq.write_table(table.slice(0, stock_rows), stock_parquet)
        with LocalRedisCluster(workdir / "cluster") as cluster:
            keys = _ClusterKeys(cluster)
            online = {"redis_type": "redis_cluster", "connection_string": cluster.connection_string}
            fast_store, _ = _feature_store(workdir, "fast", fast_parquet, {"type": FAST_STORE, **online},
                                           {"type": VECTOR_ENGINE})  # fmt: skip
            fast = _time_materialize(fast_store, keys, repeats)
            assert keys.dbsize() == rows
            _warm_ray_workers(num_cpus)
            engine = {"type": RAY_ENGINE, "num_cpus": num_cpus, "slices": slices, "task_rows": task_rows,
                      "storage_path": str(workdir)}  # fmt: skip
            ray_store, _ = _feature_store(workdir, "ray", fast_parquet, {"type": FAST_STORE, **online}, engine)
            on_ray = _time_materialize(ray_store, keys, repeats)
            assert keys.dbsize() == rows
            ray_tasks = len(ray_store._get_provider().batch_engine.last_task_rows)
            pipeline_store, _ = _feature_store(workdir, "pipeline", fast_parquet, {"type": FAST_STORE, **online},
                                               {"type": VECTOR_ENGINE})  # fmt: skip
            _force_redis_py_pipelines(pipeline_store)
            pipeline = _time_materialize(pipeline_store, keys, repeats)
            assert keys.dbsize() == rows
            stock_store, _ = _feature_store(workdir, "stock", stock_parquet, {"type": "redis", **online}, "local")
            stock = _time_materialize(stock_store, keys, repeats)
            assert keys.dbsize() == stock_rows
    fast_rate = rows / statistics.median(fast)
    ray_rate = rows / statistics.median(on_ray)
    pipeline_rate = rows / statistics.median(pipeline)
    stock_rate = stock_rows / statistics.median(stock)
    return {
        "rows": rows,
        "stock_rows": stock_rows,
        "dim": DIM,
        "masters": 3,
        "repeats": repeats,
        "ray_cpus": num_cpus,
        "ray_tasks": ray_tasks,
        "fast_rows_per_s": fast_rate,
        "ray_engine_rows_per_s": ray_rate,
        "redis_py_cluster_rows_per_s": pipeline_rate,
        "stock_rows_per_s": stock_rate,
        "fast_over_redis_py_cluster": fast_rate / pipeline_rate,
        "fast_over_stock": fast_rate / stock_rate,
        "ray_over_fast": ray_rate / fast_rate,
        "ray_over_stock": ray_rate / stock_rate,
        "fast_seconds": fast,
        "ray_engine_seconds": on_ray,
        "redis_py_cluster_seconds": pipeline,
        "stock_seconds": stock,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--stock-rows", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args(argv)
    result = run(rows=args.rows, stock_rows=args.stock_rows, repeats=args.repeats, num_cpus=args.num_cpus)
    print(
        f"{args.rows:,} rows x {DIM}-d into a 3-master Redis Cluster, median of {args.repeats}:\n"
        f"  fast (slot-grouped RESP per master): {result['fast_rows_per_s']:>12,.0f} rows/s\n"
        f"  Ray engine (slices in Ray tasks):    {result['ray_engine_rows_per_s']:>12,.0f} rows/s\n"
        f"  redis-py cluster pipelines:          {result['redis_py_cluster_rows_per_s']:>12,.0f} rows/s\n"
        f"  stock feast ({args.stock_rows:,} rows):          {result['stock_rows_per_s']:>12,.0f} rows/s"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
