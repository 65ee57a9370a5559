"""Validation gate: every class of bad snapshot or training set is rejected, good data passes."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from derm.cli.validation import validate
from derm.core.snapshot import (
    MANIFEST_FILE,
    SnapshotManifest,
    file_sha256,
    snapshot_dir,
    snapshot_schema,
)
from derm.validation.gate import (
    GateThresholds,
    ValidationFailed,
    previous_snapshot,
    validate_snapshot,
    validate_training_set,
)

FAMILY = "ctr_user"
VERSION = "v1"
DIM = 8
ENTITIES = 50
DAY = date(2026, 1, 5)
NOW = datetime(2026, 1, 7, tzinfo=UTC)


@pytest.fixture(scope="session")
def docs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One GE project (and context) shared by every test of the session."""
    return tmp_path_factory.mktemp("validation")


def unit_vectors(rng: np.random.Generator, n: int = ENTITIES, dim: int = DIM) -> np.ndarray:
    vectors = rng.normal(size=(n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def availability(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1, hours=2)


def write_snapshot(
    root: Path,
    day: date,
    vectors: list | np.ndarray,
    *,
    ids: list[int] | None = None,
    timestamps: list[datetime] | None = None,
    table: pa.Table | None = None,
    **manifest_overrides: object,
) -> Path:
    """Write a snapshot in the derm.core.snapshot layout; ``table`` bypasses the schema for corrupt files."""
    folder = snapshot_dir(root, FAMILY, VERSION, day)
    folder.mkdir(parents=True, exist_ok=True)
    rows = len(vectors)
    stamp = availability(day)
    if table is None:
        table = pa.table(
            {
                "user_id": ids if ids is not None else list(range(rows)),
                "event_timestamp": timestamps or [stamp] * rows,
                "embedding": [[None if x is None else float(x) for x in v] for v in vectors],
                "model_version": [VERSION] * rows,
            },
            schema=snapshot_schema(FAMILY),
        )
    pq.write_table(table, folder / "embeddings.parquet")
    manifest = SnapshotManifest(
        family=FAMILY,
        model_version=VERSION,
        config_hash="c" * 64,
        weights_sha256="w" * 64,
        dim=DIM,
        snapshot_date=day,
        event_timestamp=stamp,
        data_window_start=stamp - timedelta(days=2, hours=2),
        data_window_end=stamp - timedelta(hours=2),
        row_count=table.num_rows,
        aggregation="ema",
        ema_weight=0.8,
        created_at=stamp,
        data_sha256=file_sha256(folder / "embeddings.parquet"),
    )
    (folder / MANIFEST_FILE).write_text(replace(manifest, **manifest_overrides).to_json())
    return folder


@pytest.fixture
def history(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """Snapshots root holding the previous day's snapshot; returns it and its vectors."""
    previous = unit_vectors(np.random.default_rng(0))
    write_snapshot(tmp_path, DAY - timedelta(days=1), previous)
    return tmp_path, previous


def next_day(previous: np.ndarray, seed: int = 1) -> np.ndarray:
    """A plausible refresh: each entity moves a little (EMA-smoothed)."""
    moved = previous + 0.05 * np.random.default_rng(seed).normal(size=previous.shape)
    return (moved / np.linalg.norm(moved, axis=1, keepdims=True)).astype(np.float32)


def test_good_snapshot_passes_and_writes_data_docs(history: tuple[Path, np.ndarray], docs_dir: Path) -> None:
    root, previous = history
    folder = write_snapshot(root, DAY, next_day(previous))

    report = validate_snapshot(folder, docs_dir=docs_dir, now=NOW)

    assert report.success, report.failures
    report.raise_for_failure()
    assert report.summary.startswith("ctr_user v1 2026-01-05: ")
    passed, total = report.summary.rsplit(": ", 1)[1].split(" ")[0].split("/")
    assert passed == total and int(total) >= 12  # drift checks ran against the previous day
    site = docs_dir.resolve() / "gx/uncommitted/data_docs/local_site"
    # The page of this very result (its run name is the snapshot's label), not the whole site.
    assert report.data_docs_page.is_relative_to(site / "validations")
    assert "ctr_user_v1_2026-01-05" in report.data_docs_page.parts
    assert report.data_docs_page.suffix == ".html" and report.data_docs_page.is_file()


def test_first_snapshot_of_a_version_passes_without_drift_checks(tmp_path: Path, docs_dir: Path) -> None:
    folder = write_snapshot(tmp_path, DAY, unit_vectors(np.random.default_rng(3)))
    report = validate_snapshot(folder, docs_dir=docs_dir, now=NOW)
    assert report.success, report.failures
    (note,) = [note for note in report.notes if "drift checks skipped" in note]
    assert "no earlier snapshot" in note and "skipped coverage change" in note


def test_first_snapshot_still_refuses_broken_vectors(tmp_path: Path, docs_dir: Path) -> None:
    vectors = _corrupt_rows(unit_vectors(np.random.default_rng(3)), {2: [0.0] * DIM})
    report = validate_snapshot(write_snapshot(tmp_path, DAY, vectors), docs_dir=docs_dir, now=NOW)
    assert not report.success
    assert [2] in [f.entity_ids for f in report.failures if f.column == "has_nonzero_value"]


def _corrupt_rows(vectors: np.ndarray, rows: dict[int, list[float]]) -> list:
    corrupted: list = [list(v) for v in vectors]
    for index, value in rows.items():
        corrupted[index] = value
    return corrupted


def _unit(dim: int) -> list[float]:
    return [1.0] + [0.0] * (dim - 1)


# Each case: how to write the bad snapshot, the expectation that must fail, the entity ids it must name.
BAD_SNAPSHOTS = {
    "wrong_dim": (
        lambda root, v: write_snapshot(root, DAY, _corrupt_rows(v, {7: _unit(DIM - 1)})),
        "embedding_dim",
        [7],
    ),
    "nan": (
        lambda root, v: write_snapshot(root, DAY, _corrupt_rows(v, {3: [float("nan"), *_unit(DIM)[1:]]})),
        "all_values_finite",
        [3],
    ),
    "inf": (
        lambda root, v: write_snapshot(root, DAY, _corrupt_rows(v, {4: [float("inf"), *_unit(DIM)[1:]]})),
        "all_values_finite",
        [4],
    ),
    "zero_vector": (
        lambda root, v: write_snapshot(root, DAY, _corrupt_rows(v, {5: [0.0] * DIM})),
        "has_nonzero_value",
        [5],
    ),
    "null_element": (
        lambda root, v: write_snapshot(root, DAY, _corrupt_rows(v, {6: [None, *_unit(DIM - 1)]})),
        "no_null_values",
        [6],
    ),
    "duplicate_keys": (lambda root, v: write_snapshot(root, DAY, v, ids=[*range(ENTITIES - 1), 9]), "user_id", [9]),
    "timestamp_not_manifest": (
        lambda root, v: write_snapshot(
            root, DAY, v, timestamps=[availability(DAY)] * (ENTITIES - 1) + [availability(DAY) + timedelta(hours=1)]
        ),
        "event_timestamp",
        [ENTITIES - 1],
    ),
    "future_timestamps": (
        lambda root, v: write_snapshot(
            root, DAY, v, timestamps=[availability(DAY)] * (ENTITIES - 1) + [NOW + timedelta(days=30)]
        ),
        "event_timestamp",
        [ENTITIES - 1],
    ),
    "sudden_drift": (
        lambda root, v: write_snapshot(root, DAY, unit_vectors(np.random.default_rng(42))),
        "cosine_to_previous",
        None,  # any five entities of the re-randomised space
    ),
    "manifest_row_count": (lambda root, v: write_snapshot(root, DAY, v, row_count=ENTITIES + 1), None, []),
}


@pytest.mark.parametrize("case", sorted(BAD_SNAPSHOTS))
def test_bad_snapshot_is_rejected_with_offending_entities(
    case: str, history: tuple[Path, np.ndarray], docs_dir: Path
) -> None:
    root, previous = history
    write, column, entity_ids = BAD_SNAPSHOTS[case]
    folder = write(root, next_day(previous))

    report = validate_snapshot(folder, docs_dir=docs_dir, now=NOW)

    assert not report.success
    named = [f.entity_ids for f in report.failures if f.column == column]
    assert named, report.failures
    if entity_ids is None:
        assert any(len(ids) == 5 for ids in named)
    else:
        assert entity_ids in named
    with pytest.raises(ValidationFailed) as raised:
        report.raise_for_failure()
    assert str(folder) in str(raised.value)
    assert isinstance(raised.value, ValueError)


def _table(columns: dict[str, pa.Array]) -> pa.Table:
    return pa.table(columns)


def _structural_cases(vectors: np.ndarray) -> dict[str, tuple[pa.Table, str | None]]:
    n = len(vectors)
    good = {
        "user_id": pa.array(range(n), pa.int64()),
        "event_timestamp": pa.array([availability(DAY)] * n, pa.timestamp("us", tz="UTC")),
        "embedding": pa.array([list(map(float, v)) for v in vectors], pa.list_(pa.float32())),
        "model_version": pa.array([VERSION] * n),
    }
    return {
        "missing_column": (_table({k: v for k, v in good.items() if k != "model_version"}), "model_version"),
        "wrong_dtype": (
            _table({**good, "embedding": pa.array([list(map(float, v)) for v in vectors], pa.list_(pa.float64()))}),
            "embedding",
        ),
        "empty": (_table({k: v.slice(0, 0) for k, v in good.items()}), None),
    }


@pytest.mark.parametrize("case", ["missing_column", "wrong_dtype", "empty"])
def test_unreadable_snapshot_is_a_failure_not_an_exception(
    case: str, history: tuple[Path, np.ndarray], docs_dir: Path
) -> None:
    root, previous = history
    table, column = _structural_cases(next_day(previous))[case]
    folder = write_snapshot(root, DAY, [], table=table)

    report = validate_snapshot(folder, docs_dir=docs_dir, now=NOW)

    assert not report.success
    assert report.failures[0].expectation == "snapshot_is_readable"
    assert "embeddings.parquet" in report.failures[0].description
    if column:
        assert report.failures[0].column == column
        assert column in str(report.failures[0])


def test_missing_manifest_is_a_failure(tmp_path: Path, docs_dir: Path) -> None:
    folder = snapshot_dir(tmp_path, FAMILY, VERSION, DAY)
    folder.mkdir(parents=True)
    report = validate_snapshot(folder, docs_dir=docs_dir, now=NOW)
    assert not report.success and "manifest" in report.failures[0].description


def test_previous_snapshot_is_latest_earlier_day_of_same_version(tmp_path: Path) -> None:
    vectors = unit_vectors(np.random.default_rng(0), n=3)
    for day in (date(2026, 1, 1), date(2026, 1, 3), date(2026, 1, 4), date(2026, 1, 9)):
        write_snapshot(tmp_path, day, vectors)
    other_version = snapshot_dir(tmp_path, FAMILY, "v2", date(2026, 1, 4))
    other_version.mkdir(parents=True)
    (other_version / MANIFEST_FILE).write_text("{}")

    assert previous_snapshot(snapshot_dir(tmp_path, FAMILY, VERSION, date(2026, 1, 4))) == snapshot_dir(
        tmp_path, FAMILY, VERSION, date(2026, 1, 3)
    )
    assert previous_snapshot(snapshot_dir(tmp_path, FAMILY, VERSION, date(2026, 1, 1))) is None
    assert previous_snapshot(snapshot_dir(tmp_path, FAMILY, "v2", date(2026, 1, 4))) is None


def test_thresholds_file_is_loaded_and_overridable(tmp_path: Path) -> None:
    defaults = GateThresholds.load()
    assert (defaults.snapshot.norm_min, defaults.snapshot.norm_max) == (0.5, 1.001)
    override = tmp_path / "thresholds.yaml"
    override.write_text("snapshot:\n  norm_min: 0.7\n")
    assert GateThresholds.load(override).snapshot.norm_min == 0.7
    override.write_text("snapshot:\n  norm_minimum: 0.5\n")
    with pytest.raises(ValueError, match="norm_minimum"):
        GateThresholds.load(override)


def test_cli_prints_failures_docs_path_and_exits_non_zero(
    history: tuple[Path, np.ndarray], docs_dir: Path, tmp_path: Path
) -> None:
    root, previous = history
    folder = write_snapshot(root, DAY, _corrupt_rows(next_day(previous), {11: [0.0] * DIM}))

    result = CliRunner().invoke(validate, [str(folder), "--docs-dir", str(docs_dir)])

    assert result.exit_code == 1, result.output
    assert "has_nonzero_value" in result.output and "11" in result.output
    assert "Data Docs: " in result.output and "embedding_snapshot_rows.html" in result.output
    assert "ctr_user v1 2026-01-05:" in result.output


# --------------------------------------------------------------------------- training sets

WINDOW = (datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 8, tzinfo=UTC))


def training_set(rng: np.random.Generator, n: int = 200) -> pd.DataFrame:
    embeddings = [list(v) for v in unit_vectors(rng, n)]
    return pd.DataFrame(
        {
            "user_id": np.arange(n, dtype=np.int64),
            "pin_id": np.arange(n, dtype=np.int64) + 1000,
            "event_timestamp": pd.date_range(WINDOW[0], periods=n, freq="30min", tz="UTC"),
            "clicked": (rng.random(n) < 0.1).astype(np.int64),
            "ctr_user_embedding": [None if i % 20 == 0 else e for i, e in enumerate(embeddings)],
        }
    )


def _validate_training(df: pd.DataFrame, docs_dir: Path):
    return validate_training_set(
        df,
        label="clicked",
        embedding_columns=["ctr_user_embedding"],
        required_columns=["user_id", "pin_id", "event_timestamp", "clicked"],
        window=WINDOW,
        docs_dir=docs_dir,
    )


def test_good_training_set_passes(docs_dir: Path) -> None:
    report = _validate_training(training_set(np.random.default_rng(0)), docs_dir)
    assert report.success, report.failures
    assert report.data_docs_page is not None and report.data_docs_page.is_file()


def _no_positives(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(clicked=0)


def _mostly_missing(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(ctr_user_embedding=[None] * len(df))


def _null_entity(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(pin_id=df["pin_id"].astype("Int64").mask(df.index == 17))


def _outside_window(df: pd.DataFrame) -> pd.DataFrame:
    stamps = df["event_timestamp"].copy()
    stamps.iloc[5] = WINDOW[1] + timedelta(days=3)
    return df.assign(event_timestamp=stamps)


@pytest.mark.parametrize(
    ("corrupt", "column", "offending"),
    [
        (_no_positives, "clicked", None),
        (_mostly_missing, "ctr_user_embedding", "user_id=0, pin_id=1000"),
        (_null_entity, "pin_id", None),
        (_outside_window, "event_timestamp", "user_id=5, pin_id=1005"),
    ],
)
def test_bad_training_set_is_rejected(corrupt, column: str, offending: str | None, docs_dir: Path) -> None:
    report = _validate_training(corrupt(training_set(np.random.default_rng(0))), docs_dir)
    assert not report.success
    failure = next(f for f in report.failures if f.column == column)
    if offending:
        assert failure.entity_ids[0] == offending


def test_training_set_missing_column_is_a_failure(docs_dir: Path) -> None:
    report = _validate_training(training_set(np.random.default_rng(0)).drop(columns=["pin_id"]), docs_dir)
    assert not report.success and report.failures[0].column == "pin_id"


def test_training_set_accepts_bool_labels_naive_utc_timestamps_and_nan_cells(docs_dir: Path) -> None:
    df = training_set(np.random.default_rng(1))
    df["clicked"] = df["clicked"].astype(bool)
    df["event_timestamp"] = df["event_timestamp"].dt.tz_localize(None)
    df.loc[3, "ctr_user_embedding"] = np.nan
    report = _validate_training(df, docs_dir)
    assert report.success, report.failures
    assert report.summary.startswith("training set (200 rows")


def test_remapped_entity_ids_are_rejected(history: tuple[Path, np.ndarray], docs_dir: Path) -> None:
    root, previous = history
    folder = write_snapshot(root, DAY, next_day(previous), ids=list(range(1000, 1000 + ENTITIES)))
    report = validate_snapshot(folder, docs_dir=docs_dir, now=NOW)
    assert not report.success
    assert ("expect_column_sum_to_be_between", "in_previous_day") in _failed(report), report.failures


def test_right_vectors_on_the_wrong_entities_are_rejected(tmp_path: Path, docs_dir: Path) -> None:
    """A family whose vectors are alike (a shared direction, as popularity gives the Pin vectors): written on
    the wrong entities, every distribution and cosine check still passes; only the closer-to-own-previous
    check sees it. The same vectors on the right entities pass."""
    rng = np.random.default_rng(3)
    shared = np.ones(DIM) / np.sqrt(DIM)
    alike = shared + 0.12 * rng.normal(size=(ENTITIES, DIM))  # per-entity part ~1/3 of the shared one
    previous = (alike / np.linalg.norm(alike, axis=1, keepdims=True)).astype(np.float32)
    moved = previous + 0.01 * rng.normal(size=previous.shape)
    today = (moved / np.linalg.norm(moved, axis=1, keepdims=True)).astype(np.float32)
    write_snapshot(tmp_path, DAY - timedelta(days=1), previous)

    right = validate_snapshot(write_snapshot(tmp_path, DAY, today), docs_dir=docs_dir, now=NOW)
    assert right.success, right.failures

    wrong = validate_snapshot(
        write_snapshot(tmp_path, DAY, today[np.roll(np.arange(ENTITIES), 7)]), docs_dir=docs_dir, now=NOW
    )
    assert _failed(wrong) == {("expect_column_mean_to_be_between", "closer_to_own_previous")}, wrong.failures


# --------------------------------------------------------------------------- issue 11: real-log shapes
# Each distribution check tolerates outliers and small populations; each change comes with a minimal
# input that fails exactly that expectation beside a positive control.


def _failed(report) -> set[tuple[str, str | None]]:
    return {(f.expectation, f.column) for f in report.failures}


def _populations(tmp_path: Path, previous_n: int, current_n: int, seed: int = 0) -> Path:
    """Previous day with ``previous_n`` entities; current day: the same entities moved a little plus new ones."""
    rng = np.random.default_rng(seed)
    previous = unit_vectors(rng, n=previous_n)
    write_snapshot(tmp_path, DAY - timedelta(days=1), previous)
    kept = next_day(previous)
    new = unit_vectors(rng, n=current_n - previous_n)
    return write_snapshot(tmp_path, DAY, np.concatenate([kept, new]))


def test_real_log_day_two_small_population_growth_passes(tmp_path: Path, docs_dir: Path) -> None:
    # ctr_user v1, second day of the log: 11 -> 20 users (+82% against +50%) was refused.
    report = validate_snapshot(_populations(tmp_path, 11, 20), docs_dir=docs_dir, now=NOW)
    assert report.success, report.failures
    assert any("fewer than min_population_for_relative_checks=50" in note for note in report.notes)


def test_coverage_change_beyond_the_absolute_floor_fails_alone(tmp_path: Path, docs_dir: Path) -> None:
    thresholds = GateThresholds.load()
    bounded = replace(thresholds, snapshot=replace(thresholds.snapshot, coverage_change_max=0.5))
    report = validate_snapshot(_populations(tmp_path, 100, 200), docs_dir=docs_dir, now=NOW, thresholds=bounded)
    assert _failed(report) == {("expect_table_row_count_to_be_between", None)}, report.failures
    assert "at most 50 entities" in report.failures[0].description


def test_coverage_change_within_the_absolute_floor_passes(tmp_path: Path, docs_dir: Path) -> None:
    report = validate_snapshot(_populations(tmp_path, 100, 150), docs_dir=docs_dir, now=NOW)
    assert report.success, report.failures


def _scaled(vectors: np.ndarray, rows: range | list[int], norm: float) -> np.ndarray:
    scaled = vectors.copy()
    scaled[list(rows)] *= norm
    return scaled


def test_real_log_day_124_one_low_norm_row_among_509_passes(tmp_path: Path, docs_dir: Path) -> None:
    previous = unit_vectors(np.random.default_rng(5), n=509)
    write_snapshot(tmp_path, DAY - timedelta(days=1), previous)
    folder = write_snapshot(tmp_path, DAY, _scaled(next_day(previous), [123], 0.494))
    report = validate_snapshot(folder, docs_dir=docs_dir, now=NOW)
    assert report.success, report.failures


def test_too_many_rows_outside_norm_bounds_fail_alone(tmp_path: Path, docs_dir: Path) -> None:
    previous = unit_vectors(np.random.default_rng(5), n=200)
    write_snapshot(tmp_path, DAY - timedelta(days=1), previous)
    folder = write_snapshot(tmp_path, DAY, _scaled(next_day(previous), range(4), 0.3))  # 2% > 1%
    report = validate_snapshot(folder, docs_dir=docs_dir, now=NOW)
    assert _failed(report) == {("expect_column_values_to_be_between", "l2_norm")}, report.failures
    assert report.failures[0].entity_ids == [0, 1, 2, 3]


def test_unnormalised_export_fails_norm_bounds(history: tuple[Path, np.ndarray], docs_dir: Path) -> None:
    root, previous = history
    folder = write_snapshot(root, DAY, _scaled(next_day(previous), range(ENTITIES), 3.0))
    report = validate_snapshot(folder, docs_dir=docs_dir, now=NOW)
    assert ("expect_column_values_to_be_between", "l2_norm") in _failed(report)


BROKEN_ALONE = {
    # case: corrupt the 200-entity next day -> (expectation, column, words of its description, offending ids)
    "null_element": (
        lambda v: {"vectors": _corrupt_rows(v, {6: [None, *_unit(DIM - 1)]})},
        ("expect_column_values_to_be_in_set", "no_null_values"),
        "NULL element",
        [6],
    ),
    "zero_vector": (
        lambda v: {"vectors": _corrupt_rows(v, {5: [0.0] * DIM})},
        ("expect_column_values_to_be_in_set", "has_nonzero_value"),
        "all zeros",
        [5],
    ),
    "duplicate_key": (
        lambda v: {"vectors": v, "ids": [*range(199), 9]},
        ("expect_column_values_to_be_unique", "user_id"),
        "duplicate keys",
        [9],
    ),
    "timestamp_not_manifest": (
        lambda v: {"vectors": v, "timestamps": [availability(DAY)] * 199 + [availability(DAY) + timedelta(hours=1)]},
        ("expect_column_values_to_be_between", "event_timestamp"),
        "equals the manifest's event_timestamp",
        [199],
    ),
}


@pytest.mark.parametrize("case", [None, *sorted(BROKEN_ALONE)])
def test_each_broken_vector_check_fails_alone(case: str | None, tmp_path: Path, docs_dir: Path) -> None:
    previous = unit_vectors(np.random.default_rng(7), n=200)
    write_snapshot(tmp_path, DAY - timedelta(days=1), previous)
    if case is None:  # positive control: the same day, unbroken
        report = validate_snapshot(write_snapshot(tmp_path, DAY, next_day(previous)), docs_dir=docs_dir, now=NOW)
        assert report.success, report.failures
        return
    corrupt, failed, words, ids = BROKEN_ALONE[case]
    arguments = corrupt(next_day(previous))
    folder = write_snapshot(tmp_path, DAY, arguments.pop("vectors"), **arguments)
    report = validate_snapshot(folder, docs_dir=docs_dir, now=NOW)
    assert _failed(report) == {failed}, report.failures
    (failure,) = report.failures
    assert words in failure.description and failure.entity_ids == ids


def test_previous_snapshot_with_a_null_element_is_excluded_from_dimension_stats(tmp_path: Path, docs_dir: Path) -> None:
    previous = unit_vectors(np.random.default_rng(8), n=200)
    write_snapshot(tmp_path, DAY - timedelta(days=1), _corrupt_rows(previous, {0: [None] * DIM}))
    report = validate_snapshot(write_snapshot(tmp_path, DAY, next_day(previous)), docs_dir=docs_dir, now=NOW)
    assert report.success, report.failures


# --------------------------------------------------------------------------- issue 11: training sets


def cold_start_training_set(rng: np.random.Generator, n: int = 1000, click_rate: float = 0.55) -> pd.DataFrame:
    """A CTR set shaped like the real log: many one-day users, a few returning ones, click rate 0.55.

    A row has the user embedding exactly when its user appeared at least 48 h earlier in the set
    (point in time: the first day's snapshot is published after that day).
    """
    start = pd.Timestamp(WINDOW[0])
    stamps = start + pd.to_timedelta(np.sort(rng.uniform(0, 7 * 24, size=n)), unit="h")
    returning = rng.random(n) < 0.35
    users = np.where(returning, rng.integers(0, 30, size=n), 1000 + np.arange(n))
    frame = pd.DataFrame({"user_id": users.astype(np.int64), "event_timestamp": stamps})
    first_seen = frame.groupby("user_id")["event_timestamp"].transform("min")
    warm = frame["event_timestamp"] >= first_seen + pd.Timedelta(hours=48)
    vectors = unit_vectors(rng, n)
    return frame.assign(
        pin_id=np.arange(n, dtype=np.int64) + 5000,
        clicked=(rng.random(n) < click_rate).astype(np.int64),
        ctr_user_embedding=[list(v) if w else None for v, w in zip(vectors, warm, strict=True)],
    )


def _validate_cold_start(df: pd.DataFrame, docs_dir: Path, expected_label_rate: float | None = None):
    return validate_training_set(
        df,
        label="clicked",
        embedding_columns=["ctr_user_embedding"],
        required_columns=["user_id", "pin_id", "event_timestamp", "clicked"],
        window=WINDOW,
        docs_dir=docs_dir,
        entity_columns={"ctr_user_embedding": "user_id"},
        expected_label_rate=expected_label_rate,
    )


def test_real_log_ctr_training_set_with_cold_start_rows_passes(docs_dir: Path) -> None:
    df = cold_start_training_set(np.random.default_rng(11))
    assert 0.7 < df["ctr_user_embedding"].isna().mean() < 0.85 and 0.5 < df["clicked"].mean() < 0.6
    report = _validate_cold_start(df, docs_dir, expected_label_rate=float(df["clicked"].mean()))
    assert report.success, report.failures
    assert any("cold start" in note and "judged on" in note for note in report.notes), report.notes


def test_same_training_set_judged_on_every_row_fails(docs_dir: Path) -> None:
    # Without the entity (old behaviour), the cold-start rows count: this is what refused the real set.
    report = _validate_training(cold_start_training_set(np.random.default_rng(11)), docs_dir)
    assert _failed(report) == {("expect_column_values_to_not_be_null", "ctr_user_embedding")}, report.failures


def test_missing_embeddings_of_warm_rows_fail_alone(docs_dir: Path) -> None:
    df = cold_start_training_set(np.random.default_rng(11))
    warm = df["ctr_user_embedding"].notna().to_numpy().nonzero()[0]
    df.loc[warm[::3], "ctr_user_embedding"] = None  # a third of the warm rows lose their embedding
    report = _validate_cold_start(df, docs_dir)
    assert _failed(report) == {("expect_column_values_to_not_be_null", "ctr_user_embedding")}, report.failures
    assert "cold-start rows" in report.failures[0].description


def test_all_embeddings_missing_fails_with_cold_start_rule(docs_dir: Path) -> None:
    df = cold_start_training_set(np.random.default_rng(11)).assign(ctr_user_embedding=None)
    report = _validate_cold_start(df, docs_dir)
    assert _failed(report) == {("expect_column_values_to_not_be_null", "ctr_user_embedding")}, report.failures


def test_label_rate_far_from_the_event_log_fails_alone(docs_dir: Path) -> None:
    df = cold_start_training_set(np.random.default_rng(11))
    report = _validate_cold_start(df, docs_dir, expected_label_rate=float(df["clicked"].mean()) - 0.1)
    assert _failed(report) == {("expect_column_mean_to_be_between", "clicked")}, report.failures
    assert "event log" in report.failures[0].description


def test_label_rate_sanity_bounds_refuse_a_single_class(docs_dir: Path) -> None:
    df = cold_start_training_set(np.random.default_rng(11)).assign(clicked=1)
    report = _validate_cold_start(df, docs_dir)
    assert _failed(report) == {("expect_column_mean_to_be_between", "clicked")}, report.failures
    assert "both classes" in report.failures[0].description


def test_new_threshold_keys_are_loaded(tmp_path: Path) -> None:
    override = tmp_path / "thresholds.yaml"
    override.write_text(
        "snapshot:\n  coverage_change_min_entities: 5\n  max_fraction_outside_norm_bounds: 0.0\n"
        "training_set:\n  cold_start_hours: 24\n  max_label_rate_difference: 0.02\n"
    )
    loaded = GateThresholds.load(override)
    assert loaded.snapshot.coverage_change_min_entities == 5 and loaded.training_set.cold_start_hours == 24
    defaults = GateThresholds.load()
    assert defaults.training_set.label_rate_max == 0.9999 and defaults.snapshot.max_fraction_outside_norm_bounds == 0.01


def test_validation_results_are_pruned_to_the_retention_and_the_index_is_built_on_demand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from derm.validation import gate

    docs = tmp_path / "docs"
    monkeypatch.setattr(gate, "VALIDATION_RESULTS_KEPT_PER_SUITE", 2)
    rng = np.random.default_rng(3)
    vectors = unit_vectors(rng)
    pages = []
    for offset in range(4):
        day = DAY + timedelta(days=offset)
        folder = write_snapshot(tmp_path / "snapshots", day, vectors)
        report = validate_snapshot(folder, docs_dir=docs, now=availability(day) + timedelta(hours=1))
        assert report.success, report.failures
        pages.append(report.data_docs_page)

    site = docs / "gx/uncommitted/data_docs/local_site"
    results = docs / "gx/uncommitted/validations"
    rows_results = sorted(p.relative_to(results) for p in results.rglob("*.json") if "rows" in p.parts)
    # Four row-check runs, two kept: the newest two days, and only their pages remain.
    assert [p.parts[-3] for p in rows_results] == ["ctr_user_v1_2026-01-07", "ctr_user_v1_2026-01-08"]
    assert [page.exists() for page in pages] == [False, False, True, True]
    # No empty run folders left behind: GE walks them on every build.
    run_folders = {p.name for p in (results / "embedding_snapshot/ctr_user/v1/rows").iterdir()}
    assert run_folders == {"ctr_user_v1_2026-01-07", "ctr_user_v1_2026-01-08"}
    page_folders = {p.name for p in (site / "validations/embedding_snapshot/ctr_user/v1/rows").iterdir()}
    assert page_folders == run_folders
    assert not (site / "index.html").exists()

    index = gate.build_data_docs_index(docs)
    assert index == site.resolve() / "index.html" and "ctr_user_v1_2026-01-08" in index.read_text()
