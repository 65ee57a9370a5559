"""The one DuckDB connection of the platform and its plugins: in memory, in UTC, closed when done.

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
import os
from collections.abc import Iterator

import duckdb


@contextlib.contextmanager
def connect(threads: int | None = None, memory_limit: str | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """A private in-memory DuckDB connection whose session time zone is UTC; closed on exit.

    Args:
        threads: worker threads; None = DuckDB's default (all cores).
        memory_limit: e.g. ``"4GB"``; None = DuckDB's default (80% of RAM), beyond which DuckDB spills.
    """
    con = duckdb.connect()
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
