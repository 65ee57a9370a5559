"""The one way the platform and its plugins open DuckDB: in memory, in UTC, closed when done.

Values (paths, timestamps, settings) are bound as ``$name`` parameters, never formatted into SQL
text; only identifiers the code itself defines go in, quoted by :func:`ident`. This module is the
ground layer so that the Feast plugins, which may import no platform module, use the same helper;
the platform reaches it through :mod:`derm.core.sql`.

Example::

    with connect(threads=2, memory_limit="4GB") as con:
        rows = con.execute("SELECT count(*) FROM read_parquet($files)", {"files": paths}).fetchall()
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator

import duckdb

# One in-memory database per process, shared by every connect() that keeps DuckDB's default settings: a
# new database costs ~25 ms here (a publish opens a dozen), a connection (cursor) to an existing one
# ~0.3 ms. Its connections share nothing the code relies on: registered frames, temporary objects and the
# session time zone are per connection, and the code creates no tables. Threads and memory limit are the
# database's, so a caller that sets them gets a database of its own.
_shared_database: duckdb.DuckDBPyConnection | None = None
_shared_lock = threading.Lock()


def _forget_shared_database() -> None:
    # A forked child must not use the parent's DuckDB (its threads and locks did not come along), nor
    # destroy it: closing joins those threads and crashes. The child keeps one reference to it forever.
    global _shared_database, _shared_lock
    if _shared_database is not None:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(_shared_database))
    _shared_database, _shared_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_shared_database)


def _new_connection(own_database: bool) -> duckdb.DuckDBPyConnection:
    global _shared_database
    if own_database:
        return duckdb.connect()
    with _shared_lock:
        if _shared_database is None:
            _shared_database = duckdb.connect()
        return _shared_database.cursor()


@contextlib.contextmanager
def connect(threads: int | None = None, memory_limit: str | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB connection whose session time zone is UTC; closed on exit.

    Without settings it is a connection to the process's shared in-memory database; with
    ``threads`` or ``memory_limit`` (settings of a whole database) it is a database of its own.

    Args:
        threads: worker threads; None = DuckDB's default (all cores).
        memory_limit: e.g. ``"4GB"``; None = DuckDB's default (80% of RAM), beyond which DuckDB spills.
    """
    con = _new_connection(own_database=threads is not None or memory_limit is not None)
    try:
        # TIMESTAMPTZ values come back and cast to DATE in UTC, whatever the machine's zone; naive
        # timestamps compare as UTC and a day is 24 hours (as in Feast's ibis DuckDB backend).
        con.execute("SET TimeZone = 'UTC'")
        if threads is not None:
            con.execute("SET threads = $threads", {"threads": int(threads)})
        if memory_limit is not None:
            con.execute("SET memory_limit = $memory_limit", {"memory_limit": str(memory_limit)})
        yield con
    finally:
        con.close()


def ident(name: str) -> str:
    """A quoted SQL identifier (column or alias)."""
    return '"' + name.replace('"', '""') + '"'


# The characters that make DuckDB read a path as a glob pattern (its FileSystem::HasGlob).
_GLOB_CHARACTERS = frozenset("*?[")


def glob_escape(path: str) -> str:
    """``path`` as a DuckDB glob pattern that matches only itself.

    DuckDB has no escape character in globs; a one-character class does it: ``[`` -> ``[[]``, ``*`` -> ``[*]``,
    ``?`` -> ``[?]``. A ``]`` outside a class is already literal.

    Example::

        glob_escape("/data/it's a [derm] dir?") + "/**/*.parquet"
        # "/data/it's a [[]derm] dir[?]/**/*.parquet"
    """
    return "".join(f"[{character}]" if character in _GLOB_CHARACTERS else character for character in path)


def parquet_source(path: str) -> str:
    """What ``read_parquet`` must get to read the local file or folder ``path`` as itself.

    A folder whose path holds ``[``, ``*`` or ``?`` is no folder to DuckDB but a pattern: it matches nothing
    (``[derm]`` is one character of d, e, r, m) or, worse, sibling folders. Such a folder becomes the escaped
    ``<folder>/**/*.parquet``, the files DuckDB reads for a plain folder; a file becomes its escaped path.
    Anything else (a plain path, a glob the user meant, a missing path) is returned unchanged, so plain paths
    reach DuckDB exactly as in stock Feast.
    """
    if not _GLOB_CHARACTERS.intersection(path) or not os.path.exists(path):
        return path
    if os.path.isdir(path):
        return os.path.join(glob_escape(path), "**", "*.parquet")
    return glob_escape(path)


__all__ = ["connect", "glob_escape", "ident", "parquet_source"]
