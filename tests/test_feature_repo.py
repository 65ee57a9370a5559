"""End to end on tiny data: event log -> counting features and Pin attributes -> feast apply -> materialize -> Redis
-> online read."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from derm.core.days import day_end
from derm.core.paths import FEATURE_REPO_DIR
from derm.materialization.counting_features import build_counting_features

STATS_COLUMNS = ["impressions_1d", "clicks_1d", "conversions_1d", "impressions_7d", "clicks_7d", "ctr_7d"]


def _pandas_oracle(events_dir: Path, entity: str) -> pd.DataFrame:
    """Daily stats recomputed with pandas, independently of the DuckDB SQL under test.

    Ads impressions only (issue 17: organic rows reach the rankers through the embeddings alone); a
    conversion counts on the day it became known (``conversion_timestamp``, else the event's time), if
    that is before the end of the log's last day.
    """
    events = pd.concat(pd.read_parquet(p) for p in sorted(events_dir.glob("date=*/*.parquet")))
    known_by = max(pd.Timestamp(p.name.removeprefix("date="), tz="UTC") for p in events_dir.glob("date=*"))
    known_by += pd.Timedelta(days=1)
    if "is_ad" in events:
        events = events[events["is_ad"].astype(bool)]
    events["event_timestamp"] = events["event_timestamp"].dt.tz_convert("UTC")
    events["day"] = events["event_timestamp"].dt.floor("D")
    shown = events.groupby([f"{entity}_id", "day"]).agg(
        impressions_1d=("clicked", "size"), clicks_1d=("clicked", "sum")
    )
    converted = events[events["converted"].astype(bool)].copy()
    known = converted["event_timestamp"]
    if "conversion_timestamp" in converted:
        known = converted["conversion_timestamp"].dt.tz_convert("UTC").fillna(known)
    converted["day"] = known.dt.floor("D")
    converted = converted[known < known_by]
    conversions = converted.groupby([f"{entity}_id", "day"]).size().rename("conversions_1d")
    daily = shown.join(conversions, how="outer").fillna(0).reset_index()
    rows = []
    for key, group in daily.groupby(f"{entity}_id"):
        for day in group["day"]:
            window = group[(group["day"] > day - pd.Timedelta(days=7)) & (group["day"] <= day)]
            today = group[group["day"] == day].iloc[0]
            impressions, clicks = window["impressions_1d"].sum(), window["clicks_1d"].sum()
            rows.append(
                {
                    f"{entity}_id": key,
                    "event_timestamp": day + pd.Timedelta(days=1),
                    "impressions_1d": today["impressions_1d"],
                    "clicks_1d": today["clicks_1d"],
                    "conversions_1d": today["conversions_1d"],
                    "impressions_7d": impressions,
                    "clicks_7d": clicks,
                    "ctr_7d": (clicks + 1.0) / (impressions + 10.0),
                }
            )
    return pd.DataFrame(rows)


@pytest.mark.parametrize("entity", ["user", "pin"])
def test_counting_features_match_pandas_oracle_and_are_stamped_after_their_day(
    counting_features: Path, tiny_event_log: Path, entity: str
) -> None:
    written = duckdb.sql(f"SELECT * FROM read_parquet('{counting_features}/{entity}_daily_stats/*/*.parquet')").df()
    written = written.rename(columns=lambda c: c.removeprefix(f"{entity}_") if c != f"{entity}_id" else c)
    key = [f"{entity}_id", "event_timestamp"]
    got = written.sort_values(key).reset_index(drop=True)
    expected = _pandas_oracle(tiny_event_log, entity).sort_values(key).reset_index(drop=True)
    assert len(got) == len(expected)
    assert (got["event_timestamp"].dt.hour == 0).all()
    pd.testing.assert_frame_equal(got[key + STATS_COLUMNS], expected[key + STATS_COLUMNS], check_dtype=False)


def test_bad_event_log_leaves_offline_tables_untouched(counting_features: Path, tmp_path: Path) -> None:
    from derm.events.schema import EventLogError

    before = sorted((p, p.stat().st_mtime_ns) for p in counting_features.rglob("*.parquet"))
    (tmp_path / "date=2026-01-01").mkdir()
    duckdb.sql("COPY (SELECT 1::BIGINT AS event_id) TO '" + str(tmp_path / "date=2026-01-01" / "p.parquet") + "'")
    with pytest.raises(EventLogError, match="missing column 'event_timestamp'"):
        build_counting_features(tmp_path, counting_features)
    assert sorted((p, p.stat().st_mtime_ns) for p in counting_features.rglob("*.parquet")) == before


# ---------------------------------------------------------------------------------------------
# Pin attributes: the rankers' context, one row per (Pin, day it appeared)
# ---------------------------------------------------------------------------------------------


def _with_changed_and_tied_pins(source: Path, events_dir: Path) -> dict[tuple[int, date], tuple[int, int]]:
    """A copy of the event log where the tie-break matters; returns (pin, day) -> the (advertiser, category) due.

    Pin 3 moves to advertiser 901 at the very end of the first day (and is back to its own on later
    days). Pins 5 and 6 each get two events at the same newest instant of the last day, with different
    attributes: the higher ``event_id`` must win, whichever row comes first in the file and whichever
    value is larger, so "first row", "last row", max and min all pick wrong on one of them.
    """
    shutil.copytree(source, events_dir)
    days = sorted(date.fromisoformat(p.name.removeprefix("date=")) for p in events_dir.glob("date=*"))
    first, last = days[0], days[-1]
    rows = [  # (event_id, day, pin, advertiser, category), in file order
        (9 * 10**15 + 0, first, 3, 901, 91),
        (9 * 10**15 + 1, last, 5, 700, 70),
        (9 * 10**15 + 2, last, 5, 600, 60),  # higher id, smaller values, written last
        (9 * 10**15 + 4, last, 6, 900, 90),  # higher id, larger values, written first
        (9 * 10**15 + 3, last, 6, 800, 80),
    ]
    for day in (first, last):
        of_day = [row for row in rows if row[1] == day]
        schema = pq.read_schema(next((events_dir / f"date={day.isoformat()}").glob("*.parquet")))
        table = pa.table(
            {
                "event_id": [row[0] for row in of_day],
                "event_timestamp": [day_end(day) - timedelta(microseconds=1)] * len(of_day),
                "user_id": [0] * len(of_day),
                "pin_id": [row[2] for row in of_day],
                "advertiser_id": [row[3] for row in of_day],
                "category_id": [row[4] for row in of_day],
                "surface": ["home_feed"] * len(of_day),
                "clicked": [False] * len(of_day),
                "converted": [False] * len(of_day),
                **{  # the log's optional columns (issue 17), when it has them: ads impressions, no conversion
                    name: [True] * len(of_day) if name == "is_ad" else [None] * len(of_day)
                    for name in ("is_ad", "conversion_timestamp")
                    if name in schema.names
                },
            },
            schema=schema,
        )
        pq.write_table(table, events_dir / f"date={day.isoformat()}" / "ties.parquet")
    return {(3, first): (901, 91), (5, last): (600, 60), (6, last): (900, 90)}


def _pin_attributes_oracle(events_dir: Path) -> pd.DataFrame:
    """Per (Pin, day it appeared), stamped end of day: the attributes of its newest event up to then, ties to the
    higher event_id -- plain pandas, independent of the shared SQL under test."""
    events = pd.concat(pd.read_parquet(p) for p in sorted(events_dir.glob("date=*/*.parquet")))
    events["event_timestamp"] = events["event_timestamp"].dt.tz_convert("UTC")
    events = events.sort_values(["event_timestamp", "event_id"])
    rows = []
    for pin, of_pin in events.groupby("pin_id"):
        for day in of_pin["event_timestamp"].dt.floor("D").unique():
            end = day + pd.Timedelta(days=1)
            newest = of_pin[of_pin["event_timestamp"] < end].iloc[-1]
            rows.append(
                {
                    "pin_id": pin,
                    "event_timestamp": end,
                    "advertiser_id": newest["advertiser_id"],
                    "category_id": newest["category_id"],
                }
            )
    return pd.DataFrame(rows).sort_values(["pin_id", "event_timestamp"]).reset_index(drop=True)


def _read_pin_attributes(stats_dir: Path) -> pd.DataFrame:
    table = duckdb.sql(
        f"SELECT pin_id, event_timestamp, advertiser_id, category_id "
        f"FROM read_parquet('{stats_dir}/pin_attributes/*/*.parquet')"
    ).df()
    table["event_timestamp"] = table["event_timestamp"].dt.tz_convert("UTC")
    return table.sort_values(["pin_id", "event_timestamp"]).reset_index(drop=True)


def test_pin_attributes_match_the_oracle_with_changes_and_ties(tiny_event_log: Path, tmp_path: Path) -> None:
    events_dir, stats_dir = tmp_path / "events", tmp_path / "stats"
    due = _with_changed_and_tied_pins(tiny_event_log, events_dir)
    counts = build_counting_features(events_dir, stats_dir)

    got = _read_pin_attributes(stats_dir)
    expected = _pin_attributes_oracle(events_dir)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)
    # Not the Pin counting stats' grain since issue 17: those count ads impressions only and add a row on a
    # day a conversion became known without an impression; the attributes have a row per day a Pin appeared.
    assert counts["pin_attributes"] == len(got)
    for (pin, day), attributes in due.items():
        row = got[(got["pin_id"] == pin) & (got["event_timestamp"] == pd.Timestamp(day_end(day)))]
        assert tuple(row[["advertiser_id", "category_id"]].iloc[0]) == attributes, (pin, day)
    # pin 3 is back to its own advertiser on the next day it appears: each day is "as of then"
    later = got[(got["pin_id"] == 3) & (got["event_timestamp"] > pd.Timestamp(day_end(min(d for _, d in due))))]
    assert len(later) and (later["advertiser_id"] != 901).all()
    # every table was swapped in whole; nothing staged is left beside them
    assert sorted(p.name for p in stats_dir.iterdir()) == ["pin_attributes", "pin_daily_stats", "user_daily_stats"]


@pytest.fixture(scope="module")
def applied_repo(counting_features: Path, feast_env: dict[str, str]):
    from derm.core.feast_repo import apply_repo, feature_store

    apply_repo()
    return feature_store()


def test_online_features_come_back_from_real_redis(applied_repo, redis_server, tiny_event_log: Path) -> None:
    end = datetime(2026, 1, 7, tzinfo=UTC)
    start = end - timedelta(days=30)
    client = redis_server.client()  # the module's own server: nothing else writes to it
    client.flushdb()
    applied_repo.materialize(start_date=start, end_date=end)
    # Redis holds one hash per entity with the view's fields: count the entities holding each view's
    # timestamp field and compare with the entities the offline table has in the window.
    keys = list(client.scan_iter(count=1000))
    for view, key in (("user_daily_stats", "user_id"), ("pin_daily_stats", "pin_id")):
        held = sum(bool(client.hexists(k, f"_ts:{view}")) for k in keys)
        with duckdb.connect() as con:
            in_window = con.execute(
                f"""SELECT count(DISTINCT {key}) FROM read_parquet($glob)
                WHERE event_timestamp > $start AND event_timestamp <= $end""",
                {"glob": f"{os.environ['DERM_DATA_DIR']}/offline/stats/{view}/*/*.parquet", "start": start, "end": end},
            ).fetchone()[0]
        assert held == in_window > 0, view

    latest = duckdb.sql(
        f"""SELECT user_id, arg_max(user_clicks_7d, event_timestamp) AS clicks_7d,
                   arg_max(user_ctr_7d, event_timestamp) AS ctr_7d
            FROM read_parquet('{os.environ["DERM_DATA_DIR"]}/offline/stats/user_daily_stats/*/*.parquet')
            GROUP BY user_id ORDER BY user_id LIMIT 5"""
    ).df()
    online = applied_repo.get_online_features(
        features=["user_daily_stats:user_clicks_7d", "user_daily_stats:user_ctr_7d"],
        entity_rows=[{"user_id": int(u)} for u in latest["user_id"]] + [{"user_id": 10**9}],
    ).to_dict()
    assert online["user_clicks_7d"][:-1] == latest["clicks_7d"].tolist()
    assert online["user_ctr_7d"][:-1] == pytest.approx(latest["ctr_7d"].tolist())
    assert online["user_clicks_7d"][-1] is None, "an unknown user has no features"


@pytest.mark.slow
def test_feast_cli_apply_and_materialize_incremental(applied_repo, feast_env: dict[str, str]) -> None:
    """The README's hand-run commands work on the repository as shipped."""
    env = {**os.environ, **feast_env}
    feast = (
        [sys.executable, "-m", "feast.cli.cli"]
        if not Path(sys.executable).with_name("feast").exists()
        else [str(Path(sys.executable).with_name("feast"))]
    )
    applied = subprocess.run([*feast, "apply"], cwd=FEATURE_REPO_DIR, env=env, capture_output=True, text=True)
    assert applied.returncode == 0, applied.stderr
    listed = subprocess.run(
        [*feast, "feature-views", "list"], cwd=FEATURE_REPO_DIR, env=env, capture_output=True, text=True
    )
    assert all(view in listed.stdout for view in ("user_daily_stats", "pin_daily_stats", "pin_attributes"))
    materialized = subprocess.run(
        [*feast, "materialize-incremental", "2026-01-07T00:00:00"],
        cwd=FEATURE_REPO_DIR,
        env=env,
        capture_output=True,
        text=True,
    )
    assert materialized.returncode == 0, materialized.stderr


def test_pin_attributes_view_is_registered_outside_the_ranker_services_and_materialized(
    applied_repo, tiny_event_log: Path
) -> None:
    from feast.types import Int64

    from derm.training.downstream.training_sets import ENTITY_COLUMNS

    view = applied_repo.get_feature_view("pin_attributes")
    assert [(f.name, f.dtype) for f in view.features] == [("advertiser_id", Int64), ("category_id", Int64)]
    assert view.entities == ["pin"] and view.online and view.ttl == timedelta(days=90)
    # Training sets carry advertiser_id/category_id in the entity dataframe: no feature service may add
    # the view (or any feature of that name), or get_historical_features would join a second copy.
    for service in applied_repo.list_feature_services():
        assert "pin_attributes" not in {p.name for p in service.feature_view_projections}, service.name
        names = {f.name for p in service.feature_view_projections for f in p.features}
        assert not names & set(ENTITY_COLUMNS), service.name

    end = datetime(2026, 1, 7, tzinfo=UTC)
    applied_repo.materialize(start_date=end - timedelta(days=30), end_date=end, feature_views=["pin_attributes"])
    latest = _pin_attributes_oracle(tiny_event_log).groupby("pin_id").tail(1).set_index("pin_id")
    pins = [int(p) for p in latest.index]
    online = applied_repo.get_online_features(
        features=["pin_attributes:advertiser_id", "pin_attributes:category_id"],
        entity_rows=[{"pin_id": p} for p in [*pins, 10**9]],
    ).to_dict()
    assert online["advertiser_id"][:-1] == latest["advertiser_id"].tolist()
    assert online["category_id"][:-1] == latest["category_id"].tolist()
    assert online["advertiser_id"][-1] is None and online["category_id"][-1] is None, "an unknown Pin has none"
