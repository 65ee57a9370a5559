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

import shutil
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


# ``event_timestamp`` in microseconds whatever the file's unit, truncated, never rounded: a plain CAST of
# a nanosecond 23:59:59.9999996 gives the next midnight, moving the event out of its own day.
EVENT_TIMESTAMP_US_SQL = "make_timestamptz(epoch_ns(event_timestamp) // 1000)"


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
                f"""SELECT
                      count(*) FILTER (WHERE NOT list_contains($surfaces, surface)),
                      count(*) FILTER (WHERE converted AND NOT clicked),
                      count(*) FILTER (WHERE CAST(timezone('UTC', {EVENT_TIMESTAMP_US_SQL}) AS DATE) <> $day)
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
            """SELECT event_id, min(filename) FROM read_parquet($files, filename = true)
               GROUP BY event_id HAVING count(*) > 1 ORDER BY event_id LIMIT 5""",
            {"files": [str(path) for path in files]},
        ).fetchall()
    if duplicates:
        ids = [row[0] for row in duplicates]
        raise EventLogError(f"{duplicates[0][1]}: column 'event_id' has duplicate values, e.g. {ids}")
    return files


# The canonical types every later stage reads: microseconds in UTC, plain strings, the contract's
# integer and boolean columns as they are.
_CANONICAL_COLUMNS = {"event_timestamp": EVENT_TIMESTAMP_US_SQL, "surface": "CAST(surface AS VARCHAR)"}
_IMPORT_BATCH_ROWS = 262_144  # rows in memory at once while a day is rewritten


def import_event_log(source_dir: Path, events_dir: Path) -> list[Path]:
    """Check a log against the contract, then write it once in the canonical types under ``events_dir``.

    The boundary of the platform: whatever the contract accepts (any timestamp unit and
    zone, dictionary or large strings, several files and row groups a day, missing
    calendar days) becomes ``date=YYYY-MM-DD/part-0.parquet`` files of exactly
    :data:`EVENT_LOG_SCHEMA`, ordered by time, so no later stage meets another type.
    A log that breaks the contract raises :class:`EventLogError` before anything is
    written; the new log replaces the old one in one step. ``source_dir`` may be
    ``events_dir`` itself (normalising in place).

    Returns:
        The files written, in day order.
    """
    from derm.core.files import replace_directory
    from derm.core.sql import connect, ident

    files = check_event_log(source_dir)
    by_day: dict[date, list[str]] = {}
    for path in files:
        by_day.setdefault(partition_day(path), []).append(str(path))
    columns = ", ".join(
        f"{_CANONICAL_COLUMNS.get(field.name, ident(field.name))} AS {ident(field.name)}" for field in EVENT_LOG_SCHEMA
    )
    events_dir = Path(events_dir)
    staging = events_dir.with_name(f".{events_dir.name}.importing")
    shutil.rmtree(staging, ignore_errors=True)
    written = []
    try:
        with connect() as con:
            for day, day_files in sorted(by_day.items()):
                target = staging / f"date={day.isoformat()}" / "part-0.parquet"
                target.parent.mkdir(parents=True)
                result = con.sql(
                    f"SELECT {columns} FROM read_parquet($files) ORDER BY event_timestamp, event_id",
                    params={"files": day_files},
                )
                # Streamed in batches and cast to the contract's exact schema (DuckDB's own COPY would
                # mark columns required or not depending on the source files).
                with pq.ParquetWriter(target, EVENT_LOG_SCHEMA) as writer:
                    for batch in result.to_arrow_reader(batch_size=_IMPORT_BATCH_ROWS):
                        writer.write_batch(batch.cast(EVENT_LOG_SCHEMA))
                written.append(events_dir / target.relative_to(staging))
        replace_directory(staging, events_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written
