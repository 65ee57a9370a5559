"""The snapshot gate judges a day against its version's recent history, not the day before alone (issue 11).

Real logs vary a lot from day to day (30 to 3,500 events a day): a quiet day followed by a normal
one is growth against the quiet day, yet ordinary against the week. Coverage is judged against the
last ``history_days`` published days' row counts, the per-dimension mean and std against those days
pooled; the per-entity cosine and overlap still compare with the day before.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from derm.validation.gate import GateThresholds, recent_snapshots, validate_snapshot
from derm.validation.suites import coverage_bounds
from tests.test_validation import DAY, NOW, next_day, unit_vectors, write_snapshot

COVERAGE = ("expect_table_row_count_to_be_between", None)
RETENTION = ("expect_column_sum_to_be_between", "in_previous_day")


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("validation-history")


def _week(root: Path, counts: list[int], seed: int = 0) -> tuple[list[Path], np.ndarray]:
    """One snapshot per day ending the day before DAY; day i has the first counts[i] of one population.

    Returns the folders and the population as it stands on the last day (every entity, moved daily).
    """
    rng = np.random.default_rng(seed)
    population = unit_vectors(rng, n=max(counts))
    folders = []
    for offset, count in enumerate(counts):
        day = DAY - timedelta(days=len(counts) - offset)
        population = next_day(population, seed=offset)
        folders.append(write_snapshot(root, day, population[:count]))
    return folders, population


def _failed(report) -> set[tuple[str, str | None]]:
    return {(f.expectation, f.column) for f in report.failures}


def test_coverage_bounds_span_the_recent_days() -> None:
    defaults = GateThresholds.load().snapshot
    bounded = replace(defaults, coverage_change_max=0.5)
    # 0.8 x the fewest rows .. 1.5 x the most rows, each side widened to 50 entities; no upper bound by default.
    assert coverage_bounds([1_000, 400, 900], bounded) == (320, 1_500)
    assert coverage_bounds([1_000], bounded) == coverage_bounds(1_000, bounded) == (800, 1_500)
    assert coverage_bounds([1_000, 400, 900], defaults) == (320, None)


def test_a_quiet_day_passes_when_the_week_had_one(tmp_path: Path, docs_dir: Path) -> None:
    # A quiet day of 300 entities after a week whose first day was as quiet: against the day before
    # alone (1,000) it is a collapse, against the week it is ordinary. Its entities are the day
    # before's first 300 ones, so that only the coverage is at stake (the retention is checked apart).
    week, population = _week(tmp_path, [300, 1_000, 1_000, 990, 1_000, 1_000, 1_000])
    today = write_snapshot(tmp_path, DAY, next_day(population[:300], seed=99))
    relaxed = GateThresholds.load()
    relaxed = replace(relaxed, snapshot=replace(relaxed.snapshot, min_fraction_of_previous_retained=0.0))

    against_week = validate_snapshot(today, docs_dir=docs_dir, now=NOW, thresholds=relaxed)
    against_day_before = validate_snapshot(today, history_dirs=week[-1:], docs_dir=docs_dir, now=NOW,
                                           thresholds=relaxed)  # fmt: skip

    assert against_week.success, against_week.failures
    assert _failed(against_day_before) == {COVERAGE}, against_day_before.failures


def test_growth_keeps_yesterdays_entities_and_passes_remapping_does_not(tmp_path: Path, docs_dir: Path) -> None:
    # A young, bursty log: 61 users, then 168 (the conformance log's day 4); every old one kept.
    _, population = _week(tmp_path, [61, 61, 61])
    grown = np.concatenate([next_day(population[:61], seed=5), unit_vectors(np.random.default_rng(6), n=107)])
    assert validate_snapshot(write_snapshot(tmp_path, DAY, grown), docs_dir=docs_dir, now=NOW).success
    remapped = write_snapshot(tmp_path, DAY, grown, ids=list(range(10_000, 10_000 + len(grown))))
    assert RETENTION in _failed(validate_snapshot(remapped, docs_dir=docs_dir, now=NOW))


def test_a_collapse_against_the_whole_week_is_refused(tmp_path: Path, docs_dir: Path) -> None:
    _, population = _week(tmp_path, [1_000] * 7)
    today = write_snapshot(tmp_path, DAY, next_day(population[:500], seed=99))

    report = validate_snapshot(today, docs_dir=docs_dir, now=NOW)

    assert _failed(report) == {COVERAGE}, report.failures
    failure = next(f for f in report.failures if f.expectation == COVERAGE[0])
    assert "the 7 earlier days" in failure.description and "1000 rows" in failure.description


def test_history_is_the_last_history_days_of_the_same_version(tmp_path: Path) -> None:
    folders, _ = _week(tmp_path, [60] * 10)
    today = write_snapshot(tmp_path, DAY, unit_vectors(np.random.default_rng(3), n=60))
    assert recent_snapshots(today, 7) == folders[-7:]
    assert recent_snapshots(today, 0) == []
    assert recent_snapshots(folders[0], 7) == []


def test_derm_docs_builds_the_index_on_demand(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from derm.cli.validation import docs

    docs_root = tmp_path / "validation"
    empty = CliRunner().invoke(docs, ["--docs-dir", str(docs_root)])
    assert empty.exit_code == 1 and "nothing was validated yet" in empty.output

    folders, _ = _week(tmp_path / "snapshots", [60, 60])
    for folder in folders:
        assert validate_snapshot(folder, docs_dir=docs_root, now=NOW).success
    index = docs_root / "gx/uncommitted/data_docs/local_site/index.html"
    assert not index.exists()  # a validation renders its own page only

    result = CliRunner().invoke(docs, ["--docs-dir", str(docs_root)])

    assert result.exit_code == 0, result.output
    assert f"Data Docs: {index.resolve()}" in result.output
    listed = index.read_text()
    assert all(f"ctr_user_v1_{(DAY - timedelta(days=d)).isoformat()}" in listed for d in (1, 2))


def test_publish_history_benchmark_runs_and_keeps_the_retention() -> None:
    from bench.publish_history import run
    from derm.validation.gate import VALIDATION_RESULTS_KEPT_PER_SUITE

    result = run(short_history=2, long_history=40, publishes=2, entities=50)

    assert result["validation_results_before"]["long"] == 40
    # The first publish pruned the row checks' suite to the retention; the dimension checks add a suite of their own.
    assert result["validation_results_after"]["long"] <= 2 * VALIDATION_RESULTS_KEPT_PER_SUITE
    assert result["long_publish_s"] > 0 and result["long_over_short"] > 0


def test_new_entities_elsewhere_in_the_space_do_not_count_as_drift(tmp_path: Path, docs_dir: Path) -> None:
    # The conformance log's day 4: 61 users, then 107 new ones whose vectors sit elsewhere. Over the whole
    # population the per-dimension mean jumps; over the 61 entities of both days nothing moved.
    rng = np.random.default_rng(7)
    old = unit_vectors(rng, n=61) * 0.2 + np.eye(8, dtype=np.float32)[0]
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    for back in (2, 1):
        write_snapshot(tmp_path, DAY - timedelta(days=back), old)
    new = unit_vectors(rng, n=107) * 0.2 + np.eye(8, dtype=np.float32)[1]
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    today = write_snapshot(tmp_path, DAY, np.concatenate([old, new]))

    report = validate_snapshot(today, docs_dir=docs_dir, now=NOW)

    assert report.success, report.failures
