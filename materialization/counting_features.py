"""Daily counting features derived from the event log, written to the offline store.

One row per (entity, day) with activity, stamped with the END of that day: a
day's counts are only known once the day is over, so a point-in-time join never
hands an event the counts of its own day. The 7-day sums are windowed over
calendar days (``RANGE``), not over rows, so a gap in activity shortens the
window instead of stretching it.

Layout (what the Feast FileSources in ``feature_repo/counting_features.py`` read)::

    <stats_dir>/user_daily_stats/date=YYYY-MM-DD/data_0.parquet
    <stats_dir>/pin_daily_stats/date=YYYY-MM-DD/data_0.parquet
"""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb

from derm.events.schema import check_event_log, event_glob

STATS_TABLES: dict[str, str] = {"user_daily_stats": "user", "pin_daily_stats": "pin"}

_DAILY_STATS_SQL = """
WITH daily AS (
    SELECT {key},
           CAST(timezone('UTC', event_timestamp) AS DATE) AS day,
           count(*) AS impressions,
           count(*) FILTER (WHERE clicked) AS clicks,
           count(*) FILTER (WHERE converted) AS conversions
    FROM read_parquet('{events}')
    GROUP BY ALL
)
SELECT {key},
       timezone('UTC', CAST(day + 1 AS TIMESTAMP)) AS event_timestamp,
       impressions AS {prefix}_impressions_1d,
       clicks AS {prefix}_clicks_1d,
       conversions AS {prefix}_conversions_1d,
       CAST(sum(impressions) OVER w AS BIGINT) AS {prefix}_impressions_7d,
       CAST(sum(clicks) OVER w AS BIGINT) AS {prefix}_clicks_7d,
       -- Smoothed towards the global click rate so sparse entities do not get 0 or 1.
       (sum(clicks) OVER w + 1.0) / (sum(impressions) OVER w + 10.0) AS {prefix}_ctr_7d,
       strftime(day, '%Y-%m-%d') AS date
FROM daily
WINDOW w AS (PARTITION BY {key} ORDER BY day RANGE BETWEEN INTERVAL 6 DAYS PRECEDING AND CURRENT ROW)
"""


def build_counting_features(events_dir: Path, stats_dir: Path) -> dict[str, int]:
    """Recompute the user and Pin daily stats from the whole log; return row counts per table.

    The event log is checked first (:func:`derm.events.schema.check_event_log`), and each
    table is written to a staging folder and swapped in, so a bad log or a killed
    run leaves the previous offline tables as they were.
    """
    check_event_log(events_dir)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    counts = {}
    for table, entity in STATS_TABLES.items():
        target = Path(stats_dir) / table
        staging = target.with_name(table + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
        query = _DAILY_STATS_SQL.format(key=f"{entity}_id", prefix=entity, events=event_glob(events_dir))
        con.execute(f"COPY ({query}) TO '{staging}' (FORMAT parquet, PARTITION_BY (date))")
        counts[table] = con.execute(f"SELECT count(*) FROM read_parquet('{staging}/*/*.parquet')").fetchone()[0]
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return counts


def stats_path(stats_dir: Path, table: str) -> str:
    """The folder a Feast FileSource points at (DuckDB reads a folder of Parquet directly)."""
    return str(Path(stats_dir) / table)
