"""The one way the platform opens DuckDB: in memory, in UTC, closed when done, values passed as parameters.

Paths, timestamps and other values never go into SQL text: they are bound as
``$name`` parameters (``read_parquet($files)`` takes a list of paths). Only
identifiers the platform itself defines (join keys, feature names from
:mod:`derm.core.naming`) are formatted into a query, through :func:`ident`.

Example::

    with connect() as con:
        rows = con.execute("SELECT count(*) FROM read_parquet($files) WHERE event_timestamp < $end",
                           {"files": [str(p) for p in files], "end": cutoff}).fetchone()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import duckdb


@contextlib.contextmanager
def connect() -> Iterator[duckdb.DuckDBPyConnection]:
    """A private in-memory DuckDB connection whose session time zone is UTC; closed on exit."""
    con = duckdb.connect()
    try:
        # TIMESTAMPTZ values come back and cast to DATE in UTC, whatever the machine's zone.
        con.execute("SET TimeZone = 'UTC'")
        yield con
    finally:
        con.close()


def ident(name: str) -> str:
    """A quoted SQL identifier (column or alias)."""
    return '"' + name.replace('"', '""') + '"'
