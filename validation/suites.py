"""Great Expectations suites of the validation gate, one builder per checked frame.

GE has no vector expectations, so the gate first derives one scalar column per property of a
vector (``embedding_dim``, ``l2_norm``, ``all_values_finite``, ``no_null_values``,
``has_nonzero_value``, ``cosine_to_previous``, ``in_previous_day``) and one
row per embedding dimension (``mean_shift_in_previous_std``, ``std_ratio_to_previous``). The
suites below are plain built-in expectations over those columns, so Data Docs read as
sentences about the data ("l2_norm values must be between 0.9 and 1.1").

Importing this module imports great_expectations (~10 s): import it lazily.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import TYPE_CHECKING

import great_expectations as gx
import great_expectations.expectations as gxe
from great_expectations.expectations.row_conditions import Column

if TYPE_CHECKING:
    from great_expectations.expectations.expectation import Expectation

    from derm.core.snapshot import SnapshotManifest
    from derm.validation.thresholds import SnapshotThresholds, TrainingSetThresholds

# Derived column names shared with derm.validation.gate, which computes them.
EMBEDDING_DIM = "embedding_dim"
L2_NORM = "l2_norm"
ALL_VALUES_FINITE = "all_values_finite"
NO_NULL_VALUES = "no_null_values"
HAS_NONZERO_VALUE = "has_nonzero_value"
COSINE_TO_PREVIOUS = "cosine_to_previous"
IN_PREVIOUS_DAY = "in_previous_day"
CLOSER_TO_OWN_PREVIOUS = "closer_to_own_previous"
DIMENSION = "dimension"
MEAN_SHIFT = "mean_shift_in_previous_std"
STD_RATIO = "std_ratio_to_previous"


def _suite(name: str, expectations: list[Expectation]) -> gx.ExpectationSuite:
    # Passing expectations to the constructor, unlike add_expectation, never reads or writes the
    # store of GE's "current" context, which may be another project when several roots are in use.
    return gx.ExpectationSuite(name=name, expectations=expectations)


def snapshot_rows_suite(
    name: str,
    manifest: SnapshotManifest,
    thresholds: SnapshotThresholds,
    *,
    now: datetime,
    recent_row_counts: list[int] | None,
    previous_label: str | None,
    history_label: str | None = None,
    judge_overlap: bool = True,
) -> gx.ExpectationSuite:
    """Per-row checks of one snapshot; drift checks only when earlier snapshots exist.

    ``recent_row_counts`` are the row counts of the earlier days the coverage is judged against
    (``history_label`` names them); the overlap and cosine checks compare with the day before
    (``previous_label``).

    Broken vectors and rows (null, wrong dimension, NaN/Inf or NULL elements, all zeros, duplicate
    keys, timestamps other than the manifest's) fail on a single row. Distribution checks (norm
    bounds, coverage, overlap, cosine drift) tolerate outliers, see ``validation/thresholds.yaml``.
    ``judge_overlap`` is false when a population is too small for the overlap fraction to mean anything.
    """
    key = manifest.join_key
    expectations: list[Expectation] = []
    for column, what in ((key, "an entity id"), ("event_timestamp", "an availability time")):
        expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=column, description=f"Every row has {what}"))
    expectations.append(
        gxe.ExpectColumnValuesToNotBeNull(
            column=EMBEDDING_DIM, description="Every row has an embedding (embedding_dim is null for a null one)"
        )
    )
    expectations.append(
        gxe.ExpectColumnValuesToBeInSet(
            column=EMBEDDING_DIM,
            value_set=[manifest.dim],
            description=f"Every embedding has exactly dim={manifest.dim} values (manifest)",
        )
    )
    expectations.append(
        gxe.ExpectColumnValuesToBeInSet(
            column=ALL_VALUES_FINITE, value_set=[True], description="No embedding contains NaN or +/-Inf"
        )
    )
    expectations.append(
        gxe.ExpectColumnValuesToBeInSet(
            column=NO_NULL_VALUES, value_set=[True], description="No embedding contains a NULL element"
        )
    )
    expectations.append(
        gxe.ExpectColumnValuesToBeInSet(
            column=HAS_NONZERO_VALUE,
            value_set=[True],
            description="No embedding is all zeros (a zero vector is a missing embedding written as data)",
        )
    )
    outside = thresholds.max_fraction_outside_norm_bounds
    expectations.append(
        gxe.ExpectColumnValuesToBeBetween(
            column=L2_NORM,
            min_value=thresholds.norm_min,
            max_value=thresholds.norm_max,
            mostly=1.0 - outside,
            description=(
                f"L2 norm within [{thresholds.norm_min}, {thresholds.norm_max}] for at least {1.0 - outside:.1%} "
                "of the embeddings: upstream normalises and the moving average only shrinks the norm, so a whole "
                "export outside the bounds is unnormalised, while one entity that moved a lot may dip below"
            ),
        )
    )
    expectations.append(
        gxe.ExpectColumnValuesToBeUnique(column=key, description=f"One embedding per {key} (no duplicate keys)")
    )
    expectations.append(
        gxe.ExpectColumnValuesToBeBetween(
            column="event_timestamp",
            min_value=manifest.event_timestamp,
            max_value=manifest.event_timestamp,
            description=(
                f"Every row's event_timestamp equals the manifest's event_timestamp "
                f"({manifest.event_timestamp.isoformat()}): the snapshot becomes available at one moment"
            ),
        )
    )
    expectations.append(
        gxe.ExpectColumnValuesToBeBetween(
            column="event_timestamp",
            min_value=manifest.data_window_end,
            max_value=now,
            description=(
                f"event_timestamp between the manifest's data_window_end ({manifest.data_window_end.isoformat()}) "
                f"and now ({now.isoformat(timespec='seconds')}): not before the data it was computed from, "
                "not in the future"
            ),
        )
    )
    expectations.append(
        gxe.ExpectColumnValuesToBeInSet(
            column="model_version",
            value_set=[manifest.model_version],
            description=f"Rows carry the manifest's model version {manifest.model_version}",
        )
    )
    expectations.append(
        gxe.ExpectTableRowCountToEqual(
            value=manifest.row_count, description=f"Row count equals the manifest's row_count ({manifest.row_count})"
        )
    )
    if not recent_row_counts:
        return _suite(name, expectations)
    low, high = coverage_bounds(recent_row_counts, thresholds)
    fewest, most = min(recent_row_counts), max(recent_row_counts)
    counts = f"{fewest} rows" if fewest == most else f"{fewest} to {most} rows"
    expectations.append(
        gxe.ExpectTableRowCountToBeBetween(
            min_value=low,
            max_value=high,
            description=(
                f"Coverage change versus {history_label or previous_label} ({counts}) within "
                f"[{thresholds.coverage_change_min:+.0%}, {_upper(thresholds.coverage_change_max)}], "
                f"or at most {thresholds.coverage_change_min_entities} entities either way: "
                f"[{low}, {'any' if high is None else high}] rows"
            ),
        )
    )
    if judge_overlap:
        retained = thresholds.min_fraction_of_previous_retained
        previous_count = recent_row_counts[-1]
        expectations.append(
            gxe.ExpectColumnSumToBeBetween(
                column=IN_PREVIOUS_DAY,
                min_value=math.ceil(retained * previous_count),
                description=(
                    f"At least {retained:.0%} of the {previous_count} entities of {previous_label} are still here "
                    f"(sum of in_previous_day at least {math.ceil(retained * previous_count)}): guards against "
                    "remapped or dropped ids; new entities are growth, not a failure"
                ),
            )
        )
        closer = thresholds.min_fraction_closer_to_own_previous
        expectations.append(
            gxe.ExpectColumnMeanToBeBetween(
                column=CLOSER_TO_OWN_PREVIOUS,
                min_value=closer,
                description=(
                    f"At least {closer:.0%} of the entities in both days are closer (cosine) to their own vector of "
                    f"{previous_label} than to another entity's: guards against the right vectors written on the "
                    "wrong entities, which keeps every distribution and can keep the cosines high"
                ),
            )
        )
    expectations.append(
        gxe.ExpectColumnMedianToBeBetween(
            column=COSINE_TO_PREVIOUS,
            min_value=thresholds.min_median_cosine_to_previous,
            max_value=1.0 + 1e-6,  # float rounding of identical vectors
            description=(
                f"Median per-entity cosine similarity to {previous_label} at least "
                f"{thresholds.min_median_cosine_to_previous}"
            ),
        )
    )
    expectations.append(
        gxe.ExpectColumnValuesToBeBetween(
            column=COSINE_TO_PREVIOUS,
            min_value=thresholds.low_cosine_to_previous,
            mostly=1.0 - thresholds.max_fraction_below_low_cosine,
            description=(
                f"At most {thresholds.max_fraction_below_low_cosine:.0%} of entities have cosine below "
                f"{thresholds.low_cosine_to_previous} to {previous_label}"
            ),
        )
    )
    return _suite(name, expectations)


def coverage_bounds(recent_row_counts: int | list[int], thresholds: SnapshotThresholds) -> tuple[int, int | None]:
    """Allowed row counts: the relative bounds around the recent days' fewest and most rows.

    Each side is widened to +/- ``coverage_change_min_entities`` entities, so that percentages are
    not judged on a dozen entities; a day as small or as large as any recent day, give or take the
    relative change, passes (real logs vary a lot from day to day).
    """
    counts = [recent_row_counts] if isinstance(recent_row_counts, int) else list(recent_row_counts)
    fewest, most = min(counts), max(counts)
    floor = thresholds.coverage_change_min_entities
    low = min(math.ceil(fewest * (1 + thresholds.coverage_change_min)), fewest - floor)
    if thresholds.coverage_change_max is None:
        return max(low, 1), None
    high = max(math.floor(most * (1 + thresholds.coverage_change_max)), most + floor)
    return max(low, 1), high


def _upper(change: float | None) -> str:
    return "no upper bound" if change is None else f"{change:+.0%}"


def snapshot_dimensions_suite(name: str, thresholds: SnapshotThresholds, previous_label: str) -> gx.ExpectationSuite:
    """Per-dimension distribution shift versus the earlier days (``previous_label`` names them), pooled."""
    expectations: list[Expectation] = []
    expectations.append(
        gxe.ExpectColumnValuesToBeBetween(
            column=MEAN_SHIFT,
            max_value=thresholds.max_dimension_mean_shift,
            description=(
                f"Per dimension, over the entities present in both, |mean - mean in {previous_label}| at most "
                f"{thresholds.max_dimension_mean_shift} previous standard deviations"
            ),
        )
    )
    expectations.append(
        gxe.ExpectColumnValuesToBeBetween(
            column=STD_RATIO,
            min_value=thresholds.dimension_std_ratio_min,
            max_value=thresholds.dimension_std_ratio_max,
            description=(
                f"Per dimension, std / std in {previous_label} within "
                f"[{thresholds.dimension_std_ratio_min}, {thresholds.dimension_std_ratio_max}]"
            ),
        )
    )
    return _suite(name, expectations)


def training_set_suite(
    name: str,
    *,
    label: str,
    embedding_columns: list[str],
    required_columns: list[str],
    window: tuple[datetime, datetime],
    thresholds: TrainingSetThresholds,
    warm_columns: dict[str, str] | None = None,
    expected_label_rate: float | None = None,
) -> gx.ExpectationSuite:
    """Checks of a point-in-time-joined training set (embedding columns hold their length, null if missing).

    ``warm_columns`` maps an embedding column to a boolean column that is true where the row's
    entity could have an embedding (not cold start); the missing rate of that column is judged on
    those rows only. ``expected_label_rate`` is the label rate of the same events in the event log.
    """
    warm_columns = warm_columns or {}
    expectations: list[Expectation] = []
    for column in required_columns:
        expectations.append(
            gxe.ExpectColumnValuesToNotBeNull(column=column, description=f"Required column {column} has no nulls")
        )
    expectations.append(
        gxe.ExpectColumnValuesToBeBetween(
            column="event_timestamp",
            min_value=window[0],
            max_value=window[1],
            description=f"event_timestamp within the requested window [{window[0]}, {window[1]}]",
        )
    )
    expectations.append(
        gxe.ExpectColumnValuesToBeInSet(column=label, value_set=[0, 1], description=f"Label {label} is 0 or 1")
    )
    expectations.append(
        gxe.ExpectColumnMeanToBeBetween(
            column=label,
            min_value=thresholds.label_rate_min,
            max_value=thresholds.label_rate_max,
            description=(
                f"Label rate (fraction of positives) within [{thresholds.label_rate_min}, "
                f"{thresholds.label_rate_max}]: both classes present"
            ),
        )
    )
    if expected_label_rate is not None:
        tolerance = thresholds.max_label_rate_difference
        expectations.append(
            gxe.ExpectColumnMeanToBeBetween(
                column=label,
                min_value=max(expected_label_rate - tolerance, 0.0),
                max_value=min(expected_label_rate + tolerance, 1.0),
                description=(
                    f"Label rate within {tolerance} of the rate of the same labelled events in the event log "
                    f"({expected_label_rate:.4f}): the join neither drops nor duplicates rows by label"
                ),
            )
        )
    for column in embedding_columns:
        max_missing = thresholds.max_missing_rate_by_feature.get(column, thresholds.max_missing_embedding_rate)
        warm = warm_columns.get(column)
        if warm is None:
            expectations.append(
                gxe.ExpectColumnValuesToNotBeNull(
                    column=column,
                    mostly=1.0 - max_missing,
                    description=f"At most {max_missing:.0%} of rows miss the {column} embedding",
                )
            )
            continue
        expectations.append(
            gxe.ExpectColumnValuesToNotBeNull(
                column=column,
                mostly=1.0 - max_missing,
                row_condition=Column(warm) == True,  # noqa: E712 -- builds a GE condition, not a comparison
                description=(
                    f"At most {max_missing:.0%} of rows miss the {column} embedding, among rows whose entity "
                    f"appeared at least {thresholds.cold_start_hours:g} h earlier in the set ({warm}); "
                    "cold-start rows have no earlier snapshot and are expected to miss it"
                ),
            )
        )
    return _suite(name, expectations)
