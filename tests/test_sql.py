"""The one DuckDB helper: connections close, run in UTC, and take paths and timestamps as parameters.

Every test runs real DuckDB over a tiny event log written here with pyarrow
(a few rows a day over three days, following ``EVENT_LOG_SCHEMA``).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from derm.core import sql as core_sql
from derm.events.schema import EVENT_LOG_SCHEMA, EventLogError, check_event_log
from derm.feast_plugins import duckdb_sql
from derm.feast_plugins.duckdb_sql import connect, ident
from derm.training.upstream.features import (
    FeatureConfig,
    entity_feature_batches,
    events_used_window,
    training_arrays,
)

DAYS = [date(2026, 1, 1), date(2026, 1, 2), date(2026, 1, 3)]
CFG = FeatureConfig(count_window_days=7, seq_len=3)
# (day index, seconds into the day, user, pin, surface, clicked, converted); pins 10/11 belong to
# advertiser 100 / category 1000 etc. Two events share a second to exercise the event_id tie-break.
ROWS = [
    (0, 3_600, 1, 10, "home_feed", True, False),
    (0, 7_200, 1, 11, "search", False, False),
    (0, 7_200, 2, 10, "related_pins", True, True),
    (1, 100, 1, 12, "home_feed", True, False),
    (1, 50_000, 3, 11, "search", True, False),
    (1, 86_399, 2, 12, "home_feed", False, False),
    (2, 10, 1, 10, "related_pins", False, False),
    (2, 4_000, 2, 11, "home_feed", True, True),
    (2, 4_000, 3, 12, "search", True, False),
    (2, 80_000, 1, 12, "home_feed", True, False),
]


def _event_table(rows: list[tuple], unit: str, first_id: int = 0, extra_ns: int = 0) -> pa.Table:
    """Rows of one day as an event-log table with ``event_timestamp`` in ``unit`` (UTC)."""
    micros = [
        int((datetime.combine(DAYS[d], datetime.min.time(), tzinfo=UTC) + timedelta(seconds=s)).timestamp()) * 10**6
        for d, s, *_ in rows
    ]
    values = [m * 1000 + extra_ns for m in micros] if unit == "ns" else micros
    columns = {
        "event_id": pa.array(range(first_id, first_id + len(rows)), pa.int64()),
        "event_timestamp": pa.array(values, pa.int64()).cast(pa.timestamp(unit, tz="UTC")),
        "user_id": pa.array([r[2] for r in rows], pa.int64()),
        "pin_id": pa.array([r[3] for r in rows], pa.int64()),
        "advertiser_id": pa.array([r[3] * 10 for r in rows], pa.int64()),
        "category_id": pa.array([r[3] * 100 for r in rows], pa.int64()),
        "surface": pa.array([r[4] for r in rows], pa.string()),
        "clicked": pa.array([r[5] for r in rows], pa.bool_()),
        "converted": pa.array([r[6] for r in rows], pa.bool_()),
    }
    schema = pa.schema([field.with_type(columns[field.name].type) for field in EVENT_LOG_SCHEMA])
    return pa.table(columns, schema=schema)


def write_log(events_dir: Path, unit: str = "us", rows: list[tuple] = ROWS) -> Path:
    """The event log of ``rows``, one ``date=`` partition per day."""
    for index, day in enumerate(DAYS):
        day_rows = [r for r in rows if r[0] == index]
        first_id = next(i for i, r in enumerate(rows) if r[0] == index)
        folder = events_dir / f"date={day.isoformat()}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(_event_table(day_rows, unit, first_id), folder / "part-0.parquet")
    return events_dir


def _all_batches(events_dir: Path, entity: str) -> dict[str, np.ndarray]:
    batches = list(entity_feature_batches(events_dir, entity, DAYS[2], CFG, active_window_days=3, batch_rows=2))
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}


# --------------------------------------------------------------------------- the helper


def test_connection_is_closed_after_the_block_even_on_error() -> None:
    with connect() as con:
        assert con.execute("SELECT 42").fetchone() == (42,)
    with pytest.raises(duckdb.ConnectionException):
        con.execute("SELECT 1")

    with pytest.raises(ZeroDivisionError), connect() as failing:
        _ = 1 / 0
    with pytest.raises(duckdb.ConnectionException):
        failing.execute("SELECT 1")


def test_core_re_exports_the_ground_layer_helper() -> None:
    assert core_sql.connect is duckdb_sql.connect
    assert core_sql.ident is duckdb_sql.ident


def test_threads_and_memory_limit_are_applied() -> None:
    settings = "SELECT current_setting('threads'), current_setting('memory_limit')"
    plain = duckdb.connect()
    try:
        default = plain.execute(settings).fetchone()
        plain.execute("SET memory_limit = '512MB'")
        (limit,) = plain.execute("SELECT current_setting('memory_limit')").fetchone()
    finally:
        plain.close()
    with connect(threads=1, memory_limit="512MB") as con:
        assert con.execute(settings).fetchone() == (1, limit)
    with connect() as con:
        assert con.execute(settings).fetchone() == default


def test_plain_connections_share_a_database_but_nothing_a_caller_sets() -> None:
    with connect() as first, connect() as second:
        first.register("frame", pa.table({"x": [1, 2]}))
        first.execute("SET TimeZone = 'Asia/Tokyo'")
        first.execute("CREATE TEMP TABLE scratch AS SELECT 1 AS y")
        with pytest.raises(duckdb.CatalogException):
            second.execute("SELECT * FROM frame")
        with pytest.raises(duckdb.CatalogException):
            second.execute("SELECT * FROM scratch")
        assert second.execute("SELECT current_setting('TimeZone')").fetchone() == ("UTC",)
    with connect() as third:  # the shared database outlives its connections
        assert third.execute("SELECT current_setting('TimeZone')").fetchone() == ("UTC",)


def test_a_forked_child_gets_a_database_of_its_own() -> None:
    with connect() as con:
        con.execute("SELECT 1").fetchall()  # the parent's shared database exists and has run a query
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with connect() as child:
                code = 0 if child.execute("SELECT 41 + 1").fetchone() == (42,) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child ended with status {status}"
    with connect() as con:
        assert con.execute("SELECT 1").fetchone() == (1,)


@pytest.fixture
def far_time_zone() -> Iterator[str]:
    """The process runs in UTC+14 for the test (DuckDB takes its default zone from TZ at connect)."""
    previous = os.environ.get("TZ")
    os.environ["TZ"] = "Pacific/Kiritimati"
    time.tzset()
    yield "Pacific/Kiritimati"
    if previous is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = previous
    time.tzset()


def test_connection_runs_in_utc_whatever_the_process_zone(far_time_zone: str) -> None:
    query = "SELECT current_setting('TimeZone'), CAST(TIMESTAMPTZ '2026-01-01 23:00:00+00' AS DATE)"
    plain = duckdb.connect()
    try:
        assert plain.execute(query).fetchone() == (far_time_zone, date(2026, 1, 2))  # the test means something
    finally:
        plain.close()
    with connect() as con:
        assert con.execute(query).fetchone() == ("UTC", date(2026, 1, 1))
        (value,) = con.execute("SELECT TIMESTAMPTZ '2026-01-01 23:00:00+00'").fetchone()
    assert value.utcoffset() == timedelta(0)


def test_ident_quotes_any_name() -> None:
    with connect() as con:
        name = 'odd "name" it\'s'
        (value,) = con.execute(f"SELECT 1 AS {ident(name)}").fetchone()
        assert con.execute(f"SELECT * FROM (SELECT 1 AS {ident(name)})").description[0][0] == name
    assert value == 1


# --------------------------------------------------------------------------- paths as parameters


def test_path_with_quote_and_space_works_end_to_end(tmp_path: Path) -> None:
    events_dir = write_log(tmp_path / "it's a log" / "events")

    assert len(check_event_log(events_dir)) == len(DAYS)

    arrays = training_arrays(events_dir, DAYS[2], "ctr", CFG)
    day_rows = [r for r in ROWS if r[0] == 2]
    assert arrays["user_id"].tolist() == [r[2] for r in day_rows]
    # The counting features came from the earlier days' files, read through the same odd path.
    before = [r for r in ROWS if r[0] < 2]
    expected_imps = [math.log1p(sum(1 for r in before if r[2] == row[2])) for row in day_rows]
    np.testing.assert_allclose(arrays["user_counts"][:, 0], expected_imps, rtol=1e-6)

    users = _all_batches(events_dir, "user")
    assert users["user_id"].tolist() == [1, 2, 3]
    low, high = events_used_window(events_dir, DAYS[2], CFG, active_window_days=3)
    assert (low, high) == (datetime(2026, 1, 1, 1, tzinfo=UTC), datetime(2026, 1, 3, 22, 13, 20, tzinfo=UTC))


def test_check_event_log_reads_the_files_under_an_odd_path(tmp_path: Path) -> None:
    """The duplicate check runs over the whole log: it must find a repeated id under a quoted path."""
    events_dir = write_log(tmp_path / "it's a log" / "events")
    duplicate = _event_table([ROWS[0]], "us", first_id=0)  # event_id 0 again, on day 0
    pq.write_table(duplicate, events_dir / "date=2026-01-01" / "part-1.parquet")
    with pytest.raises(EventLogError, match=re.escape("duplicate values, e.g. [0]")):
        check_event_log(events_dir)


def test_counting_features_under_a_folder_whose_name_reads_as_a_glob(tmp_path: Path) -> None:
    """'[1]' in a folder name is a character class to DuckDB's glob: files are listed, never globbed."""
    from derm.materialization.counting_features import build_counting_features

    plain = build_counting_features(write_log(tmp_path / "plain" / "events"), tmp_path / "plain" / "stats")
    odd_root = tmp_path / "it's [1] log?"
    odd = build_counting_features(write_log(odd_root / "events"), odd_root / "stats")
    assert odd == plain and min(plain.values()) > 0


# --------------------------------------------------------------------------- time units


def test_nanosecond_event_log_gives_the_microsecond_result(tmp_path: Path) -> None:
    micro = write_log(tmp_path / "us", unit="us")
    nano = write_log(tmp_path / "ns", unit="ns")
    assert pq.read_schema(next(nano.glob("date=*/*.parquet"))).field("event_timestamp").type.unit == "ns"

    assert len(check_event_log(nano)) == len(DAYS)
    for objective in ("ctr", "cvr"):
        expected = training_arrays(micro, DAYS[2], objective, CFG)
        actual = training_arrays(nano, DAYS[2], objective, CFG)
        assert expected.keys() == actual.keys()
        assert len(actual["label"]) > 0
        for name in expected:
            np.testing.assert_array_equal(actual[name], expected[name], err_msg=f"{objective} {name}")
    for entity in ("user", "pin"):
        expected, actual = _all_batches(micro, entity), _all_batches(nano, entity)
        for name in expected:
            np.testing.assert_array_equal(actual[name], expected[name], err_msg=f"{entity} {name}")
    assert events_used_window(nano, DAYS[2], CFG, 3) == events_used_window(micro, DAYS[2], CFG, 3)


def test_sub_microsecond_event_stays_in_its_day(tmp_path: Path) -> None:
    """An event 400 ns before midnight is truncated to the microsecond, not rounded into the next day."""
    events_dir = tmp_path / "events"
    write_log(events_dir, unit="ns")
    last = [(0, 86_399, 3, 12, "search", True, False)]
    late = _event_table(last, "ns", first_id=100, extra_ns=999_999_600)
    pq.write_table(late, events_dir / "date=2026-01-01" / "part-1.parquet")

    arrays = training_arrays(events_dir, DAYS[0], "ctr", CFG)
    end_of_day_us = int(datetime(2026, 1, 2, tzinfo=UTC).timestamp()) * 10**6
    assert arrays["event_timestamp"][-1] == end_of_day_us - 1
    assert arrays["user_id"][-1] == 3
    _, newest = events_used_window(events_dir, DAYS[0], CFG, active_window_days=1)
    assert newest == datetime(2026, 1, 1, 23, 59, 59, 999_999, tzinfo=UTC)
