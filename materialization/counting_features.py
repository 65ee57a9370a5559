"""Daily counting features and Pin attributes derived from the event log, written to the offline store.

One row per (entity, day) with activity, stamped with the END of that day: a
day's counts are only known once the day is over, so a point-in-time join never
hands an event the counts of its own day. The 7-day sums are windowed over
calendar days (``RANGE``), not over rows, so a gap in activity shortens the
window instead of stretching it.

The counts are the rankers' own: ads impressions only (``is_ad``; organic
engagement reaches the rankers only through the upstream embeddings). A
conversion is counted in ``conversions_1d`` on the day it became known
(:data:`derm.events.schema.CONVERSION_KNOWN_SQL`), not on its click's day, and
only if that is within the log (its last day's end is the platform's "now").

``pin_attributes`` has the same grain and stamp: one row per (Pin, day the Pin
appeared) with its ``advertiser_id`` and ``category_id`` as of its newest event up
to the end of that day. A Pin that appeared on a day has its newest event up to
then on that very day (every row of a ``date=`` partition lies in that day, see
:func:`derm.events.schema.check_event_log`), so each day's rows are
:func:`derm.events.schema.latest_pin_attributes_sql` over that day's events: the
definition (ties on the time go to the higher ``event_id``) the upstream Pin
features use too. Serving reads these from the online store (feature view
``pin_attributes``) as the rankers' context.

Layout (what the Feast FileSources in ``feature_repo/`` read)::

    <stats_dir>/user_daily_stats/date=YYYY-MM-DD/data_0.parquet
    <stats_dir>/pin_daily_stats/date=YYYY-MM-DD/data_0.parquet
    <stats_dir>/pin_attributes/date=YYYY-MM-DD/data_0.parquet
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from datetime import date
from pathlib import Path

import duckdb

from derm.core.days import day_end
from derm.core.files import replace_directory
from derm.core.naming import (
    COUNTING_SUFFIXES,
    COUNTING_VIEWS,
    ENTITIES,
    PIN_ATTRIBUTES,
    PIN_ATTRIBUTES_VIEW,
    counting_features,
)
from derm.core.sql import connect, ident
from derm.events.schema import (
    CONVERSION_KNOWN_SQL,
    check_event_log,
    event_columns_sql,
    latest_pin_attributes_sql,
    partition_day,
    read_events_sql,
)

# The expression of each counting feature over an entity's days; the feature names (``<entity>_<suffix>``)
# and the views come from derm.core.naming, which the Feast views and the rankers read too.
_COUNTING_EXPRESSIONS = {
    "impressions_1d": "impressions",
    "clicks_1d": "clicks",
    "conversions_1d": "conversions",
    "impressions_7d": "CAST(sum(impressions) OVER w AS BIGINT)",
    "clicks_7d": "CAST(sum(clicks) OVER w AS BIGINT)",
    # Smoothed towards the global click rate so sparse entities do not get 0 or 1.
    "ctr_7d": "(sum(clicks) OVER w + 1.0) / (sum(impressions) OVER w + 10.0)",
}


def _daily_stats_sql(view: str, files: Sequence[Path]) -> str:
    """One row per (entity, day with ads activity or a conversion known), stamped end of day, partitioned
    by date; ``$files`` are the event files, ``$known_by`` the end of the log's last day."""
    key = ident(ENTITIES[COUNTING_VIEWS[view]])
    features = ",\n       ".join(
        f"{_COUNTING_EXPRESSIONS[suffix]} AS {ident(name)}"
        for suffix, name in zip(COUNTING_SUFFIXES, counting_features(view), strict=True)
    )
    return f"""
WITH ads AS (
    SELECT * FROM (SELECT {event_columns_sql(files)} FROM {read_events_sql("files", files)}) WHERE is_ad
),
daily AS (
    SELECT {key}, day, sum(impressions) AS impressions, sum(clicks) AS clicks, sum(conversions) AS conversions
    FROM (
        SELECT {key}, CAST(timezone('UTC', event_timestamp) AS DATE) AS day,
               1 AS impressions, CAST(clicked AS INTEGER) AS clicks, 0 AS conversions
        FROM ads
        UNION ALL
        SELECT {key}, CAST(timezone('UTC', {CONVERSION_KNOWN_SQL}) AS DATE), 0, 0, 1
        FROM ads WHERE converted AND {CONVERSION_KNOWN_SQL} < $known_by
    )
    GROUP BY ALL
)
SELECT {key},
       timezone('UTC', CAST(day + 1 AS TIMESTAMP)) AS event_timestamp,
       {features},
       strftime(day, '%Y-%m-%d') AS date
FROM daily
WINDOW w AS (PARTITION BY {key} ORDER BY day RANGE BETWEEN INTERVAL 6 DAYS PRECEDING AND CURRENT ROW)
"""


def build_counting_features(events_dir: Path, stats_dir: Path) -> dict[str, int]:
    """Recompute the user and Pin daily stats and the Pin attributes from the whole log; return rows per table.

    The event log is checked first (:func:`derm.events.schema.check_event_log`). Every table
    is written to a staging folder beside it; once all are complete, each is swapped in whole
    with :func:`derm.core.files.replace_directory`, so a bad log or a run killed while writing
    leaves the previous offline tables as they were, and a reader never sees half a table.
    """
    files = check_event_log(events_dir)
    known_by = day_end(max(partition_day(path) for path in files))
    stats_dir = Path(stats_dir)
    stats_dir.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}
    counts: dict[str, int] = {}
    try:
        with connect() as con:
            for table in COUNTING_VIEWS:
                staging = staged[table] = _staging_dir(stats_dir, table)
                con.execute(
                    f"COPY ({_daily_stats_sql(table, files)}) TO $path (FORMAT parquet, PARTITION_BY (date))",
                    {"files": [str(f) for f in files], "path": str(staging), "known_by": known_by},
                )
                counts[table] = _rows(con, staging)
            staging = staged[PIN_ATTRIBUTES_VIEW] = _staging_dir(stats_dir, PIN_ATTRIBUTES_VIEW)
            _write_pin_attributes(con, files, staging)
            counts[PIN_ATTRIBUTES_VIEW] = _rows(con, staging)
        for table, staging in staged.items():
            replace_directory(staging, stats_dir / table)
    finally:
        for staging in staged.values():
            shutil.rmtree(staging, ignore_errors=True)
    return counts


def _write_pin_attributes(con: duckdb.DuckDBPyConnection, files: Sequence[Path], staging: Path) -> None:
    """One partition per day: each Pin of the day, stamped end of day, with its attributes as of then."""
    by_day: dict[date, list[str]] = {}
    for path in files:
        by_day.setdefault(partition_day(path), []).append(str(path))
    attributes = ", ".join(ident(name) for name in PIN_ATTRIBUTES)
    query = f"""
        SELECT pin_id, CAST($end AS TIMESTAMPTZ) AS event_timestamp, {attributes}
        FROM ({latest_pin_attributes_sql("read_parquet($files)")})
        ORDER BY pin_id"""
    for day, day_files in sorted(by_day.items()):
        folder = staging / f"date={day.isoformat()}"
        folder.mkdir(parents=True)
        con.execute(
            f"COPY ({query}) TO $path (FORMAT parquet)",
            {"files": day_files, "end": day_end(day), "path": str(folder / "data_0.parquet")},
        )


def _staging_dir(stats_dir: Path, table: str) -> Path:
    """A fresh staging folder beside the table (hidden; what a killed run left there is dropped first)."""
    staging = stats_dir / f".{table}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def _rows(con: duckdb.DuckDBPyConnection, table_dir: Path) -> int:
    # The files are listed here, not globbed by DuckDB: a '[', '?' or '*' in the data directory's name
    # would be read as a pattern.
    files = [str(p) for p in sorted(table_dir.glob("*/*.parquet"))]
    if not files:
        return 0
    return con.execute("SELECT count(*) FROM read_parquet($files)", {"files": files}).fetchall()[0][0]


def stats_path(stats_dir: Path, table: str) -> str:
    """The folder a Feast FileSource points at (DuckDB reads a folder of Parquet directly)."""
    return str(Path(stats_dir) / table)
