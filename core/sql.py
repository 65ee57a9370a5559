"""The one way the platform opens DuckDB: in memory, in UTC, closed when done, values passed as parameters.

Paths, timestamps and other values never go into SQL text: they are bound as
``$name`` parameters (``read_parquet($files)`` takes a list of paths). Only
identifiers the platform itself defines (join keys, feature names from
:mod:`derm.core.naming`) are formatted into a query, through :func:`ident`.

The definitions sit in :mod:`derm.feast_plugins.duckdb_sql`, the ground layer,
so that the Feast plugins (the ASOF offline store) open DuckDB the same way:
core may import the plugins, the plugins may import no platform module. Import
them from here everywhere else.

Example::

    with connect() as con:
        rows = con.execute("SELECT count(*) FROM read_parquet($files) WHERE event_timestamp < $end",
                           {"files": [str(p) for p in files], "end": cutoff}).fetchone()
"""

from __future__ import annotations

from derm.feast_plugins.duckdb_sql import connect, ident

__all__ = ["connect", "ident"]
