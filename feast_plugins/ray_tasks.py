"""The Ray tasks of :mod:`derm.feast_plugins.ray_asof_offline_store`: DuckDB over Parquet, nothing else.

Kept apart from the store so that a Ray worker imports DuckDB and PyArrow only (not Feast):
the driver builds the SQL (the single-node store's ASOF query) and hands each task file
paths, never data.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from derm.feast_plugins.duckdb_sql import connect, ident

BUCKET = "__ray_bucket"


def bucket_expression(columns: list[str], buckets: int) -> str:
    """``hash(keys as text) % buckets``: equal keys of different integer widths land in the same bucket."""
    keys = ", ".join(f"CAST({ident(column)} AS VARCHAR)" for column in columns)
    # A NULL key matches nothing; COALESCE keeps its entity row (in bucket 0) instead of dropping it.
    return f"COALESCE(hash({keys}) % {int(buckets)}, 0) AS {BUCKET}"


def partition(source: str | list[str], key_columns: list[str], buckets: int, out_dir: str, memory: str | None) -> None:
    """Write ``source`` (Parquet paths or a glob) as ``out_dir/__ray_bucket=<b>/*.parquet`` by hashed key."""
    with connect(threads=1, memory_limit=memory) as con:
        con.sql(
            f"SELECT *, {bucket_expression(key_columns, buckets)} "
            "FROM read_parquet($source, hive_partitioning = false, union_by_name = true)",
            params={"source": source},
        ).write_parquet(out_dir, partition_by=[BUCKET])


def bucket_files(directory: str, bucket: int) -> list[str]:
    """The Parquet files of one bucket written by :func:`partition` into ``directory``."""
    return sorted(glob.glob(os.path.join(directory, f"{BUCKET}={bucket}", "*.parquet")))


def empty_like(source: str | list[str], path: str) -> str:
    """An empty Parquet file with ``source``'s columns: the stand-in for a bucket no source row hashed to."""
    with connect(threads=1) as con:
        con.sql(
            "SELECT * FROM read_parquet($source, hive_partitioning = false, union_by_name = true) LIMIT 0",
            params={"source": source},
        ).write_parquet(path)
    return path


def join_bucket(
    query: str,
    entity_relation: str,
    entity_files: list[str],
    event_timestamp_column: str,
    bound_parameters: dict[str, str],
    sources: dict[str, list[str]],
    output_columns: list[str],
    entity_types: dict[str, pa.DataType],
    out_path: str,
    memory: str | None,
) -> int:
    """Run the ASOF ``query`` on one bucket and stream its rows to ``out_path``; returns the row count.

    Args:
        query: the single-node store's ASOF query over ``entity_relation`` and one ``read_parquet($p)`` per view.
        entity_files: this bucket's entity rows.
        bound_parameters: query parameter -> ``"min"``/``"max"`` of the bucket's entity timestamps.
        sources: query parameter -> this bucket's files of the view it reads.
        output_columns: the result's columns, in order.
        entity_types: entity columns' Arrow types, restored after DuckDB (time zones, units).
    """
    with connect(threads=1, memory_limit=memory) as con:
        entity = con.sql(
            "SELECT * FROM read_parquet($files, hive_partitioning = false)",  # the bucket is in the path only
            params={"files": entity_files},
        ).to_arrow_table()
        con.register(entity_relation, entity)
        ts = f"CAST({ident(event_timestamp_column)} AS TIMESTAMPTZ)"
        low, high = con.execute(f"SELECT min({ts}), max({ts}) FROM {entity_relation}").fetchall()[0]
        values: dict[str, Any] = {name: (low if side == "min" else high) for name, side in bound_parameters.items()}
        values.update(sources)
        reader = con.sql(query, params=values).to_arrow_reader(65_536)
        rows = 0
        writer: pq.ParquetWriter | None = None
        try:
            for batch in reader:
                table = pa.Table.from_batches([batch]).select(output_columns)
                table = pa.Table.from_arrays(
                    [
                        column.cast(entity_types[name]) if name in entity_types else column
                        for name, column in zip(table.column_names, table.columns, strict=True)
                    ],
                    names=table.column_names,
                )
                if writer is None:
                    writer = pq.ParquetWriter(out_path, table.schema)
                writer.write_table(table)
                rows += table.num_rows
        finally:
            reader.close()
            if writer is not None:
                writer.close()
        return rows
