"""Benchmark P3-scale: point-in-time retrieval on Ray vs the single-node ASOF store (seconds, driver peak RSS).

P3's data generator (``bench.historical_retrieval.write_dataset``: ``days`` daily snapshots of
64-d embeddings, ``events`` labelled events) with ``families`` embedding families: 4 (the issue's
``ctr_user``, ``ctr_pin``, ``cvr_user``, ``cvr_pin``) or 2 (P3's ``ctr_user``, ``ctr_pin``), one
feature view each, all retrieved at once; two stores behind the Feast API:

- ``asof_store``: :class:`derm.feast_plugins.asof_offline_store.AsofDuckDBOfflineStore`, the
  whole training set built in the driver (to an Arrow table);
- ``ray_store``: :class:`derm.feast_plugins.ray_asof_offline_store.RayAsofOfflineStore` on a
  local Ray (``num_cpus`` workers): bucketed ASOF joins in Ray tasks, the result left in
  Parquet files (``to_remote_storage``), so the driver never holds it.

Each measurement runs in a fresh subprocess; the driver's peak RSS is ``ru_maxrss`` of that
process (Ray's workers are other processes: their memory is not the driver's). The Ray time
includes partitioning and writing the result files, not Ray's start-up (Ray and one worker per
CPU, their libraries loaded, are started before the clock, as in a long-lived cluster). The
results are checked to agree (row count, and per family the nulls and the sum of every vector
element; the vector bytes).

``stores`` picks the stores to run: ``ray_store`` alone measures a size whose result the
single-node store cannot hold in memory; there is then no ratio (``None``) and no agreement check.

Usage::

    python -m bench.historical_retrieval_ray --events 1000000 --entities 20000 --days 30 --families 4
    python -m bench.historical_retrieval_ray --events 10000000 --entities 100000 --stores ray_store
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bench.historical_retrieval import TTL, _agree, _summary, family_folder, write_dataset
from derm.core.naming import entity_of, join_key

if TYPE_CHECKING:
    import pyarrow as pa

METHODS = ("asof_store", "ray_store")
FAMILY_SETS = {2: ("ctr_user", "ctr_pin"), 4: ("ctr_user", "ctr_pin", "cvr_user", "cvr_pin")}


def _families(count: int) -> tuple[str, ...]:
    if count not in FAMILY_SETS:
        raise ValueError(f"families must be one of {sorted(FAMILY_SETS)}, got {count}")
    return FAMILY_SETS[count]


def _stores(stores: str | Sequence[str]) -> tuple[str, ...]:
    """``"ray_store"``, ``"asof_store,ray_store"`` or a sequence of names -> the stores in METHODS order."""
    names = set(stores.split(",") if isinstance(stores, str) else stores)
    unknown = names - set(METHODS)
    if unknown or not names:
        raise ValueError(f"stores must be a non-empty subset of {METHODS}, got {sorted(names)}")
    return tuple(method for method in METHODS if method in names)


def _parquet_summary(files: list[str], families: tuple[str, ...]) -> dict:
    """The fingerprint of ``_table_summary`` computed by DuckDB over the result files (the driver never loads
    the vectors)."""
    import duckdb

    columns = [f"{family}_emb" for family in families]
    nulls = ", ".join(f'count(*) - count("{column}")' for column in columns)
    sums = ", ".join(f'sum(list_sum("{column}")::DOUBLE)' for column in columns)
    lengths = " + ".join(f'coalesce(len("{column}"), 0)' for column in columns)
    connection = duckdb.connect()
    row = connection.execute(
        f"SELECT count(*), {nulls}, {sums}, sum({lengths}) * 4 FROM read_parquet($files)", {"files": files}
    ).fetchall()[0]
    connection.close()
    count = len(columns)
    return {
        "rows": row[0],
        **{f"{column}_nulls": row[1 + i] for i, column in enumerate(columns)},
        **{f"{column}_sum": float(row[1 + count + i] or 0.0) for i, column in enumerate(columns)},
        "vector_bytes": int(row[1 + 2 * count] or 0),
    }


def _table_summary(table: pa.Table, families: tuple[str, ...]) -> dict:
    """P3's fingerprint of an in-memory result for these families, plus the bytes of its float32 vectors."""
    import pyarrow.compute as pc

    lengths = sum(int(pc.sum(pc.list_value_length(table.column(f"{family}_emb"))).as_py() or 0) for family in families)
    return {**_summary(table, families), "vector_bytes": lengths * 4}


def _retrieval_inputs(workdir: Path, offline_store: dict, families: tuple[str, ...]) -> tuple:
    """(config, views, refs, registry) of one embedding view per family, for the given offline store."""
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
    for family in families:
        key = join_key(family)
        source = FileSource(
            name=f"{family}_emb_v1_source",
            path=str(family_folder(workdir, family)),
            file_format=ParquetFormat(),
            timestamp_field="event_timestamp",
        )
        views.append(
            FeatureView(
                name=f"{family}_emb_v1",
                entities=[Entity(name=entity_of(family), join_keys=[key], value_type=ValueType.INT64)],
                ttl=TTL,
                schema=[Field(name=key, dtype=Int64), Field(name=f"{family}_emb", dtype=Array(Float32))],
                source=source,
            )
        )
    refs = [f"{family}_emb_v1:{family}_emb" for family in families]
    return config, views, refs, Registry("bench", config.registry, repo_path=workdir)


def measure(workdir: Path, method: str, events: int, num_cpus: int, buckets: int, families: int = 4) -> dict:
    """One timed retrieval in this process; meant to run in a fresh subprocess."""
    import pandas as pd

    names = _families(families)
    entity_df = pd.read_parquet(workdir / "events.parquet").head(events)
    if method == "asof_store":
        from derm.feast_plugins.asof_offline_store import STORE_TYPE, AsofDuckDBOfflineStore

        config, views, refs, registry = _retrieval_inputs(workdir, {"type": STORE_TYPE}, names)
        started_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        table = AsofDuckDBOfflineStore.get_historical_features(
            config, views, refs, entity_df, registry, "bench", False
        ).to_arrow()
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        summary = _table_summary(table, names)
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
        config, views, refs, registry = _retrieval_inputs(workdir, offline_store, names)
        started_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        job = RayAsofOfflineStore.get_historical_features(config, views, refs, entity_df, registry, "bench", False)
        files = job.to_remote_storage()
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        summary = _parquet_summary(files, names)
        # The result, its partitions and gathered vectors take ~2x the result's size on disk: a repeat must not
        # find the previous one's still there (10M events x 4 families: ~20 GB each).
        shutil.rmtree(job.directory)
        return {"seconds": seconds, "peak_rss_mb": peak / 1024, "baseline_rss_mb": started_rss / 1024,
                "files": len(files), **summary}  # fmt: skip
    return {"seconds": seconds, "peak_rss_mb": peak / 1024, "baseline_rss_mb": started_rss / 1024, **summary}


def _measure_in_subprocess(
    workdir: Path, method: str, events: int, num_cpus: int, buckets: int, families: int
) -> dict:  # fmt: skip
    repo_root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "bench.historical_retrieval_ray", "--measure", method, "--workdir", str(workdir),
               "--events", str(events), "--num-cpus", str(num_cpus), "--buckets", str(buckets),
               "--families", str(families)]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=repo_root)
    if completed.returncode != 0:
        # The child's own error, not just its exit status: a failed measurement must say why.
        tail = "\n".join(completed.stderr.strip().splitlines()[-30:])
        raise RuntimeError(f"{method} measurement exited with {completed.returncode}:\n{tail}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run(
    events: int = 1_000_000, entities: int = 20_000, days: int = 30, repeats: int = 1, num_cpus: int = 2,
    buckets: int = 8, families: int = 4, stores: str | Sequence[str] = METHODS,
) -> dict:  # fmt: skip
    """Seconds and driver peak RSS of the chosen stores on the same data, and their ratios.

    Args:
        families: 4 (``ctr_user``, ``ctr_pin``, ``cvr_user``, ``cvr_pin``) or 2 (``ctr_user``, ``ctr_pin``).
        stores: ``asof_store`` and/or ``ray_store`` (a sequence or a comma-separated string). With one
            store the ratios and ``agree`` are None: there is nothing to compare with.

    Returns:
        ``{"events", ..., "families", "family_names", "stores", "<store>": {"seconds", "peak_rss_mb",
        "baseline_rss_mb", "rows", "<family>_emb_nulls", "<family>_emb_sum", "vector_bytes"}, "result_vector_mb",
        "ray_over_asof_seconds", "ray_driver_rss_over_asof", "agree"}``.
    """
    names, methods = _families(families), _stores(stores)
    with tempfile.TemporaryDirectory(prefix="bench-p3-ray-") as tmp:
        workdir = Path(tmp)
        write_dataset(workdir, events, entities, days, families=names)
        results = {}
        for method in methods:
            samples = [
                _measure_in_subprocess(workdir, method, events, num_cpus, buckets, families) for _ in range(repeats)
            ]
            result = dict(samples[-1])
            for key in ("seconds", "peak_rss_mb", "baseline_rss_mb"):
                result[key] = statistics.median(sample[key] for sample in samples)
            result["repeats"] = len(samples)
            results[method] = result
    asof, ray_store = results.get("asof_store"), results.get("ray_store")
    both = asof is not None and ray_store is not None
    # Only the stores that ran are compared: a single store has no ratio and nothing to agree with.
    agree = _agree(asof, ray_store, names) and asof["vector_bytes"] == ray_store["vector_bytes"] if both else None
    return {
        "events": events,
        "entities": entities,
        "days": days,
        "families": families,
        "family_names": list(names),
        "num_cpus": num_cpus,
        "buckets": buckets,
        "stores": list(methods),
        **results,
        "result_vector_mb": (ray_store or asof)["vector_bytes"] / 2**20,
        "ray_over_asof_seconds": ray_store["seconds"] / asof["seconds"] if both else None,
        "ray_driver_rss_over_asof": ray_store["peak_rss_mb"] / asof["peak_rss_mb"] if both else None,
        "agree": agree,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--entities", type=int, default=20_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--buckets", type=int, default=8)
    parser.add_argument("--families", type=int, choices=sorted(FAMILY_SETS), default=4, help="embedding families")
    parser.add_argument(
        "--stores", nargs="+", choices=METHODS, default=list(METHODS), help="ray_store alone: no single-node store"
    )
    parser.add_argument("--measure", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.workdir, args.measure, args.events, args.num_cpus, args.buckets, args.families)))
        return
    result = run(
        args.events, args.entities, args.days, args.repeats, args.num_cpus, args.buckets, args.families, args.stores
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
