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

Two optional columns (:data:`OPTIONAL_FIELDS`); a log without them stays valid:

====================  ======================  ======================================
column                Arrow type              meaning
====================  ======================  ======================================
is_ad                 bool, integer 0/1, or   the row is an ads impression (true, 1,
                      string ads | organic    ``ads``) or organic engagement;
                                              absent: every row is an ads impression
conversion_timestamp  timestamp with zone,    when the conversion happened (became
                      nullable                known); only on ``converted`` rows, never
                                              before ``event_timestamp``; null on a
                                              converted row: time unknown, taken as
                                              the event time
====================  ======================  ======================================

Upstream models learn from every row; the downstream rankers train and evaluate on ads
impressions only. A conversion counts (as a label or in a counting feature) only from
its :data:`CONVERSION_KNOWN_SQL` time on.

Any log that matches runs through the whole pipeline; :func:`check_event_log`
raises :class:`EventLogError` naming the file and column at fault otherwise.
:func:`event_columns_sql` reads any accepted log in the canonical types, with the
optional columns filled in when a file lacks them.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
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


# Optional columns, in their canonical types (what the generator writes and ``derm ingest`` normalises to).
OPTIONAL_FIELDS = pa.schema(
    [
        pa.field("is_ad", pa.bool_(), nullable=False),
        pa.field("conversion_timestamp", pa.timestamp("us", tz="UTC"), nullable=True),
    ]
)
CANONICAL_SCHEMA = pa.schema([*EVENT_LOG_SCHEMA, *OPTIONAL_FIELDS])  # a log with both optional columns
AD_SOURCES: dict[str, bool] = {"ads": True, "organic": False}  # string values of ``is_ad``

# Over a relation of canonical columns (see event_columns_sql): when a converted row's conversion became
# known. A null conversion_timestamp (time unknown, or a log without the column) is the event time, which is
# what a log that records no conversion times has always meant.
CONVERSION_KNOWN_SQL = "coalesce(conversion_timestamp, event_timestamp)"


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


def _is_string(actual: pa.DataType) -> bool:
    return (
        pa.types.is_string(actual)
        or pa.types.is_large_string(actual)
        or (pa.types.is_dictionary(actual) and pa.types.is_string(actual.value_type))
        or (pa.types.is_dictionary(actual) and pa.types.is_large_string(actual.value_type))
    )


def _compatible(expected: pa.DataType, actual: pa.DataType, name: str = "") -> bool:
    if name == "is_ad":  # a flag as bool, as 0/1 or as the source's name
        return pa.types.is_boolean(actual) or pa.types.is_integer(actual) or _is_string(actual)
    if pa.types.is_timestamp(expected):
        # Any unit is fine; a naive timestamp is not (whose midnight would it be?).
        return pa.types.is_timestamp(actual) and actual.tz is not None
    if pa.types.is_string(expected):
        return _is_string(actual)
    return actual == expected


def optional_columns(files: Sequence[Path | str]) -> dict[str, list[pa.DataType]]:
    """The optional columns (:data:`OPTIONAL_FIELDS`) some file of ``files`` has -> their types there."""
    found: dict[str, list[pa.DataType]] = {}
    for path in files:
        schema = pq.read_schema(path)
        for field in OPTIONAL_FIELDS:
            if field.name in schema.names:
                found.setdefault(field.name, []).append(schema.field(field.name).type)
    return found


def _is_ad_sql(types: list[pa.DataType] | None) -> str:
    if types is None:
        return "true"
    if all(pa.types.is_boolean(t) for t in types):
        return "coalesce(is_ad, true)"  # null only where a file lacks the column (nulls are refused)
    # bool, 0/1 and 'ads'/'organic' all read as text the same way, whatever type DuckDB unifies files to.
    return "coalesce(CAST(is_ad AS VARCHAR) IN ('true', '1', 'ads'), true)"


def event_columns_sql(files: Sequence[Path | str]) -> str:
    """The select list reading raw event files in the canonical types of :data:`CANONICAL_SCHEMA`.

    Over :func:`read_events_sql` of the same files: ``event_timestamp`` in microseconds UTC, ``surface``
    a plain string, ``is_ad`` a bool (``true`` where a file lacks it), ``conversion_timestamp`` in
    microseconds UTC (null where a file lacks it). The files' schemas (footers) are read here.

    Example::

        files = event_files(events_dir)
        sql = f"SELECT {event_columns_sql(files)} FROM {read_events_sql('files', files)}"
        con.execute(sql, {"files": [str(f) for f in files]})
    """
    return ", ".join(
        expression if expression == name else f"{expression} AS {name}"
        for name, expression in _canonical_expressions(files).items()
    )


def _canonical_expressions(files: Sequence[Path | str]) -> dict[str, str]:
    """column of :data:`CANONICAL_SCHEMA` -> its SQL expression over the raw ``files``."""
    present = optional_columns(files)
    expressions = {field.name: field.name for field in CANONICAL_SCHEMA}
    expressions.update(_CANONICAL_COLUMNS)
    expressions["is_ad"] = _is_ad_sql(present.get("is_ad"))
    expressions["conversion_timestamp"] = (
        "make_timestamptz(epoch_ns(conversion_timestamp) // 1000)"
        if "conversion_timestamp" in present
        else "NULL::TIMESTAMPTZ"
    )
    return expressions


def read_events_sql(param: str, files: Sequence[Path | str]) -> str:
    """``read_parquet($param)`` over event files, by column name when some carry optional columns others lack."""
    by_name = ", union_by_name = true" if optional_columns(files) else ""
    return f"read_parquet(${param}{by_name})"


def check_event_log(events_dir: Path) -> list[Path]:
    """Check every file's schema and the log's invariants; return the files.

    Raises:
        EventLogError: on a missing or mistyped column, nulls in a column, an
            unknown surface, a conversion without a click, a row outside its
            ``date=`` partition, a duplicate ``event_id``, an ``is_ad`` value other
            than true/false, 0/1 or ``ads``/``organic``, or a ``conversion_timestamp``
            on a row that did not convert or before its ``event_timestamp``.
    """
    from derm.core.sql import connect, ident

    files = event_files(events_dir)
    optional_by_file = []
    for path in files:
        schema = pq.read_schema(path)
        for field in EVENT_LOG_SCHEMA:
            if field.name not in schema.names:
                raise EventLogError(f"{path}: missing column {field.name!r} ({field.type})")
        present = [field for field in OPTIONAL_FIELDS if field.name in schema.names]
        for field in [*EVENT_LOG_SCHEMA, *present]:
            actual = schema.field(field.name).type
            if not _compatible(field.type, actual, field.name):
                expected = "bool, integer 0/1 or string ads/organic" if field.name == "is_ad" else field.type
                raise EventLogError(f"{path}: column {field.name!r} has type {actual}, expected {expected}")
        optional_by_file.append({field.name: schema.field(field.name).type for field in present})

    with connect() as con:
        for path, optional in zip(files, optional_by_file, strict=True):
            not_null = [*EVENT_LOG_SCHEMA, *(f for f in OPTIONAL_FIELDS if f.name in optional and not f.nullable)]
            nulls_sql = ", ".join(f"count(*) FILTER (WHERE {ident(f.name)} IS NULL)" for f in not_null)
            nulls = con.execute(f"SELECT {nulls_sql} FROM read_parquet($file)", {"file": str(path)}).fetchone()
            for field, n in zip(not_null, nulls, strict=True):
                if n:
                    raise EventLogError(f"{path}: column {field.name!r} has {n} null values")
            day = path.parent.name.removeprefix("date=")
            rules = [
                ("NOT list_contains($surfaces, surface)", f"column 'surface' has {{}} values outside {SURFACES}"),
                ("converted AND NOT clicked", "column 'converted' is true on {} rows where 'clicked' is false"),
                (
                    f"CAST(timezone('UTC', {EVENT_TIMESTAMP_US_SQL}) AS DATE) <> $day",
                    f"column 'event_timestamp' has {{}} rows outside partition date={day}",
                ),
            ]
            rules += _optional_rules(optional)
            bad = con.execute(
                f"SELECT {', '.join(f'count(*) FILTER (WHERE {rule})' for rule, _ in rules)} FROM read_parquet($file)",
                {"surfaces": list(SURFACES), "day": partition_day(path), "file": str(path)},
            ).fetchone()
            for count, (_, message) in zip(bad, rules, strict=True):
                if count:
                    raise EventLogError(f"{path}: {message.format(count)}")
        duplicates = con.execute(
            """SELECT event_id, min(filename) FROM read_parquet($files, filename = true, union_by_name = true)
               GROUP BY event_id HAVING count(*) > 1 ORDER BY event_id LIMIT 5""",
            {"files": [str(path) for path in files]},
        ).fetchall()
    if duplicates:
        ids = [row[0] for row in duplicates]
        raise EventLogError(f"{duplicates[0][1]}: column 'event_id' has duplicate values, e.g. {ids}")
    return files


def _optional_rules(optional: dict[str, pa.DataType]) -> list[tuple[str, str]]:
    """``(SQL condition of a bad row, message)`` for the optional columns a file has (``name -> type``)."""
    rules = []
    is_ad = optional.get("is_ad")
    if is_ad is not None and pa.types.is_integer(is_ad):
        rules.append(("is_ad NOT IN (0, 1)", "column 'is_ad' has {} values outside {{0, 1}}"))
    elif is_ad is not None and not pa.types.is_boolean(is_ad):
        values = tuple(AD_SOURCES)
        rules.append((f"CAST(is_ad AS VARCHAR) NOT IN {values}", f"column 'is_ad' has {{}} values outside {values}"))
    if "conversion_timestamp" in optional:
        rules += [
            (
                "conversion_timestamp IS NOT NULL AND NOT converted",
                "column 'conversion_timestamp' is set on {} rows where 'converted' is false",
            ),
            (
                "epoch_ns(conversion_timestamp) < epoch_ns(event_timestamp)",
                "column 'conversion_timestamp' is before 'event_timestamp' on {} rows",
            ),
        ]
    return rules


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
    # Optional columns are written when any file has them (filled in where a file lacks them), so a log
    # without them is imported exactly as before.
    present = optional_columns(files)
    schema = pa.schema([*EVENT_LOG_SCHEMA, *(f for f in OPTIONAL_FIELDS if f.name in present)])
    events_dir = Path(events_dir)
    staging = events_dir.with_name(f".{events_dir.name}.importing")
    shutil.rmtree(staging, ignore_errors=True)
    written = []
    try:
        with connect() as con:
            for day, day_files in sorted(by_day.items()):
                target = staging / f"date={day.isoformat()}" / "part-0.parquet"
                target.parent.mkdir(parents=True)
                # This day's files in canonical types (what they lack filled in), as the columns the log has.
                canonical = _canonical_expressions(day_files)
                columns = ", ".join(f"{canonical[field.name]} AS {ident(field.name)}" for field in schema)
                result = con.sql(
                    f"SELECT {columns} FROM {read_events_sql('files', day_files)} ORDER BY event_timestamp, event_id",
                    params={"files": day_files},
                )
                # Streamed in batches and cast to the contract's exact schema (DuckDB's own COPY would
                # mark columns required or not depending on the source files).
                with pq.ParquetWriter(target, schema) as writer:
                    for batch in result.to_arrow_reader(batch_size=_IMPORT_BATCH_ROWS):
                        writer.write_batch(batch.cast(schema))
                written.append(events_dir / target.relative_to(staging))
        replace_directory(staging, events_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written
