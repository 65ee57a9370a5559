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


__all__ = ["connect", "ident"]
