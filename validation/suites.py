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
    from training.snapshot import SnapshotManifest
    from validation.gate import SnapshotThresholds, TrainingSetThresholds

# Derived column names shared with validation.gate, which computes them.
EMBEDDING_DIM = "embedding_dim"
L2_NORM = "l2_norm"
ALL_VALUES_FINITE = "all_values_finite"
COSINE_TO_PREVIOUS = "cosine_to_previous"
DIMENSION = "dimension"
MEAN_SHIFT = "mean_shift_in_previous_std"
STD_RATIO = "std_ratio_to_previous"


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
    suite = gx.ExpectationSuite(name=name)
    for column in (key, "event_timestamp", EMBEDDING_DIM):
        suite.add_expectation(
            gxe.ExpectColumnValuesToNotBeNull(
                column=column, description=f"Every row has a {column} (embedding_dim is null for a null embedding)"
            )
        )
    suite.add_expectation(
        gxe.ExpectColumnValuesToBeInSet(
            column=EMBEDDING_DIM,
            value_set=[manifest.dim],
            description=f"Every embedding has exactly dim={manifest.dim} values (manifest)",
        )
    )
    suite.add_expectation(
        gxe.ExpectColumnValuesToBeInSet(
            column=ALL_VALUES_FINITE, value_set=[True], description="No embedding contains NaN or +/-Inf"
        )
    )
    suite.add_expectation(
        gxe.ExpectColumnValuesToBeBetween(
            column=L2_NORM,
            min_value=thresholds.norm_min,
            max_value=thresholds.norm_max,
            description="Embeddings are L2-normalised upstream; zero or unnormalised vectors are broken",
        )
    )
    suite.add_expectation(
        gxe.ExpectCompoundColumnsToBeUnique(
            column_list=[key, "event_timestamp"], description=f"One embedding per ({key}, event_timestamp)"
        )
    )
    suite.add_expectation(
        gxe.ExpectColumnValuesToBeBetween(
            column="event_timestamp",
            min_value=manifest.data_window_end,
            max_value=now,
            description=(
                "Availability time is not before the end of the manifest's data window "
                "(point-in-time correctness) and not in the future"
            ),
        )
    )
    suite.add_expectation(
        gxe.ExpectColumnValuesToBeInSet(
            column="model_version",
            value_set=[manifest.model_version],
            description="Rows carry the manifest's model version",
        )
    )
    suite.add_expectation(
        gxe.ExpectTableRowCountToEqual(
            value=manifest.row_count, description="Row count equals the manifest's row_count"
        )
    )
    if previous_row_count is None:
        return suite
    suite.add_expectation(
        gxe.ExpectTableRowCountToBeBetween(
            min_value=math.ceil(previous_row_count * (1 + thresholds.coverage_change_min)),
            max_value=math.floor(previous_row_count * (1 + thresholds.coverage_change_max)),
            description=(
                f"Coverage change versus {previous_label} ({previous_row_count} rows) within "
                f"[{thresholds.coverage_change_min:+.0%}, {thresholds.coverage_change_max:+.0%}]"
            ),
        )
    )
    suite.add_expectation(
        gxe.ExpectColumnMedianToBeBetween(
            column=COSINE_TO_PREVIOUS,
            min_value=thresholds.min_median_cosine_to_previous,
            max_value=1.0 + 1e-6,  # float rounding of identical vectors
            description=f"Median day-over-day cosine similarity per entity versus {previous_label}",
        )
    )
    suite.add_expectation(
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
    return suite


def snapshot_dimensions_suite(name: str, thresholds: SnapshotThresholds, previous_label: str) -> gx.ExpectationSuite:
    """Per-dimension distribution shift versus the previous snapshot."""
    suite = gx.ExpectationSuite(name=name)
    suite.add_expectation(
        gxe.ExpectColumnValuesToBeBetween(
            column=MEAN_SHIFT,
            max_value=thresholds.max_dimension_mean_shift,
            description=f"|mean - previous mean| per dimension, in previous standard deviations ({previous_label})",
        )
    )
    suite.add_expectation(
        gxe.ExpectColumnValuesToBeBetween(
            column=STD_RATIO,
            min_value=thresholds.dimension_std_ratio_min,
            max_value=thresholds.dimension_std_ratio_max,
            description=f"std / previous std per dimension ({previous_label})",
        )
    )
    return suite


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
    suite = gx.ExpectationSuite(name=name)
    for column in required_columns:
        suite.add_expectation(
            gxe.ExpectColumnValuesToNotBeNull(column=column, description=f"Required column {column} has no nulls")
        )
    suite.add_expectation(
        gxe.ExpectColumnValuesToBeBetween(
            column="event_timestamp",
            min_value=window[0],
            max_value=window[1],
            description="Event timestamps lie within the requested window",
        )
    )
    suite.add_expectation(
        gxe.ExpectColumnValuesToBeInSet(column=label, value_set=[0, 1], description="Labels are binary")
    )
    suite.add_expectation(
        gxe.ExpectColumnMeanToBeBetween(
            column=label,
            min_value=thresholds.label_rate_min,
            max_value=thresholds.label_rate_max,
            description="Label rate (fraction of positives) within bounds",
        )
    )
    for column in embedding_columns:
        max_missing = thresholds.max_missing_rate_by_feature.get(column, thresholds.max_missing_embedding_rate)
        suite.add_expectation(
            gxe.ExpectColumnValuesToNotBeNull(
                column=column,
                mostly=1.0 - max_missing,
                description=f"At most {max_missing:.0%} of rows miss the {column} embedding",
            )
        )
    return suite
