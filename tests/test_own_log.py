"""Bring your own log: the contract's boundary (`derm ingest`) and logs of other shapes.

Every shape the README's event-log contract accepts must come out of the boundary in the
canonical types and run through the stages that read the log; every rule it states must be
refused there, with one line naming the file, the column and the rule, exit code 2 and nothing
written. The whole job (`run-all --events`) on logs of every shape: ``tests/test_conformance.py``.
"""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from derm.core.paths import DATA_DIR_ENV
from derm.events.schema import EVENT_LOG_SCHEMA, SURFACES, check_event_log, import_event_log

UNITS = ("s", "ms", "us", "ns")
ZONES = ("UTC", "Europe/Paris", "America/Los_Angeles", "Asia/Kolkata")
ID_MAX = 2**63 - 1


def _write_day(folder: Path, rows: pd.DataFrame, unit: str, zone: str, dictionary: bool, files: int) -> None:
    """One day of the log as the contract allows it: any unit and zone, dictionary strings, several files."""
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(rows), files + 1).astype(int)
    for part, chunk in enumerate(rows.iloc[start:end] for start, end in itertools.pairwise(bounds)):
        if chunk.empty:
            continue
        surface = pa.array(chunk["surface"].tolist(), pa.string())
        # An export in a coarser unit holds the instants already truncated to that unit.
        stamps = chunk["event_timestamp"].dt.floor({"s": "s", "ms": "ms", "us": "us", "ns": "ns"}[unit])
        table = pa.table(
            {
                "event_id": pa.array(chunk["event_id"], pa.int64()),
                "event_timestamp": pa.array(stamps).cast(pa.timestamp(unit, tz=zone)),
                "user_id": pa.array(chunk["user_id"], pa.int64()),
                "pin_id": pa.array(chunk["pin_id"], pa.int64()),
                "advertiser_id": pa.array(chunk["advertiser_id"], pa.int64()),
                "category_id": pa.array(chunk["category_id"], pa.int64()),
                "surface": surface.dictionary_encode() if dictionary else surface.cast(pa.large_string()),
                "clicked": pa.array(chunk["clicked"], pa.bool_()),
                "converted": pa.array(chunk["converted"], pa.bool_()),
            }
        )
        pq.write_table(table, folder / f"part-{part}.parquet", row_group_size=max(1, len(chunk) // 2))


@st.composite
def event_logs(draw: st.DrawFn) -> pd.DataFrame:
    """Valid logs of other shapes than the generator's: gaps, one-event days, skew, ids near 2**63."""
    n_days = draw(st.integers(1, 5))
    first = date(2026, 3, 1)
    days = sorted(draw(st.sets(st.integers(0, 9), min_size=1, max_size=n_days)))
    id_base = draw(st.sampled_from([0, 10**12, ID_MAX - 10_000]))
    rows = []
    event_id = id_base
    for offset in days:
        count = draw(st.sampled_from([1, 2, 7, 40]))
        day_start = datetime.combine(first + timedelta(days=offset), datetime.min.time(), UTC)
        # Any instant of the day, nanoseconds included, the last nanosecond too.
        nanos = draw(st.lists(st.integers(0, 86_400 * 10**9 - 1), min_size=count, max_size=count))
        for ns in nanos:
            clicked = draw(st.booleans())
            rows.append(
                {
                    "event_id": event_id,
                    "event_timestamp": pd.Timestamp(day_start) + pd.Timedelta(ns, "ns"),
                    "user_id": id_base + draw(st.integers(0, 3)),
                    "pin_id": id_base + draw(st.integers(0, 5)),
                    "advertiser_id": draw(st.integers(0, 2)),
                    "category_id": draw(st.integers(0, 2)),
                    "surface": draw(st.sampled_from(SURFACES)),
                    "clicked": clicked,
                    "converted": clicked and draw(st.booleans()),
                }
            )
            event_id += 1
    return pd.DataFrame(rows)


def _write_log(root: Path, frame: pd.DataFrame, unit: str, zone: str, dictionary: bool, files: int) -> Path:
    for day, rows in frame.groupby(frame["event_timestamp"].dt.date):
        _write_day(root / f"date={day.isoformat()}", rows, unit, zone, dictionary, files)
    return root


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    frame=event_logs(),
    unit=st.sampled_from(UNITS),
    zone=st.sampled_from(ZONES),
    dictionary=st.booleans(),
    files=st.integers(1, 3),
)
def test_every_shape_the_contract_accepts_comes_out_canonical(
    tmp_path_factory: pytest.TempPathFactory, frame: pd.DataFrame, unit: str, zone: str, dictionary: bool, files: int
) -> None:
    from derm.materialization.counting_features import build_counting_features
    from derm.training.upstream.features import FeatureConfig, entity_feature_batches, training_arrays

    root = tmp_path_factory.mktemp("log")
    source = _write_log(root / "source", frame, unit, zone, dictionary, files)
    written = import_event_log(source, root / "events")

    assert check_event_log(root / "events") == written
    table = pa.concat_tables(pq.read_table(path) for path in written)
    assert [(f.name, f.type) for f in table.schema] == [(f.name, f.type) for f in EVENT_LOG_SCHEMA]
    expected = _write_log(root / "expected", frame, "ns", "UTC", False, 1)  # the instants as written, in ns
    stored = pa.concat_tables(pq.read_table(p) for p in sorted(expected.glob("date=*/*.parquet"))).to_pandas()
    got = table.to_pandas().set_index("event_id").sort_index()
    stored = stored.set_index("event_id").sort_index()
    rounded = stored["event_timestamp"].dt.floor({"s": "s", "ms": "ms"}.get(unit, "us"))
    assert got.index.equals(stored.index)
    assert (got["event_timestamp"] == rounded.dt.tz_convert("UTC")).all(), "instants truncated to us, never moved"
    assert (got["event_timestamp"].dt.date == rounded.dt.date).all(), "every event stays in its UTC day"
    pd.testing.assert_frame_equal(got.drop(columns="event_timestamp"), stored.drop(columns="event_timestamp"))

    # The stages that read the log directly take the canonical log as it is.
    counts = build_counting_features(root / "events", root / "stats")
    user_days = set(zip(got.user_id, got.event_timestamp.dt.date, strict=True))
    assert counts["user_daily_stats"] == len(user_days)
    day = got["event_timestamp"].dt.date.max()
    arrays = training_arrays(root / "events", day, "ctr", FeatureConfig())
    assert len(arrays["label"]) == int((got["event_timestamp"].dt.date == day).sum())
    users = np.concatenate(
        [b["user_id"] for b in entity_feature_batches(root / "events", "user", day, FeatureConfig())]
    )
    assert set(users.tolist()) == set(got["user_id"].tolist())


def _valid(events: int = 4) -> pd.DataFrame:
    stamps = pd.date_range("2026-03-01T08:00", periods=events, freq="h", tz="UTC")
    return pd.DataFrame(
        {
            "event_id": np.arange(events),
            "event_timestamp": stamps,
            "user_id": np.arange(events) % 2,
            "pin_id": np.arange(events) % 3,
            "advertiser_id": 1,
            "category_id": 2,
            "surface": "search",
            "clicked": [True, False] * (events // 2),
            "converted": False,
        }
    )


BROKEN = {
    "missing column": (lambda t: t.drop_columns(["surface"]), "missing column 'surface'"),
    "mistyped column": (
        lambda t: t.set_column(2, "user_id", t.column("user_id").cast(pa.string())),
        "column 'user_id' has type string",
    ),
    "naive timestamp": (
        lambda t: t.set_column(1, "event_timestamp", t.column("event_timestamp").cast(pa.timestamp("us"))),
        "column 'event_timestamp' has type timestamp[us]",
    ),
    "null": (
        lambda t: t.set_column(3, "pin_id", pa.array([None, 1, 2, 0], pa.int64())),
        "column 'pin_id' has 1 null values",
    ),
    "unknown surface": (
        lambda t: t.set_column(6, "surface", pa.array(["search", "email", "search", "search"])),
        "column 'surface' has 1 values outside",
    ),
    "conversion without click": (
        lambda t: t.set_column(8, "converted", pa.array([False, True, False, False])),
        "column 'converted' is true on 1 rows where 'clicked' is false",
    ),
    "row outside its partition": (
        lambda t: t.set_column(
            1, "event_timestamp", pa.array(pd.date_range("2026-03-02T08:00", periods=4, freq="h", tz="UTC"))
        ),
        "column 'event_timestamp' has 4 rows outside partition date=2026-03-01",
    ),
    "duplicate event id": (
        lambda t: t.set_column(0, "event_id", pa.array([0, 1, 1, 3], pa.int64())),
        "column 'event_id' has duplicate values",
    ),
}


@pytest.mark.parametrize("rule", sorted(BROKEN))
def test_each_broken_rule_is_refused_at_the_boundary_with_nothing_written(
    tmp_path: Path, rule: str, monkeypatch
) -> None:
    from derm.cli.main import cli

    source = tmp_path / "source" / "date=2026-03-01"
    source.mkdir(parents=True)
    table = pa.Table.from_pandas(_valid(), preserve_index=False).cast(
        pa.schema([f.with_nullable(True) for f in EVENT_LOG_SCHEMA])
    )
    break_rule, message = BROKEN[rule]
    pq.write_table(break_rule(table), source / "part-0.parquet")
    data_dir = tmp_path / "data"
    previous = data_dir / "events" / "date=2026-01-01" / "part-0.parquet"
    previous.parent.mkdir(parents=True)
    previous.write_bytes(b"the log imported before")
    monkeypatch.setenv(DATA_DIR_ENV, str(data_dir))

    result = CliRunner().invoke(cli, ["ingest", str(tmp_path / "source")])

    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and str(source / "part-0.parquet") in lines[0] and message in lines[0], result.output
    assert previous.read_bytes() == b"the log imported before", "a refused log writes nothing"
    assert sorted(p.name for p in data_dir.iterdir()) == ["events"] and not list(tmp_path.glob("data/.events*"))


def test_the_real_preset_has_the_shape_of_a_real_log(tmp_path: Path) -> None:
    """Bursty users, heavy day-to-day variance, empty calendar days, click rate ~0.55 (issue 11's log)."""
    import duckdb

    from derm.events.synthetic import SyntheticConfig, generate_event_log

    cfg = SyntheticConfig.preset("real", start_date=date(2026, 1, 1))
    files = generate_event_log(cfg, tmp_path / "events")
    check_event_log(tmp_path / "events")
    con = duckdb.connect()
    con.read_parquet([str(f) for f in files]).create_view("e")
    rates = "SELECT avg(clicked::INT), sum(converted::INT) / sum(clicked::INT) FROM e"
    clicks, per_click = con.execute(rates).fetchone()
    low, high = con.execute(
        "SELECT min(n), max(n) FROM (SELECT count(*) AS n FROM e GROUP BY CAST(event_timestamp AS DATE))"
    ).fetchone()
    longest_user_span = con.execute(
        "SELECT max(span) FROM (SELECT max(CAST(event_timestamp AS DATE)) - min(CAST(event_timestamp AS DATE)) "
        "AS span FROM e GROUP BY user_id)"
    ).fetchone()[0]
    assert 0.45 < clicks < 0.65 and 0.1 < per_click < 0.4
    assert low >= cfg.events_per_day and high <= cfg.events_per_day_max and high > 20 * low
    assert longest_user_span < cfg.user_burst_days, "every user is active in one short burst"
    assert len(files) < cfg.n_days, "some calendar days have no events at all"
    again = generate_event_log(cfg, tmp_path / "again")
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in again], "same config, same log"
