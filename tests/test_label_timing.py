"""Decoupled data and label timing (issue 17): the optional ``is_ad`` / ``conversion_timestamp`` columns.

Hypothesis draws small logs with the optional columns in every accepted encoding (or absent, file by
file); each stage that reads them is compared with a plain-Python oracle of the documented policy:

* ``derm ingest`` normalises them (bools; UTC microseconds) and keeps a log without them as it was;
* downstream entity frames hold ads impressions only, and a CVR label is 1 only for a conversion
  known within the attribution window and before the label cut-off;
* counting features count ads impressions, and each conversion on the day it became known;
* upstream training examples (every row, organic too) are labelled with what was known at the end
  of the training day.
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from derm.core.days import day_end, day_start
from derm.core.paths import DATA_DIR_ENV
from derm.events.schema import check_event_log, import_event_log
from tests.event_log_strategies import optional_truth, with_optional_columns

START = date(2026, 4, 1)
US = 1_000_000


@st.composite
def required_tables(draw: st.DrawFn, day: date, first_id: int) -> pa.Table:
    """A small valid file of the required columns for ``day`` (a few users and Pins, clicks, conversions)."""
    n = draw(st.integers(1, 6))
    offsets = draw(st.lists(st.integers(0, 86_400 * US - 1), min_size=n, max_size=n))
    clicked = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    converted = [c and draw(st.booleans()) for c in clicked]
    base = int(day_start(day).timestamp()) * US
    return pa.table(
        {
            "event_id": pa.array(range(first_id, first_id + n), pa.int64()),
            "event_timestamp": pa.array([base + o for o in offsets], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "user_id": pa.array(draw(st.lists(st.integers(1, 3), min_size=n, max_size=n)), pa.int64()),
            "pin_id": pa.array(draw(st.lists(st.integers(1, 2), min_size=n, max_size=n)), pa.int64()),
            "advertiser_id": pa.array([7] * n, pa.int64()),
            "category_id": pa.array([3] * n, pa.int64()),
            "surface": pa.array(["home_feed"] * n, pa.string()),
            "clicked": pa.array(clicked, pa.bool_()),
            "converted": pa.array(converted, pa.bool_()),
        }
    )


@st.composite
def logs(draw: st.DrawFn) -> list[tuple[date, pa.Table]]:
    """1-3 days, 1-2 files a day, each file with its own encoding of the optional columns (or none)."""
    files, next_id = [], 1
    for offset in range(draw(st.integers(1, 3))):
        day = START + timedelta(days=offset)
        for _ in range(draw(st.integers(1, 2))):
            table = draw(with_optional_columns(draw(required_tables(day, next_id))))
            next_id += table.num_rows
            files.append((day, table))
    return files


def _write(root: Path, files: list[tuple[date, pa.Table]]) -> None:
    for i, (day, table) in enumerate(files):
        folder = root / f"date={day.isoformat()}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, folder / f"part-{i}.parquet")


def _rows(files: list[tuple[date, pa.Table]]) -> list[dict]:
    """Every event in canonical form: event time and conversion time in UTC microseconds."""
    rows = []
    for _, table in files:
        truth = optional_truth(table)
        events = table.column("event_timestamp").cast(pa.int64()).to_pylist()
        for i, event_id in enumerate(table.column("event_id").to_pylist()):
            rows.append(
                {
                    "event_id": event_id,
                    "event_us": events[i],
                    "user_id": table.column("user_id")[i].as_py(),
                    "clicked": table.column("clicked")[i].as_py(),
                    "converted": table.column("converted")[i].as_py(),
                    "is_ad": truth["is_ad"][i],
                    "conversion_us": truth["conversion_us"][i],
                }
            )
    return rows


def _known_us(row: dict) -> int:
    return row["conversion_us"] if row["conversion_us"] is not None else row["event_us"]


def _us(moment: datetime) -> int:
    return int(moment.timestamp()) * US


def _day_of(us: int) -> date:
    return datetime.fromtimestamp(us / US, UTC).date()


STATS_COLUMNS = ("user_id", "event_timestamp", "user_impressions_1d", "user_conversions_1d")


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=logs(), cutoff_hours=st.integers(0, 24 * 5))
def test_every_stage_reads_the_optional_columns_as_the_policy_says(tmp_path_factory, files, cutoff_hours) -> None:
    from derm.materialization.counting_features import build_counting_features
    from derm.training.downstream.training_sets import ATTRIBUTION_WINDOW, labelled_events
    from derm.training.upstream.features import FeatureConfig, training_arrays

    root = tmp_path_factory.mktemp("log")
    _write(root / "raw", files)
    rows = _rows(files)
    check_event_log(root / "raw")

    # The boundary: one canonical log, optional columns written iff some file had them.
    import_event_log(root / "raw", root / "events")
    imported = pq.read_table(sorted((root / "events").glob("date=*/*.parquet")))
    had = {name for _, t in files for name in t.column_names} & {"is_ad", "conversion_timestamp"}
    assert set(imported.column_names) & {"is_ad", "conversion_timestamp"} == had
    by_id = {r["event_id"]: r for r in rows}
    if "is_ad" in had:
        assert imported.schema.field("is_ad").type == pa.bool_()
        got = dict(zip(imported["event_id"].to_pylist(), imported["is_ad"].to_pylist(), strict=True))
        assert got == {i: r["is_ad"] for i, r in by_id.items()}
    if "conversion_timestamp" in had:
        assert imported.schema.field("conversion_timestamp").type == pa.timestamp("us", tz="UTC")
        stamps = imported["conversion_timestamp"].cast(pa.int64()).to_pylist()
        assert dict(zip(imported["event_id"].to_pylist(), stamps, strict=True)) == {
            i: r["conversion_us"] for i, r in by_id.items()
        }

    days = sorted({day for day, _ in files})
    start, end = day_start(days[0]), day_end(days[-1])
    cutoff = start + timedelta(hours=cutoff_hours)
    window_us = _us(ATTRIBUTION_WINDOW + datetime(1970, 1, 1, tzinfo=UTC))
    for log in ("raw", "events"):  # a stage reads the raw log (counting features) or the imported one alike
        frame = labelled_events(root / log, "cvr", start, end, label_cutoff=cutoff)
        expected = {
            r["event_id"]: int(
                r["converted"] and _known_us(r) <= r["event_us"] + window_us and _known_us(r) < _us(cutoff)
            )
            for r in rows
            if r["is_ad"] and r["clicked"]
        }
        assert dict(zip(frame["event_id"], frame["label"], strict=True)) == expected
        positives = frame[frame["label"] == 1]
        assert all(_us(t) < _us(cutoff) for t in positives["label_timestamp"])
        assert frame.loc[frame["label"] == 0, "label_timestamp"].isna().all()

    # Counting features: ads impressions on their day, each conversion on the day it became known (in the log).
    counts = build_counting_features(root / "raw", root / "stats")
    # A log without ads impressions has no user stats rows, hence no partition to read (an empty table).
    stat_files = sorted((root / "stats" / "user_daily_stats").glob("*/*.parquet"))
    assert bool(stat_files) == bool(counts["user_daily_stats"])
    stats = pq.read_table(stat_files) if stat_files else pa.table({k: [] for k in STATS_COLUMNS})
    got = {
        (u, _day_of(t) - timedelta(days=1)): (i, c)
        for u, t, i, c in zip(
            stats["user_id"].to_pylist(),
            stats["event_timestamp"].cast(pa.int64()).to_pylist(),
            stats["user_impressions_1d"].to_pylist(),
            stats["user_conversions_1d"].to_pylist(),
            strict=True,
        )
    }
    impressions = Counter((r["user_id"], _day_of(r["event_us"])) for r in rows if r["is_ad"])
    conversions = Counter(
        (r["user_id"], _day_of(_known_us(r))) for r in rows if r["is_ad"] and r["converted"] and _known_us(r) < _us(end)
    )
    assert got == {key: (impressions[key], conversions[key]) for key in impressions | conversions}

    # Upstream: every row (organic too); day t's CVR labels are the conversions known by its end.
    for day in days[-1:]:  # one day per example keeps the test small; the days vary across examples
        arrays = training_arrays(root / "raw", day, "cvr", FeatureConfig())
        clicks = sorted(
            (r["event_us"], r["event_id"], r) for r in rows if r["clicked"] and _day_of(r["event_us"]) == day
        )
        labels = [float(r["converted"] and _known_us(r) < _us(day_end(day))) for _, _, r in clicks]
        assert arrays["label"].tolist() == labels


def test_upstream_counts_only_conversions_known_before_the_cutoff(tmp_path: Path) -> None:
    """A click of day 1 whose conversion is known on day 2: day 2's features do not count it, day 3's do."""
    from derm.training.upstream.features import FeatureConfig, entity_feature_batches, training_arrays

    click_us = _us(day_start(START)) + 3_600 * US
    table = pa.table(
        {
            "event_id": pa.array([1, 2, 3], pa.int64()),
            "event_timestamp": pa.array([click_us, click_us + US, click_us + 2 * US], pa.int64()).cast(
                pa.timestamp("us", tz="UTC")
            ),
            "user_id": pa.array([1, 1, 2], pa.int64()),
            "pin_id": pa.array([1, 2, 1], pa.int64()),
            "advertiser_id": pa.array([7, 7, 7], pa.int64()),
            "category_id": pa.array([3, 3, 3], pa.int64()),
            "surface": pa.array(["search"] * 3),
            "clicked": [True, True, True],
            "converted": [True, False, False],
            "is_ad": [True, False, True],
            # Known 30 hours after the click: on day 2, not by the end of day 1.
            "conversion_timestamp": pa.array([click_us + 30 * 3_600 * US, None, None], pa.int64()).cast(
                pa.timestamp("us", tz="UTC")
            ),
        }
    )
    _write(tmp_path / "events", [(START, table)])
    day1 = training_arrays(tmp_path / "events", START, "cvr", FeatureConfig())
    assert day1["label"].tolist() == [0.0, 0.0, 0.0], "not known when day 1 is trained"
    assert len(day1["label"]) == 3, "organic clicks are upstream training examples too"

    def user_conversions(day: date) -> float:
        [batch] = entity_feature_batches(tmp_path / "events", "user", day, FeatureConfig())
        return float(batch["user_counts"][list(batch["user_id"]).index(1), 2])

    assert user_conversions(START) == 0.0
    assert user_conversions(START + timedelta(days=1)) > 0.0, "known during day 2: counted as of its end"


def test_a_set_relabelled_at_an_earlier_cutoff_forgets_later_conversions() -> None:
    from derm.core.training_set import LABEL
    from derm.training.downstream.training_sets import LABEL_TIMESTAMP, labels_known_at, split_table

    def ts(hour: int) -> datetime:
        return datetime(2026, 4, 1, tzinfo=UTC) + timedelta(hours=hour)

    table = pa.table(
        {
            "event_timestamp": pa.array([ts(1), ts(2), ts(3), ts(30)], pa.timestamp("us", tz="UTC")),
            LABEL: pa.array([1, 1, 0, 1], pa.int64()),
            LABEL_TIMESTAMP: pa.array([ts(5), ts(26), None, ts(31)], pa.timestamp("us", tz="UTC")),
        }
    )
    relabelled = labels_known_at(table, ts(24))
    assert relabelled[LABEL].to_pylist() == [1, 0, 0, 0], "conversions known after the cut-off are negatives"
    assert relabelled[LABEL_TIMESTAMP].to_pylist()[1:] == [None, None, None]
    train, held_out = split_table(table, ts(24))
    assert train[LABEL].to_pylist() == [1, 1, 0] and held_out[LABEL].to_pylist() == [1], "a split keeps labels"


BROKEN_OPTIONAL = {
    "is_ad not 0/1": (lambda t: t.append_column("is_ad", pa.array([0, 2], pa.int32())), "column 'is_ad' has 1 values"),
    "is_ad unknown source": (
        lambda t: t.append_column("is_ad", pa.array(["ads", "sponsored"]).dictionary_encode()),
        "column 'is_ad' has 1 values outside ('ads', 'organic')",
    ),
    "is_ad of another type": (
        lambda t: t.append_column("is_ad", pa.array([0.0, 1.0])),
        "column 'is_ad' has type double",
    ),
    "conversion without the flag": (
        lambda t: t.append_column(
            "conversion_timestamp", t["event_timestamp"].cast(pa.timestamp("ms", tz="Europe/Paris"))
        ),
        "column 'conversion_timestamp' is set on 1 rows where 'converted' is false",
    ),
    "conversion before the event": (
        lambda t: t.append_column(
            "conversion_timestamp",
            pa.array([_us(day_start(START)), None], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        ),
        "column 'conversion_timestamp' is before 'event_timestamp' on 1 rows",
    ),
    "naive conversion time": (
        lambda t: t.append_column("conversion_timestamp", pa.array([None, None], pa.timestamp("us"))),
        "column 'conversion_timestamp' has type timestamp[us]",
    ),
}


@pytest.mark.parametrize("rule", sorted(BROKEN_OPTIONAL))
def test_broken_optional_columns_are_refused_at_the_boundary(tmp_path: Path, monkeypatch, rule: str) -> None:
    from derm.cli.main import cli

    click_us = _us(day_start(START)) + 60 * US
    table = pa.table(
        {
            "event_id": pa.array([1, 2], pa.int64()),
            "event_timestamp": pa.array([click_us, click_us + US], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "user_id": pa.array([1, 2], pa.int64()),
            "pin_id": pa.array([1, 2], pa.int64()),
            "advertiser_id": pa.array([7, 7], pa.int64()),
            "category_id": pa.array([3, 3], pa.int64()),
            "surface": pa.array(["search", "search"]),
            "clicked": [True, True],
            "converted": [True, False],
        }
    )
    break_rule, message = BROKEN_OPTIONAL[rule]
    path = tmp_path / "source" / f"date={START.isoformat()}" / "part-0.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(break_rule(table), path)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "data"))

    result = CliRunner().invoke(cli, ["ingest", str(tmp_path / "source")])

    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and str(path) in lines[0] and re.search(re.escape(message), lines[0]), result.output
    assert not (tmp_path / "data" / "events").exists(), "a refused log writes nothing"
