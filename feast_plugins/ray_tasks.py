"""The Ray tasks of :mod:`derm.feast_plugins.ray_asof_offline_store`: DuckDB and PyArrow over files, nothing else.

Kept apart from the store so that a Ray worker imports DuckDB, PyArrow and NumPy only (not
Feast): the driver builds the SQL (the single-node store's ASOF query) and hands each task file
paths, never data.

The retrieval moves the wide feature columns (embeddings) as few times as possible: the
point-in-time match runs on narrow rows (keys, timestamps and a row reference), and each
feature value is read once from its source file, written once to an Arrow IPC file of its
output chunk (no encoding: a memory copy) and once to the result's Parquet file.

Every task takes a trailing ``*after``: the Ray object refs of the tasks it must follow (Ray
waits for top-level refs before it starts a task); their values are ignored.
"""

from __future__ import annotations

import glob
import os
import shutil
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from derm.feast_plugins.duckdb_sql import connect, ident

BUCKET = "__ray_bucket"
ROW = "__ray_row"
"""Row number of an entity row in the entity file (= its place in the entity dataframe)."""
SOURCE_ROW = "__ray_src"
"""Reference to one source row: ``file index << 32 | row number in that file``."""
_FILE_NAME = "__ray_filename"
_FILE_INDEX = "__ray_file"
_ROW_BITS = 32


def warm_up(hold_seconds: float) -> int:
    """Load what the tasks use in this worker process, then hold its CPU a while; returns the worker's pid.

    The first ``take`` of a process imports ``pyarrow.compute`` and pandas (seconds on a busy machine).
    """
    pa.array([0]).take(pa.array([0]))
    with connect(threads=1) as con:
        con.execute("SELECT 1").fetchall()
    time.sleep(hold_seconds)  # so that the other warm-up tasks run in other workers
    return os.getpid()


def bucket_expression(columns: list[str], buckets: int) -> str:
    """``hash(keys as text) % buckets``: equal keys of different integer widths land in the same bucket."""
    keys = ", ".join(f"CAST({ident(column)} AS VARCHAR)" for column in columns)
    # A NULL key matches nothing; COALESCE keeps its entity row (in bucket 0) instead of dropping it.
    return f"COALESCE(hash({keys}) % {int(buckets)}, 0) AS {BUCKET}"


def bucket_files(directory: str, bucket: int) -> list[str]:
    """The Parquet files of one bucket written by the partition tasks under ``directory`` (any depth)."""
    pattern = os.path.join(glob.escape(directory), "**", f"{BUCKET}={bucket}", "*.parquet")
    return sorted(glob.glob(pattern, recursive=True))


def source_files(path: str | list[str]) -> list[str]:
    """The Parquet files DuckDB reads for ``path`` (a file, a folder, a glob or a list), as it names them."""
    with connect(threads=1) as con:
        rows = con.execute("SELECT file_name FROM parquet_file_metadata($path)", {"path": path}).fetchall()
    return list(dict.fromkeys(row[0] for row in rows))


def _file_index_cte(first_index: int) -> str:
    # The group's files with their index in the view's file list; read_parquet names each row's file as given.
    return (
        f"__ray_files AS (SELECT unnest($files) AS {_FILE_NAME}, "
        f"generate_subscripts($files, 1) - 1 + {int(first_index)} AS {_FILE_INDEX})"
    )


def _source_row() -> str:
    return f"(f.{_FILE_INDEX}::BIGINT << {_ROW_BITS}) + s.file_row_number"


def partition_entity(entity_path: str, columns: list[str], key_columns: list[str], buckets: int, out_dir: str,
                     memory: str | None, *after: Any) -> None:  # fmt: skip
    """Write ``columns`` of the entity file and each row's number (``ROW``) by hashed key, under ``out_dir``."""
    select = ", ".join(ident(column) for column in columns)
    with connect(threads=1, memory_limit=memory) as con:
        con.sql(
            f"SELECT file_row_number AS {ROW}, {select}, {bucket_expression(key_columns, buckets)} "
            "FROM read_parquet($path, file_row_number = true, hive_partitioning = false)",
            params={"path": entity_path},
        ).write_parquet(out_dir, partition_by=[BUCKET])


def partition_source(files: list[str], first_index: int, key_columns: list[str], columns: list[str], buckets: int,
                     out_dir: str, empty_path: str | None, memory: str | None, *after: Any) -> None:  # fmt: skip
    """Write the narrow rows of a group of source files by hashed key: keys, ``columns``, ``SOURCE_ROW``.

    Args:
        files: the group's files, in the order of the view's file list.
        first_index: index of ``files[0]`` in the view's file list (``SOURCE_ROW`` carries it).
        key_columns: the source's join-key columns, in the order of the entity's.
        columns: the other narrow columns the match needs (event and created timestamps).
        empty_path: also write an empty file with the narrow schema there (the stand-in for empty buckets).
    """
    narrow = ", ".join(f"s.{ident(column)}" for column in dict.fromkeys(key_columns + columns))
    # Read as the single-node store reads the source (DuckDB's defaults), plus the file name and row number.
    query = (
        f"WITH {_file_index_cte(first_index)}\n"
        f"SELECT {narrow}, {_source_row()} AS {SOURCE_ROW}, {bucket_expression(key_columns, buckets)}\n"
        f"FROM read_parquet($files, filename = '{_FILE_NAME}', file_row_number = true) AS s\n"
        f"JOIN __ray_files AS f USING ({_FILE_NAME})"
    )
    with connect(threads=1, memory_limit=memory) as con:
        relation = con.sql(query, params={"files": files})
        relation.write_parquet(out_dir, partition_by=[BUCKET])
        if empty_path is not None:
            con.sql(f"SELECT * EXCLUDE ({BUCKET}) FROM ({query}) LIMIT 0", params={"files": files}).write_parquet(
                empty_path
            )


def match_bucket(query: str, entity_relation: str, entity_dir: str, bucket: int, event_timestamp_column: str,
                 bound_parameters: dict[str, str], sources: dict[str, tuple[str, str]], out_path: str,
                 memory: str | None, *after: Any) -> None:  # fmt: skip
    """Run the ASOF ``query`` over one bucket's narrow rows and write its rows (``ROW`` + matches) to ``out_path``.

    Nothing is written when no entity row fell in the bucket.

    Args:
        query: the single-node store's ASOF query over ``entity_relation`` and one ``read_parquet($p)`` per view,
            whose "features" are the views' ``SOURCE_ROW`` (NULL: no row, or expired).
        entity_dir: folder of :func:`partition_entity`'s output.
        bound_parameters: query parameter -> ``"min"``/``"max"`` of the bucket's entity timestamps.
        sources: query parameter -> (folder of the view's :func:`partition_source` outputs, its empty file).
    """
    entity_files = bucket_files(entity_dir, bucket)
    if not entity_files:
        return
    with connect(threads=1, memory_limit=memory) as con:
        entity = con.sql(
            "SELECT * FROM read_parquet($files, hive_partitioning = false)",  # the bucket is in the path only
            params={"files": entity_files},
        ).to_arrow_table()
        con.register(entity_relation, entity)
        ts = f"CAST({ident(event_timestamp_column)} AS TIMESTAMPTZ)"
        low, high = con.execute(f"SELECT min({ts}), max({ts}) FROM {entity_relation}").fetchall()[0]
        values: dict[str, Any] = {name: (low if side == "min" else high) for name, side in bound_parameters.items()}
        values.update({name: bucket_files(folder, bucket) or [empty] for name, (folder, empty) in sources.items()})
        con.sql(query, params=values).write_parquet(out_path)


def gather(match_files: str, match_column: str, files: list[str], first_index: int, features: dict[str, str],
           chunk_rows: int, out_dir: str, name: str, memory: str | None, *after: Any) -> None:  # fmt: skip
    """Read the matched rows' features from a group of source files; write them by output chunk as Arrow IPC.

    Writes ``out_dir/chunk=<c>/<name>.arrow`` holding ``ROW`` and the features (output name -> source column)
    of the entity rows ``c * chunk_rows ..`` whose match (``match_column`` of ``match_files``, a glob of
    :func:`match_bucket` outputs) is in ``files``.
    """
    low, high = first_index << _ROW_BITS, (first_index + len(files)) << _ROW_BITS
    select = ", ".join(f"s.{ident(column)} AS {ident(output)}" for output, column in features.items())
    with connect(threads=1, memory_limit=memory) as con:
        matches = con.sql(
            f"SELECT {ROW}, {ident(match_column)} AS {SOURCE_ROW} FROM read_parquet($matches) "
            f"WHERE {ident(match_column)} >= {low} AND {ident(match_column)} < {high}",
            params={"matches": match_files},
        ).to_arrow_table()
        if matches.num_rows == 0:
            return
        con.register("__ray_matches", matches)
        # Each matched source row once (many entity rows may share one): a semi join, hashed on the narrow side.
        found = con.sql(
            f"WITH {_file_index_cte(first_index)}\n"
            f"SELECT {_source_row()} AS {SOURCE_ROW}, {select}\n"
            f"FROM read_parquet($files, filename = '{_FILE_NAME}', file_row_number = true) AS s\n"
            f"JOIN __ray_files AS f USING ({_FILE_NAME})\n"
            f"WHERE {_source_row()} IN (SELECT {SOURCE_ROW} FROM __ray_matches)",
            params={"files": files},
        ).to_arrow_table()
    found_rows = found.column(SOURCE_ROW).to_numpy()
    by_source = np.argsort(found_rows)
    # Per match (entity row): where its source row is in `found`.
    position = by_source[np.searchsorted(found_rows, matches.column(SOURCE_ROW).to_numpy(), sorter=by_source)]
    entity_rows = matches.column(ROW).to_numpy()
    chunks = entity_rows // chunk_rows
    order = np.argsort(chunks, kind="stable")
    chunks = chunks[order]
    values = found.select(list(features)).combine_chunks()
    starts = np.flatnonzero(np.diff(chunks, prepend=-1))
    for start, stop in zip(starts, [*starts[1:], len(chunks)], strict=True):
        chunk, picked = int(chunks[start]), order[start:stop]
        part = values.take(pa.array(position[picked])).add_column(0, ROW, pa.array(entity_rows[picked]))
        os.makedirs(f"{out_dir}/chunk={chunk}", exist_ok=True)
        with pa.ipc.new_file(f"{out_dir}/chunk={chunk}/{name}.arrow", part.schema) as writer:
            writer.write_table(part)


def _write_options(schema: pa.Schema) -> dict[str, Any]:
    """Dictionary encoding and statistics only where they can pay: not on floats or lists (embeddings)."""

    def plain(data_type: pa.DataType) -> bool:
        nested = pa.types.is_list(data_type) or pa.types.is_large_list(data_type)
        return nested or pa.types.is_fixed_size_list(data_type) or pa.types.is_floating(data_type)

    encoded = [field.name for field in schema if not plain(field.type)]
    return {"use_dictionary": encoded, "write_statistics": encoded}


def _read_rows(path: str, first_row: int, count: int) -> pa.Table:
    """Rows ``first_row .. first_row + count`` of a Parquet file, reading only the row groups that hold them."""
    parquet = pq.ParquetFile(path)
    groups, start, skip = [], 0, 0
    for index in range(parquet.metadata.num_row_groups):
        size = parquet.metadata.row_group(index).num_rows
        if start + size > first_row and start < first_row + count:
            if not groups:
                skip = first_row - start
            groups.append(index)
        start += size
    return parquet.read_row_groups(groups).slice(skip, count)


def assemble(entity_path: str, chunk: int, chunk_rows: int, views: list[tuple[str, list[str]]],
             feature_types: dict[str, pa.DataType], columns: list[str], out_path: str, *after: Any) -> int:  # fmt: skip
    """Write result chunk ``chunk``: its entity rows and every view's features, in the entity rows' order.

    Args:
        entity_path: the entity file (its row groups of ``chunk_rows`` rows are read, not the whole file).
        views: (folder of the view's :func:`gather` output, its feature columns) per view.
        feature_types: each feature column's Arrow type (DuckDB's, as the single-node store returns it).
        columns: the result's columns, in order.

    Returns:
        The number of rows written.

    The chunk's gathered features are deleted once its Parquet file is in place (renamed from a
    temporary name, so a file at ``out_path`` is whole): the gathered vectors are as big as the
    result, and keeping them until the job ends doubled the disk a retrieval needs. A retried task
    finds ``out_path`` already written and returns its row count instead of reading deleted inputs.
    """
    if os.path.exists(out_path):
        return pq.ParquetFile(out_path).metadata.num_rows
    first_row = chunk * chunk_rows
    entity = _read_rows(entity_path, first_row, chunk_rows)
    rows = entity.num_rows
    result = {name: entity.column(name) for name in entity.column_names}
    for directory, features in views:
        parts = [
            pa.ipc.open_file(pa.memory_map(path)).read_all()
            for path in sorted(glob.glob(os.path.join(glob.escape(directory), f"chunk={chunk}", "*.arrow")))
        ]
        if not parts:  # no entity row of this chunk found a row of this view
            result.update({name: pa.nulls(rows, feature_types[name]) for name in features})
            continue
        found = pa.concat_tables(parts)
        # Scatter: position[row] = where that entity row's features are in `found`; -1 (null) = no match.
        position = np.full(rows, -1, dtype=np.int64)
        position[found.column(ROW).to_numpy() - first_row] = np.arange(found.num_rows)
        indices = pa.array(position, mask=position < 0)
        for name in features:
            result[name] = found.column(name).take(indices).cast(feature_types[name])
    table = pa.table({name: result[name] for name in columns})
    partial = f"{out_path}.partial"
    with pq.ParquetWriter(partial, table.schema, **_write_options(table.schema)) as writer:
        writer.write_table(table)
    os.replace(partial, out_path)
    for directory, _ in views:
        shutil.rmtree(os.path.join(directory, f"chunk={chunk}"), ignore_errors=True)
    return rows
