"""The event-log contract every stage reads.

An event log is a folder of day-partitioned Parquet files,
``<events_dir>/date=YYYY-MM-DD/*.parquet``, one row per impression:

================  ======================  ==========================================
column            Arrow type              meaning
================  ======================  ==========================================
event_id          int64                   unique id of the impression
event_timestamp   timestamp[us, UTC]      when the impression was served
user_id           int64                   viewer
pin_id            int64                   promoted Pin shown
advertiser_id     int64                   advertiser owning the Pin
category_id       int64                   Pin category
surface           string                  home_feed | related_pins | search
clicked           bool                    impression was clicked
converted         bool                    the click led to a conversion
================  ======================  ==========================================

Any log that matches runs through the whole pipeline; :func:`check_event_log`
raises :class:`EventLogError` naming the file and column at fault otherwise.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SURFACES: tuple[str, ...] = ("home_feed", "related_pins", "search")

EVENT_LOG_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.int64(), nullable=False),
        pa.field("event_timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("pin_id", pa.int64(), nullable=False),
        pa.field("advertiser_id", pa.int64(), nullable=False),
        pa.field("category_id", pa.int64(), nullable=False),
        pa.field("surface", pa.string(), nullable=False),
        pa.field("clicked", pa.bool_(), nullable=False),
        pa.field("converted", pa.bool_(), nullable=False),
    ]
)


class EventLogError(ValueError):
    """The event log does not match :data:`EVENT_LOG_SCHEMA`; the message names the file and column."""


def event_files(events_dir: Path) -> list[Path]:
    """All Parquet files of the log, in day order."""
    files = sorted(Path(events_dir).glob("date=*/*.parquet"))
    if not files:
        raise EventLogError(f"{events_dir}: no event files (expected date=YYYY-MM-DD/*.parquet)")
    return files


def partition_day(path: Path) -> date:
    """The day of an event file's ``date=YYYY-MM-DD`` partition folder."""
    name = Path(path).parent.name
    try:
        return date.fromisoformat(name.removeprefix("date="))
    except ValueError as error:
        raise EventLogError(f"{path}: folder {name!r} is not a date=YYYY-MM-DD partition") from error


def log_days(events_dir: Path) -> list[date]:
    """The days with a partition in the event log, ascending."""
    return sorted({partition_day(path) for path in event_files(events_dir)})


def latest_pin_attributes_sql(events: str) -> str:
    """A query over the events relation ``events``: each Pin's advertiser and category as of its newest event.

    Ties on the event time go to the higher ``event_id``. The upstream Pin features and the
    ``pin_attributes`` feature view both use this, so a Pin has the same context everywhere.
    """
    return (
        "SELECT pin_id, arg_max(advertiser_id, (event_timestamp, event_id)) AS advertiser_id, "
        f"arg_max(category_id, (event_timestamp, event_id)) AS category_id FROM {events} GROUP BY pin_id"
    )


def event_glob(events_dir: Path) -> str:
    """The DuckDB ``read_parquet`` glob over the whole log."""
    return str(Path(events_dir) / "date=*" / "*.parquet")


def _compatible(expected: pa.DataType, actual: pa.DataType) -> bool:
    if pa.types.is_timestamp(expected):
        # Any unit is fine; a naive timestamp is not (whose midnight would it be?).
        return pa.types.is_timestamp(actual) and actual.tz is not None
    if pa.types.is_string(expected):
        return (
            pa.types.is_string(actual)
            or pa.types.is_large_string(actual)
            or (pa.types.is_dictionary(actual) and pa.types.is_string(actual.value_type))
        )
    return actual == expected


def check_event_log(events_dir: Path) -> list[Path]:
    """Check every file's schema and the log's invariants; return the files.

    Raises:
        EventLogError: on a missing or mistyped column, nulls in a column, an
            unknown surface, a conversion without a click, a row outside its
            ``date=`` partition, or a duplicate ``event_id``.
    """
    from derm.core.sql import connect, ident

    files = event_files(events_dir)
    for path in files:
        schema = pq.read_schema(path)
        for field in EVENT_LOG_SCHEMA:
            if field.name not in schema.names:
                raise EventLogError(f"{path}: missing column {field.name!r} ({field.type})")
            actual = schema.field(field.name).type
            if not _compatible(field.type, actual):
                raise EventLogError(f"{path}: column {field.name!r} has type {actual}, expected {field.type}")

    nulls_sql = ", ".join(f"count(*) FILTER (WHERE {ident(f.name)} IS NULL)" for f in EVENT_LOG_SCHEMA)
    with connect() as con:
        for path in files:
            nulls = con.execute(f"SELECT {nulls_sql} FROM read_parquet($file)", {"file": str(path)}).fetchone()
            for field, n in zip(EVENT_LOG_SCHEMA, nulls, strict=True):
                if n:
                    raise EventLogError(f"{path}: column {field.name!r} has {n} null values")
            day = path.parent.name.removeprefix("date=")
            bad = con.execute(
                """SELECT
                      count(*) FILTER (WHERE NOT list_contains($surfaces, surface)),
                      count(*) FILTER (WHERE converted AND NOT clicked),
                      count(*) FILTER (WHERE CAST(timezone('UTC', event_timestamp) AS DATE) <> $day)
                    FROM read_parquet($file)""",
                {"surfaces": list(SURFACES), "day": partition_day(path), "file": str(path)},
            ).fetchone()
            checks = (
                f"column 'surface' has {bad[0]} values outside {SURFACES}",
                f"column 'converted' is true on {bad[1]} rows where 'clicked' is false",
                f"column 'event_timestamp' has {bad[2]} rows outside partition date={day}",
            )
            for count, message in zip(bad, checks, strict=True):
                if count:
                    raise EventLogError(f"{path}: {message}")
        duplicates = con.execute(
            "SELECT event_id FROM read_parquet($files) GROUP BY event_id HAVING count(*) > 1 LIMIT 5",
            {"files": [str(path) for path in files]},
        ).fetchall()
    if duplicates:
        ids = [row[0] for row in duplicates]
        raise EventLogError(f"{events_dir}: column 'event_id' has duplicate values, e.g. {ids}")
    return files
