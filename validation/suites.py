"""Great Expectations suites of the validation gate, one builder per checked frame.

GE has no vector expectations, so the gate first derives one scalar column per property of a
vector (``embedding_dim``, ``l2_norm``, ``all_values_finite``, ``cosine_to_previous``) and one
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

if TYPE_CHECKING:
    from great_expectations.expectations.expectation import Expectation

    from derm.core.snapshot import SnapshotManifest
    from derm.validation.thresholds import SnapshotThresholds, TrainingSetThresholds

# Derived column names shared with derm.validation.gate, which computes them.
EMBEDDING_DIM = "embedding_dim"
L2_NORM = "l2_norm"
ALL_VALUES_FINITE = "all_values_finite"
COSINE_TO_PREVIOUS = "cosine_to_previous"
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
    previous_row_count: int | None,
    previous_label: str | None,
) -> gx.ExpectationSuite:
    """Per-row checks of one snapshot; drift checks only when a previous snapshot exists."""
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
        gxe.ExpectColumnValuesToBeBetween(
            column=L2_NORM,
            min_value=thresholds.norm_min,
            max_value=thresholds.norm_max,
            description=(
                f"L2 norm of every embedding within [{thresholds.norm_min}, {thresholds.norm_max}]: "
                "upstream normalises, so zero or unnormalised vectors are broken"
            ),
        )
    )
    expectations.append(
        gxe.ExpectCompoundColumnsToBeUnique(
            column_list=[key, "event_timestamp"], description=f"One embedding per ({key}, event_timestamp)"
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
    if previous_row_count is None:
        return _suite(name, expectations)
    expectations.append(
        gxe.ExpectTableRowCountToBeBetween(
            min_value=math.ceil(previous_row_count * (1 + thresholds.coverage_change_min)),
            max_value=math.floor(previous_row_count * (1 + thresholds.coverage_change_max)),
            description=(
                f"Coverage change versus {previous_label} ({previous_row_count} rows) within "
                f"[{thresholds.coverage_change_min:+.0%}, {thresholds.coverage_change_max:+.0%}]"
            ),
        )
    )
    expectations.append(
        gxe.ExpectColumnValuesToNotBeNull(
            column=COSINE_TO_PREVIOUS,
            mostly=thresholds.min_fraction_seen_in_previous,
            description=(
                f"At least {thresholds.min_fraction_seen_in_previous:.0%} of entities also in {previous_label} "
                "(cosine_to_previous is null for new entities): guards against remapped ids"
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


def snapshot_dimensions_suite(name: str, thresholds: SnapshotThresholds, previous_label: str) -> gx.ExpectationSuite:
    """Per-dimension distribution shift versus the previous snapshot."""
    expectations: list[Expectation] = []
    expectations.append(
        gxe.ExpectColumnValuesToBeBetween(
            column=MEAN_SHIFT,
            max_value=thresholds.max_dimension_mean_shift,
            description=(
                f"Per dimension, |mean - mean in {previous_label}| at most "
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
) -> gx.ExpectationSuite:
    """Checks of a point-in-time-joined training set (embedding columns hold their length, null if missing)."""
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
                f"Label rate (fraction of positives) within [{thresholds.label_rate_min}, {thresholds.label_rate_max}]"
            ),
        )
    )
    for column in embedding_columns:
        max_missing = thresholds.max_missing_rate_by_feature.get(column, thresholds.max_missing_embedding_rate)
        expectations.append(
            gxe.ExpectColumnValuesToNotBeNull(
                column=column,
                mostly=1.0 - max_missing,
                description=f"At most {max_missing:.0%} of rows miss the {column} embedding",
            )
        )
    return _suite(name, expectations)
