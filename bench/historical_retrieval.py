"""Benchmark: point-in-time retrieval of DERM embeddings for labelled events (P3).

Three ways to attach, to every labelled event, the newest user and Pin
embedding at or before its timestamp (TTL 30 days), from ``days`` daily
snapshots of 64-d embeddings stored like the platform's offline store
(``.../date=YYYY-MM-DD/data.parquet``):

- ``asof_store``: :class:`derm.feast_plugins.asof_offline_store.AsofDuckDBOfflineStore` (Feast API),
- ``stock_store``: Feast's own DuckDB offline store (ibis point-in-time join),
- ``handwritten_asof``: one hand-written DuckDB ASOF JOIN query, the floor.

Every measurement runs in a fresh subprocess, so its peak memory
(``ru_maxrss``, which sees DuckDB's native allocations, unlike tracemalloc) is
its own; the time is the retrieval only (to an Arrow table), after imports and
after the entity dataframe is loaded. Medians over ``repeats``.

The stock store joins every event with every older snapshot row of its entity
(``days`` rows each) before windowing, so it is run on at most
``stock_events`` events; the ASOF store is then also timed at that size so the
speed-up is a like-for-like ratio.

Usage::

    python -m bench.historical_retrieval --events 5000000 --entities 50000 --days 30 --repeats 3

Example::

    from bench.historical_retrieval import run
    result = run(events=20_000, entities=1_000, days=30, repeats=1)
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
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from derm.core.naming import join_key

DIM = 64
TTL = timedelta(days=30)
START = datetime(2026, 1, 1, tzinfo=UTC)
METHODS = ("asof_store", "stock_store", "handwritten_asof")
FAMILIES = ("ctr_user", "ctr_pin")  # P3's embedding families


# ----------------------------------------------------------------------------- data


def write_dataset(
    workdir: Path, events: int, entities: int, days: int, seed: int = 0, families: tuple[str, ...] = FAMILIES
) -> None:
    """Daily embedding snapshots of ``entities`` users and Pins, and ``events`` labelled events over the days.

    Args:
        families: embedding families, ``<model>_<entity>`` with entity ``user`` or ``pin`` (join key
            ``<entity>_id``, column ``<family>_emb``, folder ``offline/embeddings/<family>/v1``), written
            in this order; the default is P3's two, and the same seed then gives P3's data exactly.
    """
    rng = np.random.default_rng(seed)
    ids = np.arange(entities, dtype=np.int64)
    for family in families:
        key = join_key(family)
        for day in range(days):
            snapshot_time = START + timedelta(days=day)
            folder = family_folder(workdir, family) / f"date={snapshot_time.date()}"
            folder.mkdir(parents=True, exist_ok=True)
            embeddings = rng.standard_normal((entities, DIM), dtype=np.float32)
            table = pa.table(
                {
                    key: ids,
                    "event_timestamp": pa.array(np.full(entities, snapshot_time), pa.timestamp("us", tz="UTC")),
                    f"{family}_emb": pa.FixedSizeListArray.from_arrays(embeddings.ravel(), DIM).cast(
                        pa.list_(pa.float32())
                    ),
                }
            )
            pq.write_table(table, folder / "data.parquet")
    # Events over the whole period, with some users and Pins outside the snapshots (no embedding).
    seconds = rng.integers(0, days * 86_400, size=events)
    timestamps = np.datetime64(START.replace(tzinfo=None), "us") + seconds.astype("timedelta64[s]")
    pq.write_table(
        pa.table(
            {
                "user_id": rng.integers(0, int(entities * 1.05) + 1, size=events),
                "pin_id": rng.integers(0, int(entities * 1.05) + 1, size=events),
                "event_timestamp": pa.array(timestamps, pa.timestamp("us", tz="UTC")),
                "label": rng.random(events) < 0.05,
            }
        ),
        workdir / "events.parquet",
    )


def family_folder(workdir: Path, family: str) -> Path:
    """The family's offline folder (``.../<family>/v1``), with one ``date=YYYY-MM-DD`` folder per snapshot."""
    return workdir / "offline" / "embeddings" / family / "v1"


def _source_folder(workdir: Path, family: str) -> Path:
    return family_folder(workdir, f"ctr_{family}")


# ----------------------------------------------------------------------------- one measurement (subprocess)


def _feast_retrieval(workdir: Path, method: str, entity_df):
    from feast import Entity, FeatureView, Field, FileSource, ValueType
    from feast.data_format import ParquetFormat
    from feast.infra.offline_stores.duckdb import DuckDBOfflineStore
    from feast.infra.registry.registry import Registry
    from feast.repo_config import RepoConfig
    from feast.types import Array, Float32, Int64

    from derm.feast_plugins.asof_offline_store import STORE_TYPE, AsofDuckDBOfflineStore

    config = RepoConfig(
        project="bench",
        provider="local",
        registry={"registry_type": "file", "path": str(workdir / "registry.db")},
        offline_store={"type": STORE_TYPE},
        online_store={"type": "sqlite", "path": str(workdir / "online.db")},
        entity_key_serialization_version=3,
        repo_path=str(workdir),
    )
    views = []
    for family in ("user", "pin"):
        entity = Entity(name=family, join_keys=[f"{family}_id"], value_type=ValueType.INT64)
        source = FileSource(
            name=f"ctr_{family}_emb_v1_source",
            path=str(_source_folder(workdir, family)),
            file_format=ParquetFormat(),
            timestamp_field="event_timestamp",
        )
        views.append(
            FeatureView(
                name=f"ctr_{family}_emb_v1",
                entities=[entity],
                ttl=TTL,
                schema=[Field(name=f"{family}_id", dtype=Int64), Field(name=f"ctr_{family}_emb", dtype=Array(Float32))],
                source=source,
            )
        )
    registry = Registry("bench", config.registry, repo_path=workdir)
    refs = ["ctr_user_emb_v1:ctr_user_emb", "ctr_pin_emb_v1:ctr_pin_emb"]
    store = AsofDuckDBOfflineStore if method == "asof_store" else DuckDBOfflineStore

    def retrieve() -> pa.Table:
        return store.get_historical_features(config, views, refs, entity_df, registry, "bench", False).to_arrow()

    return retrieve


def _handwritten_retrieval(workdir: Path, entity_df):
    import duckdb

    user, pin = (str(_source_folder(workdir, family)) for family in ("user", "pin"))
    ttl = f"INTERVAL {TTL.days} DAYS"
    query = f"""
        SELECT e.*,
               CASE WHEN u.event_timestamp >= e.event_timestamp - {ttl} THEN u.ctr_user_emb END AS ctr_user_emb,
               CASE WHEN p.event_timestamp >= e.event_timestamp - {ttl} THEN p.ctr_pin_emb END AS ctr_pin_emb
        FROM entity_df AS e
        ASOF LEFT JOIN read_parquet('{user}') AS u
          ON e.user_id = u.user_id AND e.event_timestamp >= u.event_timestamp
        ASOF LEFT JOIN read_parquet('{pin}') AS p
          ON e.pin_id = p.pin_id AND e.event_timestamp >= p.event_timestamp
    """

    def retrieve() -> pa.Table:
        connection = duckdb.connect()
        connection.execute("SET TimeZone = 'UTC'").fetchall()
        connection.register("entity_df", pa.Table.from_pandas(entity_df, preserve_index=False))
        result = connection.sql(query).to_arrow_table()
        connection.close()
        return result

    return retrieve


def _summary(table: pa.Table, families: tuple[str, ...] = FAMILIES) -> dict:
    """Order-independent fingerprint of a result, to check that the three methods agree."""
    import pyarrow.compute as pc

    summary: dict = {"rows": table.num_rows}
    for column in (f"{family}_emb" for family in families):
        values = table.column(column)
        summary[f"{column}_nulls"] = values.null_count
        summary[f"{column}_sum"] = float(pc.sum(pc.list_flatten(values).cast(pa.float64())).as_py() or 0.0)
    return summary


def measure(workdir: Path, method: str, events: int) -> dict:
    """One timed retrieval in this process; meant to run in a fresh subprocess."""
    import pandas as pd

    entity_df = pd.read_parquet(workdir / "events.parquet").head(events)
    if method == "handwritten_asof":
        retrieve = _handwritten_retrieval(workdir, entity_df)
    else:
        retrieve = _feast_retrieval(workdir, method, entity_df)
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    result = retrieve()
    seconds = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": seconds,
        "peak_rss_mb": peak_kb / 1024,
        "baseline_rss_mb": baseline_kb / 1024,
        **_summary(result),
    }


def _measure_in_subprocess(workdir: Path, method: str, events: int) -> dict:
    repo_root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.historical_retrieval",
            "--measure",
            method,
            "--workdir",
            str(workdir),
            "--events",
            str(events),
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=repo_root,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _medians(samples: list[dict]) -> dict:
    result = dict(samples[-1])
    for key in ("seconds", "peak_rss_mb", "baseline_rss_mb"):
        result[key] = statistics.median(sample[key] for sample in samples)
    result["repeats"] = len(samples)
    return result


def _agree(a: dict, b: dict, families: tuple[str, ...] = FAMILIES) -> bool:
    keys = ("rows", *(f"{family}_emb_nulls" for family in families))
    return all(a[k] == b[k] for k in keys) and all(
        np.isclose(a[k], b[k], rtol=1e-6, atol=1e-3) for k in (f"{family}_emb_sum" for family in families)
    )


def run(
    events: int = 5_000_000,
    entities: int = 50_000,
    days: int = 30,
    repeats: int = 3,
    stock_events: int = 500_000,
    workdir: Path | None = None,
) -> dict:
    """Times the three retrievals; returns per-method medians and the ratios.

    Returns:
        ``{"events", "entities", "days", "repeats", "stock_events", "asof_store", "stock_store",
        "handwritten_asof", "asof_store_at_stock_size", "asof_vs_handwritten", "stock_vs_asof",
        "results_match"}``; each method entry has ``seconds``, ``peak_rss_mb`` (whole process, including the
        interpreter and imports) and ``baseline_rss_mb`` (before the retrieval).
    """
    stock_events = min(stock_events, events)
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(workdir or scratch)
        write_dataset(directory, events, entities, days)

        # Repeats are the outer loop so that a busy machine slows every method alike.
        plan = [("asof_store", events), ("handwritten_asof", events), ("stock_store", stock_events)]
        if stock_events != events:
            # The speed-up over the stock store is measured at the size the stock store was run at.
            plan.append(("asof_store_at_stock_size", stock_events))
        samples: dict[str, list[dict]] = {name: [] for name, _ in plan}
        for _ in range(repeats):
            for name, n in plan:
                method = "asof_store" if name == "asof_store_at_stock_size" else name
                samples[name].append(_measure_in_subprocess(directory, method, n))
        result: dict = {
            "events": events,
            "entities": entities,
            "days": days,
            "repeats": repeats,
            "stock_events": stock_events,
            "threads": os.cpu_count(),
            **{name: _medians(method_samples) for name, method_samples in samples.items()},
        }
    asof_small = result.get("asof_store_at_stock_size", result["asof_store"])
    result["asof_store_at_stock_size"] = asof_small
    result["asof_vs_handwritten"] = result["asof_store"]["seconds"] / result["handwritten_asof"]["seconds"]
    result["stock_vs_asof"] = result["stock_store"]["seconds"] / asof_small["seconds"]
    result["results_match"] = _agree(result["asof_store"], result["handwritten_asof"]) and _agree(
        result["stock_store"], asof_small
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--entities", type=int, default=50_000, help="users and Pins per daily snapshot")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stock-events", type=int, default=500_000, help="events the stock store is run on")
    parser.add_argument("--workdir", type=Path, help="keep the generated data here")
    parser.add_argument("--measure", choices=METHODS, help=argparse.SUPPRESS)  # one measurement (subprocess)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.workdir, args.measure, args.events)))
        return
    print(
        json.dumps(run(args.events, args.entities, args.days, args.repeats, args.stock_events, args.workdir), indent=2)
    )


if __name__ == "__main__":
    main()
