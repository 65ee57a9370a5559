"""Every expectation of both gate suites fails on a minimal input, and the report names it.

The expectations are enumerated from the suite builders themselves (``derm.validation.suites``):
:data:`EXPECTATIONS` must match each built expectation exactly once, and every entry must be the
target of at least one case below, so an expectation added to a suite without a case here fails
:func:`test_every_expectation_of_both_suites_has_a_failing_case`.

Each case starts from a positive control (a good day after a good previous day, or a good
training set, which pass) and changes one thing; the gate's report must then hold exactly the
expected failures, named by expectation type, column and description. A few inputs cannot fail
one expectation alone (a null vector has no elements to be finite, non-null or non-zero); those
cases list every expectation they fail.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from derm.core.snapshot import MANIFEST_FILE, SnapshotManifest, file_sha256, snapshot_dir
from derm.validation import suites
from derm.validation.gate import GateReport, GateThresholds, validate_snapshot, validate_training_set

FAMILY = "ctr_user"
VERSION = "v1"
DIM = 8
ENTITIES = 200
DAY = date(2026, 1, 5)
NOW = datetime(2026, 1, 7, tzinfo=UTC)
THRESHOLDS = GateThresholds.load()


@dataclass(frozen=True)
class Expected:
    """One expectation, as the report names it: type, column, and words of its description where needed."""

    name: str
    type: str
    column: str | None
    words: str = ""  # only where type and column do not single it out

    def matches(self, type_: str, column: str | None, description: str) -> bool:
        return (type_, column) == (self.type, self.column) and self.words in description


KEY = "user_id"
EXPECTATIONS = [
    # snapshot, per row
    Expected("key_not_null", "expect_column_values_to_not_be_null", KEY),
    Expected("timestamp_not_null", "expect_column_values_to_not_be_null", "event_timestamp"),
    Expected("embedding_not_null", "expect_column_values_to_not_be_null", suites.EMBEDDING_DIM),
    Expected("dimension", "expect_column_values_to_be_in_set", suites.EMBEDDING_DIM),
    Expected("finite", "expect_column_values_to_be_in_set", suites.ALL_VALUES_FINITE),
    Expected("no_null_element", "expect_column_values_to_be_in_set", suites.NO_NULL_VALUES),
    Expected("nonzero", "expect_column_values_to_be_in_set", suites.HAS_NONZERO_VALUE),
    Expected("norm_bounds", "expect_column_values_to_be_between", suites.L2_NORM),
    Expected("unique_key", "expect_column_values_to_be_unique", KEY),
    Expected("timestamp_is_manifests", "expect_column_values_to_be_between", "event_timestamp", "equals the manifest"),
    Expected("timestamp_window", "expect_column_values_to_be_between", "event_timestamp", "data_window_end"),
    Expected("model_version", "expect_column_values_to_be_in_set", "model_version"),
    Expected("row_count", "expect_table_row_count_to_equal", None),
    # snapshot, against the recent days (coverage, overlap, per-dimension) or the day before (cosine)
    Expected("coverage_change", "expect_table_row_count_to_be_between", None),
    Expected("retention", "expect_column_sum_to_be_between", suites.IN_PREVIOUS_DAY),
    Expected("median_cosine", "expect_column_median_to_be_between", suites.COSINE_TO_PREVIOUS),
    Expected("low_cosine_fraction", "expect_column_values_to_be_between", suites.COSINE_TO_PREVIOUS),
    Expected("mean_shift", "expect_column_values_to_be_between", suites.MEAN_SHIFT),
    Expected("std_ratio", "expect_column_values_to_be_between", suites.STD_RATIO),
    Expected("own_previous", "expect_column_mean_to_be_between", suites.CLOSER_TO_OWN_PREVIOUS),
    # training set
    Expected("required_user_id", "expect_column_values_to_not_be_null", "user_id"),
    Expected("required_pin_id", "expect_column_values_to_not_be_null", "pin_id"),
    Expected("required_event_timestamp", "expect_column_values_to_not_be_null", "event_timestamp"),
    Expected("required_label", "expect_column_values_to_not_be_null", "clicked"),
    Expected("training_window", "expect_column_values_to_be_between", "event_timestamp", "requested window"),
    Expected("label_values", "expect_column_values_to_be_in_set", "clicked"),
    Expected("label_rate_bounds", "expect_column_mean_to_be_between", "clicked", "both classes"),
    Expected("label_rate_vs_log", "expect_column_mean_to_be_between", "clicked", "event log"),
    Expected("warm_embedding_missing", "expect_column_values_to_not_be_null", "ctr_user_emb", "cold-start"),
    Expected("embedding_missing", "expect_column_values_to_not_be_null", "ctr_pin_emb"),
]
BY_NAME = {e.name: e for e in EXPECTATIONS}
# required_event_timestamp and timestamp_not_null share type and column: they live in different suites.
SNAPSHOT_NAMES = {e.name for e in EXPECTATIONS[:20]}
TRAINING_NAMES = {e.name for e in EXPECTATIONS[20:]}


# --------------------------------------------------------------------------- snapshots


def availability(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1, hours=2)


def manifest_for(day: date, rows: int, **overrides: Any) -> SnapshotManifest:
    stamp = availability(day)
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
        row_count=rows,
        aggregation="ema",
        ema_weight=0.8,
        created_at=stamp,
    )
    return replace(manifest, **overrides)


# The snapshot schema with nullable fields, so that a null key, timestamp or vector can be written at all.
NULLABLE_SCHEMA = pa.schema(
    [
        pa.field(KEY, pa.int64()),
        pa.field("event_timestamp", pa.timestamp("us", tz="UTC")),
        pa.field("embedding", pa.list_(pa.float32())),
        pa.field("model_version", pa.string()),
    ]
)


def write_day(
    root: Path,
    day: date,
    vectors: list | np.ndarray,
    *,
    ids: list | None = None,
    timestamps: list | None = None,
    versions: list | None = None,
    **manifest_overrides: Any,
) -> Path:
    """A snapshot in the derm.core.snapshot layout whose manifest agrees with its data unless overridden."""
    folder = snapshot_dir(root, FAMILY, VERSION, day)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(vectors)
    manifest = manifest_for(day, n, **manifest_overrides)
    table = pa.table(
        {
            KEY: ids if ids is not None else list(range(n)),
            "event_timestamp": timestamps if timestamps is not None else [manifest.event_timestamp] * n,
            "embedding": [None if v is None else [None if x is None else float(x) for x in v] for v in vectors],
            "model_version": versions if versions is not None else [VERSION] * n,
        },
        schema=NULLABLE_SCHEMA,
    )
    data = folder / "embeddings.parquet"
    pq.write_table(table, data)
    if "data_sha256" not in manifest_overrides:
        manifest = replace(manifest, data_sha256=file_sha256(data))
    (folder / MANIFEST_FILE).write_text(manifest.to_json())
    return folder


def normalized(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def unit_vectors(seed: int, n: int = ENTITIES) -> np.ndarray:
    return normalized(np.random.default_rng(seed).normal(size=(n, DIM)))


def refreshed(previous: np.ndarray, seed: int = 1, step: float = 0.05) -> np.ndarray:
    """A plausible next day: every entity moves a little."""
    return normalized(previous + step * np.random.default_rng(seed).normal(size=previous.shape))


def with_rows(vectors: np.ndarray, rows: dict[int, Any]) -> list:
    changed: list = [list(v) for v in vectors]
    for index, value in rows.items():
        changed[index] = value
    return changed


def scaled(vectors: np.ndarray, rows: range, factor: float) -> np.ndarray:
    out = vectors.copy()
    out[list(rows)] *= factor
    return out


def axis(i: int) -> np.ndarray:
    return np.eye(DIM, dtype=np.float64)[i]


@dataclass(frozen=True)
class SnapshotCase:
    """Earlier day(s) and current day; the expectations the gate must fail, the first one the target.

    ``previous`` returns the day before, or a list of earlier days (oldest first, the day before last);
    ``current`` receives the day before.
    """

    previous: Callable[[], np.ndarray | list[np.ndarray]]
    current: Callable[[np.ndarray], dict[str, Any]]  # write_day keyword arguments, "vectors" included
    fails: tuple[str, ...]
    entity_ids: list | None = None  # offending ids the target failure must name
    now: datetime = NOW
    thresholds: GateThresholds | None = None  # default: the shipped thresholds


def _good() -> np.ndarray:
    return unit_vectors(7)


def _around_e0(seed: int, shift: float = 0.0) -> np.ndarray:
    """Vectors near the first axis with a spread of 0.1 in the others, moved by ``shift`` along the second."""
    noise = 0.1 * np.random.default_rng(seed).normal(size=(ENTITIES, DIM))
    noise[:, 0] = 0.0
    return normalized(axis(0) + shift * axis(1) + noise)


def _symmetric(seed: int) -> np.ndarray:
    """Each entity's negation is another entity: every per-dimension mean is exactly 0."""
    half = unit_vectors(seed, ENTITIES // 2)
    return np.concatenate([half, -half])


def _stretched_first_axis(vectors: np.ndarray, factor: float) -> np.ndarray:
    return normalized(vectors + (factor - 1.0) * vectors[:, :1] * axis(0))


def _rotated(vectors: np.ndarray, cosine: float, seed: int) -> np.ndarray:
    """Each vector turned by one angle towards a random orthogonal direction: cosine to itself exactly ``cosine``."""
    directions = np.random.default_rng(seed).normal(size=vectors.shape)
    directions -= (directions * vectors).sum(axis=1, keepdims=True) * vectors
    directions = normalized(directions)
    return normalized(cosine * vectors + np.sqrt(1 - cosine**2) * directions)


LATER = availability(DAY) + timedelta(hours=1)

SNAPSHOT_CASES: dict[str, SnapshotCase] = {
    "null_key": SnapshotCase(
        _good, lambda p: {"vectors": refreshed(p), "ids": [*range(ENTITIES - 1), None]}, ("key_not_null",)
    ),
    "null_timestamp": SnapshotCase(
        _good,
        lambda p: {"vectors": refreshed(p), "timestamps": [availability(DAY)] * (ENTITIES - 1) + [None]},
        ("timestamp_not_null",),
        [ENTITIES - 1],
    ),
    # A null vector has no elements: the element checks fail with it (their columns are false, not null).
    "null_vector": SnapshotCase(
        _good,
        lambda p: {"vectors": with_rows(refreshed(p), {4: None})},
        ("embedding_not_null", "finite", "no_null_element", "nonzero"),
        [4],
    ),
    "wrong_dimension": SnapshotCase(
        _good, lambda p: {"vectors": with_rows(refreshed(p), {7: list(axis(1)[:-1])})}, ("dimension",), [7]
    ),
    "nan_element": SnapshotCase(
        _good, lambda p: {"vectors": with_rows(refreshed(p), {3: [float("nan"), *axis(0)[1:]]})}, ("finite",), [3]
    ),
    "inf_element": SnapshotCase(
        _good, lambda p: {"vectors": with_rows(refreshed(p), {5: [float("-inf"), *axis(0)[1:]]})}, ("finite",), [5]
    ),
    "null_element": SnapshotCase(
        _good, lambda p: {"vectors": with_rows(refreshed(p), {6: [None, *axis(1)[1:]]})}, ("no_null_element",), [6]
    ),
    "zero_vector": SnapshotCase(
        _good, lambda p: {"vectors": with_rows(refreshed(p), {8: [0.0] * DIM})}, ("nonzero",), [8]
    ),
    # 2% of the rows outside the bounds, tolerated up to 1%: below the lower bound, then above the upper one.
    "norm_below_bounds": SnapshotCase(
        _good, lambda p: {"vectors": scaled(refreshed(p), range(4), 0.3)}, ("norm_bounds",), [0, 1, 2, 3]
    ),
    "norm_above_bounds": SnapshotCase(
        _good, lambda p: {"vectors": scaled(refreshed(p), range(10, 14), 1.5)}, ("norm_bounds",), [10, 11, 12, 13]
    ),
    "duplicate_key": SnapshotCase(
        _good, lambda p: {"vectors": refreshed(p), "ids": [*range(ENTITIES - 1), 9]}, ("unique_key",), [9]
    ),
    "timestamp_not_the_manifests": SnapshotCase(
        _good,
        lambda p: {"vectors": refreshed(p), "timestamps": [availability(DAY)] * (ENTITIES - 1) + [LATER]},
        ("timestamp_is_manifests",),
        [ENTITIES - 1],
    ),
    # The leakage side: rows (and manifest) claim availability before the data they were computed from ends.
    "available_before_its_data": SnapshotCase(
        _good,
        lambda p: {"vectors": refreshed(p), "data_window_end": availability(DAY) + timedelta(minutes=1)},
        ("timestamp_window",),
        [0, 1, 2, 3, 4],
    ),
    "available_in_the_future": SnapshotCase(
        _good,
        lambda p: {"vectors": refreshed(p)},
        ("timestamp_window",),
        [0, 1, 2, 3, 4],
        now=availability(DAY) - timedelta(minutes=1),
    ),
    "rows_of_another_version": SnapshotCase(
        _good,
        lambda p: {"vectors": refreshed(p), "versions": [VERSION] * (ENTITIES - 1) + ["v2"]},
        ("model_version",),
        [ENTITIES - 1],
    ),
    "manifest_row_count": SnapshotCase(
        _good, lambda p: {"vectors": refreshed(p), "row_count": ENTITIES + 1}, ("row_count",)
    ),
    # Against the previous day.
    "coverage_shrinks": SnapshotCase(_good, lambda p: {"vectors": refreshed(p)[:100]}, ("coverage_change",)),
    # Judged against the recent days: 200 entities after days of 400, 300 and 200 pass (positive control
    # below), 100 after 400, 300 and 200 (half the fewest) do not.
    "coverage_below_every_recent_day": SnapshotCase(
        lambda: [unit_vectors(7, 400), unit_vectors(7, 300), _good()],
        lambda p: {"vectors": refreshed(p)[:100]},
        ("coverage_change",),
    ),
    # Growth has no upper bound by default (a young or bursty log grows by multiples); an operator's
    # coverage_change_max bounds it.
    "coverage_grows_beyond_a_configured_bound": SnapshotCase(
        lambda: unit_vectors(7, 100),
        lambda p: {"vectors": np.concatenate([refreshed(p), unit_vectors(8, 100)])},
        ("coverage_change",),
        thresholds=replace(THRESHOLDS, snapshot=replace(THRESHOLDS.snapshot, coverage_change_max=0.5)),
    ),
    # 60% of the ids remapped: only 40% of the day before's entities are still here (< 50%).
    "remapped_ids": SnapshotCase(
        _good,
        lambda p: {"vectors": refreshed(p), "ids": [*range(80), *range(1000, 1000 + ENTITIES - 80)]},
        ("retention",),
    ),
    # Every entity turned by the same angle: median cosine 0.7 < 0.8, none below 0.5.
    "space_moved": SnapshotCase(_good, lambda p: {"vectors": _rotated(p, 0.7, 3)}, ("median_cosine",)),
    # 10% of entities re-drawn (cosine ~0), the rest barely moved: median high, 10% > 5% below 0.5.
    "some_entities_jumped": SnapshotCase(
        _good,
        lambda p: {"vectors": np.concatenate([refreshed(p)[:180], unit_vectors(9, 20)])},
        ("low_cosine_fraction",),
    ),
    # A population near one axis with a spread of 0.1 moves 0.15 along another: 1.5 previous stds.
    "dimension_mean_shift": SnapshotCase(
        lambda: _around_e0(11),
        lambda p: {"vectors": _around_e0(11, shift=0.15)},
        ("mean_shift",),
        [2],  # dimensions count from 1
    ),
    # Alike vectors (near one axis) written on the wrong entities: the same population, so every moment,
    # the coverage and the retention are unchanged, and every cosine to the day before stays ~0.99; no
    # entity is closer to its own vector of the day before than to another's beyond chance.
    "vectors_on_the_wrong_entities": SnapshotCase(
        lambda: _around_e0(13), lambda p: {"vectors": np.roll(p, 7, axis=0)}, ("own_previous",)
    ),
    # A symmetric population (means exactly 0) stretched along the first axis: its std more than doubles.
    "dimension_std_ratio": SnapshotCase(
        lambda: _symmetric(12), lambda p: {"vectors": _stretched_first_axis(p, 4.0)}, ("std_ratio",), [1]
    ),
}


def run_snapshot_case(root: Path, docs_dir: Path, case: SnapshotCase | None) -> GateReport:
    history = (case.previous if case else _good)()
    history = history if isinstance(history, list) else [history]
    for back, vectors in enumerate(reversed(history), start=1):
        write_day(root, DAY - timedelta(days=back), vectors)
    previous = history[-1]
    arguments = case.current(previous) if case else {"vectors": refreshed(previous)}
    folder = write_day(root, DAY, arguments.pop("vectors"), **arguments)
    return validate_snapshot(
        folder, docs_dir=docs_dir, now=case.now if case else NOW, thresholds=case.thresholds if case else None
    )


def assert_fails_exactly(report: GateReport, names: tuple[str, ...]) -> None:
    expected = [BY_NAME[name] for name in names]
    unmatched = [
        f for f in report.failures if not any(e.matches(f.expectation, f.column, f.description) for e in expected)
    ]
    assert not unmatched, f"unexpected failures: {unmatched}"
    for e in expected:
        assert [f for f in report.failures if e.matches(f.expectation, f.column, f.description)], (
            f"{e.name} not named in {report.failures}"
        )
    assert not report.success and len(report.failures) == len(names), report.failures


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gate_docs")


def test_snapshot_positive_control_passes_every_expectation(tmp_path: Path, docs_dir: Path) -> None:
    report = run_snapshot_case(tmp_path, docs_dir, None)
    assert report.success, report.failures
    passed, total = report.summary.rsplit(": ", 1)[1].split(" ")[0].split("/")
    assert passed == total and int(total) == len(SNAPSHOT_NAMES), report.summary  # every check ran
    assert not report.notes, report.notes


def test_growth_passes_with_the_default_thresholds(tmp_path: Path, docs_dir: Path) -> None:
    # Positive control of coverage_grows_beyond_a_configured_bound: 100 -> 200 entities, every old one kept.
    spec = SNAPSHOT_CASES["coverage_grows_beyond_a_configured_bound"]
    report = run_snapshot_case(tmp_path, docs_dir, SnapshotCase(spec.previous, spec.current, ()))
    assert report.success, report.failures


def test_a_quiet_day_within_the_recent_days_passes(tmp_path: Path, docs_dir: Path) -> None:
    # Positive control of coverage_below_every_recent_day: as many entities as the quietest recent day.
    history = SNAPSHOT_CASES["coverage_below_every_recent_day"].previous
    report = run_snapshot_case(tmp_path, docs_dir, SnapshotCase(history, lambda p: {"vectors": refreshed(p)}, ()))
    assert report.success, report.failures


@pytest.mark.parametrize("case", sorted(SNAPSHOT_CASES))
def test_snapshot_expectation_fails_alone_and_is_named(case: str, tmp_path: Path, docs_dir: Path) -> None:
    spec = SNAPSHOT_CASES[case]
    report = run_snapshot_case(tmp_path, docs_dir, spec)
    assert_fails_exactly(report, spec.fails)
    if spec.entity_ids is not None:
        target = BY_NAME[spec.fails[0]]
        (failure,) = [f for f in report.failures if target.matches(f.expectation, f.column, f.description)]
        assert failure.entity_ids == spec.entity_ids, failure


# --------------------------------------------------------------------------- snapshot structure (before GE runs)


def _rewrite_manifest(folder: Path, **changes: Any) -> None:
    data = json.loads((folder / MANIFEST_FILE).read_text())
    data.update(changes)
    (folder / MANIFEST_FILE).write_text(json.dumps(data))


STRUCTURE_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    # change to a good, written day -> words of the one structural failure
    "content_not_the_manifests_sha256": (
        lambda folder: _rewrite_manifest(folder, data_sha256="0" * 64),
        "does not match the manifest's data_sha256",
    ),
    "data_file_missing": (lambda folder: (folder / "embeddings.parquet").unlink(), "data file missing"),
    "not_parquet": (lambda folder: (folder / "embeddings.parquet").write_bytes(b"PAR1 no"), "not a readable Parquet"),
    "manifest_missing": (lambda folder: (folder / MANIFEST_FILE).unlink(), MANIFEST_FILE),
    "unknown_family": (lambda folder: _rewrite_manifest(folder, family="ctr_board"), "unknown family 'ctr_board'"),
    # Refused by the manifest reader already (gate.py's own dim <= 0 check can no longer be reached).
    "non_positive_dim": (lambda folder: _rewrite_manifest(folder, dim=0), "key 'dim'"),
    "version_not_the_folders": (
        lambda folder: _rewrite_manifest(folder, model_version="v9"),
        "model_version disagrees with the folder layout",
    ),
}


@pytest.mark.parametrize("case", sorted(STRUCTURE_CASES))
def test_unreadable_snapshot_is_refused_before_the_suites(case: str, tmp_path: Path, docs_dir: Path) -> None:
    change, words = STRUCTURE_CASES[case]
    write_day(tmp_path, DAY - timedelta(days=1), _good())
    folder = write_day(tmp_path, DAY, refreshed(_good()))
    assert validate_snapshot(folder, docs_dir=docs_dir, now=NOW).success  # positive control of this very folder
    change(folder)
    report = validate_snapshot(folder, docs_dir=docs_dir, now=NOW)
    assert not report.success
    (failure,) = report.failures
    assert failure.expectation == "snapshot_is_readable" and words in failure.description, failure


# --------------------------------------------------------------------------- training sets

WINDOW = (datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 8, tzinfo=UTC))
REQUIRED = ["user_id", "pin_id", "event_timestamp", "clicked"]
N_ROWS = 600


def good_training_set() -> pd.DataFrame:
    """Users seen from the first day (warm after 48 h), every embedding present, click rate ~0.3."""
    rng = np.random.default_rng(21)
    stamps = pd.Timestamp(WINDOW[0]) + pd.to_timedelta(np.linspace(0, 7 * 24 - 1, N_ROWS), unit="h")
    vectors = [list(v) for v in unit_vectors(22, N_ROWS)]
    return pd.DataFrame(
        {
            "user_id": np.arange(N_ROWS, dtype=np.int64) % 20,
            "pin_id": np.arange(N_ROWS, dtype=np.int64) % 50 + 1000,
            "event_timestamp": stamps,
            "clicked": (rng.random(N_ROWS) < 0.3).astype(np.int64),
            "ctr_user_emb": vectors,
            "ctr_pin_emb": vectors,
        }
    )


def validate(df: pd.DataFrame, docs_dir: Path, expected_label_rate: float | None) -> GateReport:
    return validate_training_set(
        df,
        label="clicked",
        embedding_columns=["ctr_user_emb", "ctr_pin_emb"],
        required_columns=REQUIRED,
        window=WINDOW,
        docs_dir=docs_dir,
        entity_columns={"ctr_user_emb": "user_id"},
        expected_label_rate=expected_label_rate,
    )


def _nulled(column: str, row: int = 37) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def change(df: pd.DataFrame) -> pd.DataFrame:
        values = df[column].astype("float64") if column == "clicked" else df[column].astype(object)
        values = values.copy()
        values.iloc[row] = None
        return df.assign(**{column: values})

    return change


def _warm_rows_missing(df: pd.DataFrame) -> pd.DataFrame:
    warm = df["event_timestamp"] >= df.groupby("user_id")["event_timestamp"].transform("min") + pd.Timedelta(hours=48)
    column = df["ctr_user_emb"].copy()
    column[warm & (np.arange(len(df)) % 3 == 0)] = None  # a third of the warm rows
    return df.assign(ctr_user_emb=column)


def _cold_rows_missing(df: pd.DataFrame) -> pd.DataFrame:
    warm = df["event_timestamp"] >= df.groupby("user_id")["event_timestamp"].transform("min") + pd.Timedelta(hours=48)
    return df.assign(ctr_user_emb=df["ctr_user_emb"].where(warm, None))


def _label_at(row: int, value: int) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def change(df: pd.DataFrame) -> pd.DataFrame:
        labels = df["clicked"].copy()
        labels.iloc[row] = value
        return df.assign(clicked=labels)

    return change


def _stamp_at(row: int, stamp: datetime) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def change(df: pd.DataFrame) -> pd.DataFrame:
        stamps = df["event_timestamp"].copy()
        stamps.iloc[row] = pd.Timestamp(stamp)
        return df.assign(event_timestamp=stamps)

    return change


@dataclass(frozen=True)
class TrainingCase:
    change: Callable[[pd.DataFrame], pd.DataFrame]
    fails: tuple[str, ...]
    label_rate_delta: float | None = 0.0  # event-log rate = the set's rate + delta (None: no rate given)
    label_rate: float | None = None  # or this event-log rate


TRAINING_CASES: dict[str, TrainingCase] = {
    "null_user_id": TrainingCase(_nulled("user_id"), ("required_user_id",)),
    "null_pin_id": TrainingCase(_nulled("pin_id"), ("required_pin_id",)),
    "null_event_timestamp": TrainingCase(_nulled("event_timestamp"), ("required_event_timestamp",)),
    "null_label": TrainingCase(_nulled("clicked"), ("required_label",)),
    "before_the_window": TrainingCase(_stamp_at(0, WINDOW[0] - timedelta(seconds=1)), ("training_window",)),
    "after_the_window": TrainingCase(_stamp_at(N_ROWS - 1, WINDOW[1] + timedelta(days=3)), ("training_window",)),
    "label_outside_0_1": TrainingCase(_label_at(5, 2), ("label_values",)),
    "negative_label": TrainingCase(_label_at(5, -1), ("label_values",)),
    # Above the sanity maximum (every row positive) while the event log agrees: only the bounds fail.
    "label_rate_above_maximum": TrainingCase(lambda df: df.assign(clicked=1), ("label_rate_bounds",), None, 1.0),
    "label_rate_below_minimum": TrainingCase(lambda df: df.assign(clicked=0), ("label_rate_bounds",), None, 0.0),
    "label_rate_far_from_the_log": TrainingCase(lambda df: df, ("label_rate_vs_log",), -0.1),
    "warm_rows_miss_embeddings": TrainingCase(_warm_rows_missing, ("warm_embedding_missing",)),
    "embedding_missing_everywhere": TrainingCase(
        lambda df: df.assign(ctr_pin_emb=[None if i % 2 else v for i, v in enumerate(df["ctr_pin_emb"])]),
        ("embedding_missing",),
    ),
}


def run_training_case(docs_dir: Path, case: TrainingCase | None) -> GateReport:
    df = good_training_set()
    if case is None:
        return validate(df, docs_dir, float(df["clicked"].mean()))
    df = case.change(df)
    rate = case.label_rate
    if rate is None and case.label_rate_delta is not None:
        rate = float(df["clicked"].mean()) + case.label_rate_delta
    return validate(df, docs_dir, rate)


def test_training_set_positive_control_passes_every_expectation(docs_dir: Path) -> None:
    report = run_training_case(docs_dir, None)
    assert report.success, report.failures
    passed, total = report.summary.rsplit(": ", 1)[1].split(" ")[0].split("/")
    assert passed == total and int(total) == len(TRAINING_NAMES), report.summary


def test_cold_start_rows_missing_their_embedding_pass(docs_dir: Path) -> None:
    # The other side of warm_embedding_missing: missing embeddings of cold-start rows are not counted.
    report = run_training_case(docs_dir, TrainingCase(_cold_rows_missing, ()))
    assert report.success, report.failures


@pytest.mark.parametrize("case", sorted(TRAINING_CASES))
def test_training_set_expectation_fails_alone_and_is_named(case: str, docs_dir: Path) -> None:
    report = run_training_case(docs_dir, TRAINING_CASES[case])
    assert_fails_exactly(report, TRAINING_CASES[case].fails)


# --------------------------------------------------------------------------- completeness


def built_expectations() -> dict[str, list[tuple[str, str | None, str]]]:
    """(type, column, description) of every expectation the suite builders make, with every option on."""
    snapshot = THRESHOLDS.snapshot
    manifest = manifest_for(DAY, ENTITIES)
    snapshot_suites = [
        suites.snapshot_rows_suite(
            "rows",
            manifest,
            snapshot,
            now=NOW,
            recent_row_counts=[ENTITIES, ENTITIES + 1],
            previous_label="day 4",
            history_label="days 3..4",
            judge_overlap=True,
        ),
        suites.snapshot_dimensions_suite("dimensions", snapshot, "days 3..4"),
    ]
    training = suites.training_set_suite(
        "training",
        label="clicked",
        embedding_columns=["ctr_user_emb", "ctr_pin_emb"],
        required_columns=REQUIRED,
        window=WINDOW,
        thresholds=THRESHOLDS.training_set,
        warm_columns={"ctr_user_emb": "warm_ctr_user_emb"},
        expected_label_rate=0.3,
    )

    def described(suite_list: list) -> list[tuple[str, str | None, str]]:
        return [
            (e.expectation_type, getattr(e, "column", None), e.description or "")
            for suite in suite_list
            for e in suite.expectations
        ]

    return {"snapshot": described(snapshot_suites), "training_set": described([training])}


def test_every_expectation_of_both_suites_has_a_failing_case() -> None:
    built = built_expectations()
    for gate, names in (("snapshot", SNAPSHOT_NAMES), ("training_set", TRAINING_NAMES)):
        matched = []
        for type_, column, description in built[gate]:
            hits = [e.name for e in EXPECTATIONS if e.name in names and e.matches(type_, column, description)]
            assert len(hits) == 1, f"{gate} expectation {type_}[{column}] '{description}' matches {hits}"
            matched += hits
        assert sorted(matched) == sorted(names), "an entry of EXPECTATIONS is no longer built by the suite"
    targets = {case.fails[0] for case in SNAPSHOT_CASES.values()} | {c.fails[0] for c in TRAINING_CASES.values()}
    assert targets == {e.name for e in EXPECTATIONS}, "an expectation without a case that makes it fail"
