"""A publish looks into its version's recent days only, however many days were published before.

With 2,000 earlier days a publish took 0.12 s longer than with 10 (bench/notes/publish-history.md);
part of it was the gate's history, found by checking every published day folder for its manifest to
keep the newest seven. These tests count, on the real file system, the day folders whose manifest a
step checks (every ``os.stat``, which ``Path.exists`` and ``os.path.exists`` both go through), so a
regression shows without timing anything. The full listing (freshness needs every day: it reports the
gaps) is the positive control that the count sees the checks at all.
"""

from __future__ import annotations

import os
import re
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest

from derm.core.paths import PlatformPaths
from derm.core.snapshot import MANIFEST_FILE, read_manifest, snapshot_dir
from derm.materialization.catalog import Catalog
from derm.materialization.publish import _published_days, _recent_sources
from derm.validation.gate import GateThresholds
from tests.test_validation import DAY, FAMILY, VERSION, unit_vectors, write_snapshot

EARLIER_DAYS = 400
HISTORY_DAYS = GateThresholds.load().snapshot.history_days
FIRST = DAY - timedelta(days=EARLIER_DAYS)
# Among the recent days: one that never reached the offline store (a day folder without manifest),
# one published whose source snapshot is gone; plus one older gap.
NO_MANIFEST = DAY - timedelta(days=3)
NO_SOURCE = DAY - timedelta(days=5)
OLD_GAP = FIRST + timedelta(days=10)


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> tuple[PlatformPaths, Path]:
    """EARLIER_DAYS published days before DAY (offline partition and source snapshot), and DAY's snapshot."""
    paths = PlatformPaths(tmp_path_factory.mktemp("publish-history-cost"))
    today = write_snapshot(paths.snapshots_dir, DAY, unit_vectors(np.random.default_rng(0), n=60))
    manifest_text = (today / MANIFEST_FILE).read_text()
    catalog = Catalog(paths.embeddings_offline_dir)
    for offset in range(EARLIER_DAYS):
        day = FIRST + timedelta(days=offset)
        partition = catalog.partition_dir(FAMILY, VERSION, day)
        partition.mkdir(parents=True)
        if day not in (NO_MANIFEST, OLD_GAP):
            (partition / MANIFEST_FILE).write_text(manifest_text)
        if day != NO_SOURCE:
            snapshot_dir(paths.snapshots_dir, FAMILY, VERSION, day).mkdir(parents=True)
    return paths, today


def _checked_days(monkeypatch: pytest.MonkeyPatch, root: Path) -> list[date]:
    """The days under ``root`` whose manifest is stat'ed from now on (the list fills as the test runs)."""
    checked: list[date] = []
    stat = os.stat
    pattern = re.compile(rf"^{re.escape(str(root))}/[^/]+/[^/]+/date=([^/]+)/{re.escape(MANIFEST_FILE)}$")

    def counting_stat(path, *args, **kwargs):
        match = pattern.match(os.fspath(path))
        if match:
            checked.append(date.fromisoformat(match.group(1)))
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    return checked


def test_the_gates_history_checks_the_recent_days_only(history, monkeypatch: pytest.MonkeyPatch) -> None:
    paths, today = history
    catalog = Catalog(paths.embeddings_offline_dir)
    published = [
        FIRST + timedelta(days=offset)
        for offset in range(EARLIER_DAYS)
        if FIRST + timedelta(days=offset) not in (NO_MANIFEST, OLD_GAP)
    ]
    expected = [
        snapshot_dir(paths.snapshots_dir, FAMILY, VERSION, day) for day in published[-HISTORY_DAYS:] if day != NO_SOURCE
    ]
    checked = _checked_days(monkeypatch, catalog.root)

    sources = _recent_sources(paths, catalog, read_manifest(today), HISTORY_DAYS)

    # The newest HISTORY_DAYS published days, the day without manifest skipped and the one without a
    # source left out, as when every day folder was listed and checked.
    assert sources == expected
    # Looked into: those days and the one without manifest between them, nothing older.
    assert sorted(checked) == sorted([*published[-HISTORY_DAYS:], NO_MANIFEST])


def test_bounded_listing_matches_the_full_one(history, monkeypatch: pytest.MonkeyPatch) -> None:
    paths, _ = history
    catalog = Catalog(paths.embeddings_offline_dir)
    checked = _checked_days(monkeypatch, catalog.root)

    every = _published_days(catalog, FAMILY, VERSION)

    # The positive control: the full listing checks every day folder, so the count above sees the checks.
    assert len(checked) == EARLIER_DAYS and len(every) == EARLIER_DAYS - 2
    assert NO_MANIFEST not in every and OLD_GAP not in every and every == sorted(every)
    for before in (DAY, NO_MANIFEST, NO_MANIFEST + timedelta(days=1), OLD_GAP + timedelta(days=1), FIRST):
        for newest in (1, HISTORY_DAYS, 30):
            assert (
                _published_days(catalog, FAMILY, VERSION, before=before, newest=newest)
                == ([d for d in every if d < before][-newest:])
            )
    assert _published_days(catalog, FAMILY, VERSION, before=DAY, newest=0) == []
    assert _published_days(catalog, FAMILY, "v9") == []  # no folder for the version yet


def test_a_published_folder_that_names_no_day_is_refused_by_name(tmp_path: Path) -> None:
    catalog = Catalog(PlatformPaths(tmp_path).embeddings_offline_dir)
    version_dir = catalog.root / FAMILY / VERSION
    (version_dir / "date=someday").mkdir(parents=True)  # no manifest: a leftover, not a published day
    assert _published_days(catalog, FAMILY, VERSION) == []
    (version_dir / "date=someday" / MANIFEST_FILE).write_text("{}")
    with pytest.raises(ValueError, match=r"date=someday: a published day folder must be named date=YYYY-MM-DD"):
        _published_days(catalog, FAMILY, VERSION)
