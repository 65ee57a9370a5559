"""Benchmark P3-scale: point-in-time retrieval on Ray vs the single-node ASOF store (seconds, driver peak RSS).

Same data as P3 (``bench.historical_retrieval.write_dataset``: ``days`` daily snapshots of
64-d user and Pin embeddings, ``events`` labelled events), two stores behind the Feast API:

- ``asof_store``: :class:`derm.feast_plugins.asof_offline_store.AsofDuckDBOfflineStore`, the
  whole training set built in the driver (to an Arrow table);
- ``ray_store``: :class:`derm.feast_plugins.ray_asof_offline_store.RayAsofOfflineStore` on a
  local Ray (``num_cpus`` workers): bucketed ASOF joins in Ray tasks, the result left in
  Parquet files (``to_remote_storage``), so the driver never holds it.

Each measurement runs in a fresh subprocess; the driver's peak RSS is ``ru_maxrss`` of that
process (Ray's workers are other processes: their memory is not the driver's). The Ray time
includes partitioning and writing the result files, not Ray's start-up (Ray and one worker per
CPU, their libraries loaded, are started before the clock, as in a long-lived cluster). The
results are checked to agree (row count, nulls, sum of every vector element).

Usage::

    python -m bench.historical_retrieval_ray --events 1000000 --entities 20000 --days 30
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.historical_retrieval import TTL, _agree, _feast_retrieval, _source_folder, _summary, write_dataset

METHODS = ("asof_store", "ray_store")


def _parquet_summary(files: list[str]) -> dict:
    """The P3 fingerprint computed by DuckDB over the result files (the driver never loads the vectors)."""
    import duckdb

    connection = duckdb.connect()
    row = connection.execute(
        "SELECT count(*), count(*) - count(ctr_user_emb), count(*) - count(ctr_pin_emb), "
        "sum(list_sum(ctr_user_emb)::DOUBLE), sum(list_sum(ctr_pin_emb)::DOUBLE), "
        "sum(len(ctr_user_emb) + len(ctr_pin_emb)) * 4 FROM read_parquet($files)",
        {"files": files},
    ).fetchall()[0]
    connection.close()
    return {
        "rows": row[0],
        "ctr_user_emb_nulls": row[1],
        "ctr_pin_emb_nulls": row[2],
        "ctr_user_emb_sum": float(row[3] or 0.0),
        "ctr_pin_emb_sum": float(row[4] or 0.0),
        "vector_bytes": int(row[5] or 0),
    }


def _retrieval_inputs(workdir: Path, offline_store: dict) -> tuple:
    """(config, views, refs, registry) of P3's two embedding views, for the given offline store."""
    from feast import Entity, FeatureView, Field, FileSource, ValueType
    from feast.data_format import ParquetFormat
    from feast.infra.registry.registry import Registry
    from feast.repo_config import RepoConfig
    from feast.types import Array, Float32, Int64

    config = RepoConfig(
        project="bench",
        provider="local",
        registry={"registry_type": "file", "path": str(workdir / "registry.db")},
        offline_store=offline_store,
        online_store={"type": "sqlite", "path": str(workdir / "online.db")},
        entity_key_serialization_version=3,
        repo_path=str(workdir),
    )
    views = []
    for family in ("user", "pin"):
        source = FileSource(
            name=f"ctr_{family}_emb_v1_source",
            path=str(_source_folder(workdir, family)),
            file_format=ParquetFormat(),
            timestamp_field="event_timestamp",
        )
        views.append(
            FeatureView(
                name=f"ctr_{family}_emb_v1",
                entities=[Entity(name=family, join_keys=[f"{family}_id"], value_type=ValueType.INT64)],
                ttl=TTL,
                schema=[Field(name=f"{family}_id", dtype=Int64), Field(name=f"ctr_{family}_emb", dtype=Array(Float32))],
                source=source,
            )
        )
    refs = ["ctr_user_emb_v1:ctr_user_emb", "ctr_pin_emb_v1:ctr_pin_emb"]
    return config, views, refs, Registry("bench", config.registry, repo_path=workdir)


def measure(workdir: Path, method: str, events: int, num_cpus: int, buckets: int) -> dict:
    """One timed retrieval in this process; meant to run in a fresh subprocess."""
    import pandas as pd

    entity_df = pd.read_parquet(workdir / "events.parquet").head(events)
    if method == "asof_store":
        retrieve = _feast_retrieval(workdir, method, entity_df)
        started_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        summary = _summary(retrieve())
    else:
        from derm.feast_plugins.ray_asof_offline_store import (
            STORE_TYPE,
            RayAsofOfflineStore,
            RayAsofOfflineStoreConfig,
            warm_up_workers,
        )

        # Before the clock, as in a long-lived cluster: Ray started, its workers up with their libraries loaded.
        warm_up_workers(RayAsofOfflineStoreConfig(num_cpus=num_cpus))
        offline_store = {"type": STORE_TYPE, "buckets": buckets, "storage_path": str(workdir / "ray-results")}
        config, views, refs, registry = _retrieval_inputs(workdir, offline_store)
        started_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        job = RayAsofOfflineStore.get_historical_features(config, views, refs, entity_df, registry, "bench", False)
        files = job.to_remote_storage()
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        summary = _parquet_summary(files)
        return {"seconds": seconds, "peak_rss_mb": peak / 1024, "baseline_rss_mb": started_rss / 1024,
                "files": len(files), **summary}  # fmt: skip
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "peak_rss_mb": peak / 1024, "baseline_rss_mb": started_rss / 1024, **summary}


def _measure_in_subprocess(workdir: Path, method: str, events: int, num_cpus: int, buckets: int) -> dict:
    repo_root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "bench.historical_retrieval_ray", "--measure", method, "--workdir", str(workdir),
               "--events", str(events), "--num-cpus", str(num_cpus), "--buckets", str(buckets)]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=repo_root)
    if completed.returncode != 0:
        # The child's own error, not just its exit status: a failed measurement must say why.
        tail = "\n".join(completed.stderr.strip().splitlines()[-30:])
        raise RuntimeError(f"{method} measurement exited with {completed.returncode}:\n{tail}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run(
    events: int = 1_000_000, entities: int = 20_000, days: int = 30, repeats: int = 1, num_cpus: int = 2,
    buckets: int = 8,
) -> dict:  # fmt: skip
    """Seconds and driver peak RSS of both stores on the same data, and their ratios."""
    with tempfile.TemporaryDirectory(prefix="bench-p3-ray-") as tmp:
        workdir = Path(tmp)
        write_dataset(workdir, events, entities, days)
        results = {}
        for method in METHODS:
            samples = [_measure_in_subprocess(workdir, method, events, num_cpus, buckets) for _ in range(repeats)]
            result = dict(samples[-1])
            for key in ("seconds", "peak_rss_mb"):
                result[key] = statistics.median(sample[key] for sample in samples)
            results[method] = result
    asof, ray_store = results["asof_store"], results["ray_store"]
    return {
        "events": events,
        "entities": entities,
        "days": days,
        "families": 2,
        "num_cpus": num_cpus,
        "buckets": buckets,
        **results,
        "result_vector_mb": ray_store["vector_bytes"] / 2**20,
        "ray_over_asof_seconds": ray_store["seconds"] / asof["seconds"],
        "ray_driver_rss_over_asof": ray_store["peak_rss_mb"] / asof["peak_rss_mb"],
        "agree": _agree(asof, ray_store),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--entities", type=int, default=20_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--buckets", type=int, default=8)
    parser.add_argument("--measure", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.workdir, args.measure, args.events, args.num_cpus, args.buckets)))
        return
    result = run(args.events, args.entities, args.days, args.repeats, args.num_cpus, args.buckets)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
