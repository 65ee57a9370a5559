"""Issue 17: the daily upstream quality check judges a snapshot only with labels known when it scores.

A hand-written log with conversion times: day ``t``'s CVR snapshot (written by the real snapshot
writer) scores day ``t+1``'s clicks. One of them converts only on ``t+2``, after the scored day: it is
a negative for the check, as it is for a ranker whose window ends with ``t+1``. One click of day ``t``
converts on ``t+1``: Pin popularity at the end of ``t`` does not count it yet. Taking either conversion
as known at its click would give other figures (worked out below), so the test fails on a leak.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from derm.core.days import day_start
from derm.core.paths import PlatformPaths
from derm.events.schema import EVENT_LOG_SCHEMA

T = date(2026, 5, 5)  # the snapshot day; its snapshot scores T + 1
H = timedelta(hours=1)


def _at(day: date, hours: float) -> datetime:
    return day_start(day) + hours * H


# (event_id, time, user, pin, clicked, converted, conversion known at)
EVENTS = [
    (1, _at(T, 9), 1, 10, True, True, _at(T + timedelta(days=1), 10)),  # popularity must not count it at t's end
    (2, _at(T, 11), 3, 20, False, False, None),
    (3, _at(T + timedelta(days=1), 1), 1, 10, True, True, _at(T + timedelta(days=2), 5)),  # known after t+1
    (4, _at(T + timedelta(days=1), 2), 2, 20, True, True, _at(T + timedelta(days=1), 3)),  # known on t+1
    (5, _at(T + timedelta(days=1), 4), 3, 10, True, False, None),
    (6, _at(T + timedelta(days=1), 5), 4, 20, True, False, None),
    (7, _at(T + timedelta(days=1), 6), 2, 10, False, False, None),  # an impression: not a CVR row
]
USERS = {1: (1.0, 0.0), 2: (0.0, 1.0), 3: (-1.0, 0.0), 4: (0.0, -1.0)}
PINS = {10: (1.0, 0.0), 20: (0.0, 0.5)}  # dot products of the four clicks of t+1: 1, 0.5, -1, -0.5


def _write_log(events_dir: Path) -> None:
    schema = EVENT_LOG_SCHEMA.append(pa.field("conversion_timestamp", pa.timestamp("us", tz="UTC")))
    for day in sorted({row[1].date() for row in EVENTS}):
        rows = [row for row in EVENTS if row[1].date() == day]
        columns = list(zip(*rows, strict=True))
        table = pa.table(
            {
                "event_id": columns[0],
                "event_timestamp": columns[1],
                "user_id": columns[2],
                "pin_id": columns[3],
                "advertiser_id": [7] * len(rows),
                "category_id": [3] * len(rows),
                "surface": ["home_feed"] * len(rows),
                "clicked": columns[4],
                "converted": columns[5],
                "conversion_timestamp": columns[6],
            },
            schema=schema,
        )
        folder = events_dir / f"date={day.isoformat()}"
        folder.mkdir(parents=True)
        pq.write_table(table, folder / "part-0.parquet")


def test_upstream_quality_counts_only_conversions_known_when_it_scores(tmp_path: Path) -> None:
    from derm.training.upstream.export import write_precomputed_snapshot
    from derm.training.upstream.refresh import upstream_quality

    paths = PlatformPaths(tmp_path / "data")
    _write_log(paths.events_dir)
    for family, vectors in (("cvr_user", USERS), ("cvr_pin", PINS)):
        ids = np.array(sorted(vectors), dtype=np.int64)
        matrix = np.array([vectors[i] for i in ids], dtype=np.float32)
        folder = write_precomputed_snapshot(paths, family, T, ids, matrix, config_hash="c" * 64)
    version = folder.parent.name

    quality = upstream_quality(paths, "cvr", version, T, k=1)
    assert quality["evaluated_on"] == (T + timedelta(days=1)).isoformat()
    assert quality["rows"] == 4, quality  # the four clicks of t+1 (the impression is not a CVR row)
    # Only event 4's conversion was known by the end of t+1; event 3's (known on t+2) is a negative.
    # Taking it as known at the click would make 2 positives and a ROC-AUC of 1.0.
    assert quality["positives"] == 1, quality
    assert quality["roc_auc"] == pytest.approx(2 / 3), quality
    # Popularity at the end of t: event 1's conversion was known on t+1, so no Pin has a positive yet
    # (every score ties: 0.5). Counting it would give Pin 10 a positive and a ROC-AUC of 1/6.
    assert quality["roc_auc_popularity"] == pytest.approx(0.5), quality
    # recall@1 of user 2's one positive (Pin 20): its top Pin by u.p is Pin 20.
    assert quality["users"] == 1 and quality["recall_at_k"] == 1.0, quality
