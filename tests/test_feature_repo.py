"""End to end on tiny data: event log -> counting features -> feast apply -> materialize -> Redis -> online read."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from derm.core.paths import FEATURE_REPO_DIR
from derm.materialization.counting_features import build_counting_features

STATS_COLUMNS = ["impressions_1d", "clicks_1d", "conversions_1d", "impressions_7d", "clicks_7d", "ctr_7d"]


def _pandas_oracle(events_dir: Path, entity: str) -> pd.DataFrame:
    """Daily stats recomputed with pandas, independently of the DuckDB SQL under test."""
    events = pd.concat(pd.read_parquet(p) for p in sorted(events_dir.glob("date=*/*.parquet")))
    events["day"] = events["event_timestamp"].dt.tz_convert("UTC").dt.floor("D")
    daily = (
        events.groupby([f"{entity}_id", "day"])
        .agg(impressions_1d=("clicked", "size"), clicks_1d=("clicked", "sum"), conversions_1d=("converted", "sum"))
        .reset_index()
    )
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


@pytest.fixture(scope="session")
def applied_repo(counting_features: Path, feast_env: dict[str, str]):
    from derm.core.feast_repo import apply_repo, feature_store

    apply_repo()
    return feature_store()


def test_online_features_come_back_from_real_redis(applied_repo, redis_server, tiny_event_log: Path) -> None:
    end = datetime(2026, 1, 7, tzinfo=UTC)
    applied_repo.materialize(start_date=end - timedelta(days=30), end_date=end)
    assert redis_server.client().dbsize() > 0

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
    assert "user_daily_stats" in listed.stdout and "pin_daily_stats" in listed.stdout
    materialized = subprocess.run(
        [*feast, "materialize-incremental", "2026-01-07T00:00:00"],
        cwd=FEATURE_REPO_DIR,
        env=env,
        capture_output=True,
        text=True,
    )
    assert materialized.returncode == 0, materialized.stderr
