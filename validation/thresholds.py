"""Thresholds of the validation gate, read from one YAML file (``validation/thresholds.yaml`` by default).

Example::

    thresholds = load_thresholds()                    # the defaults shipped with the gate
    thresholds = load_thresholds(Path("relaxed.yaml"))  # a file of your own; unknown keys are errors
    thresholds.snapshot.norm_min
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

DEFAULT_THRESHOLDS_PATH = Path(__file__).with_name("thresholds.yaml")


@dataclass(frozen=True)
class SnapshotThresholds:
    norm_min: float = 0.9
    norm_max: float = 1.1
    max_fraction_outside_norm_bounds: float = 0.01
    history_days: int = 7
    coverage_change_min: float = -0.2
    coverage_change_max: float | None = None
    coverage_change_min_entities: int = 50
    min_population_for_relative_checks: int = 50
    min_fraction_of_previous_retained: float = 0.5
    min_fraction_closer_to_own_previous: float = 0.75
    min_median_cosine_to_previous: float = 0.8
    low_cosine_to_previous: float = 0.5
    max_fraction_below_low_cosine: float = 0.05
    max_dimension_mean_shift: float = 1.0
    dimension_std_ratio_min: float = 0.5
    dimension_std_ratio_max: float = 2.0


@dataclass(frozen=True)
class TrainingSetThresholds:
    label_rate_min: float = 0.0001
    label_rate_max: float = 0.9999
    max_label_rate_difference: float = 0.01
    max_missing_embedding_rate: float = 0.2
    cold_start_hours: float = 48.0
    max_missing_rate_by_feature: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GateThresholds:
    snapshot: SnapshotThresholds = field(default_factory=SnapshotThresholds)
    training_set: TrainingSetThresholds = field(default_factory=TrainingSetThresholds)

    @classmethod
    def load(cls, path: Path | None = None) -> GateThresholds:
        """Read the thresholds file (default ``validation/thresholds.yaml``); unknown keys are errors."""
        path = Path(path) if path is not None else DEFAULT_THRESHOLDS_PATH
        raw = yaml.safe_load(path.read_text()) or {}
        unknown = set(raw) - {"snapshot", "training_set", "compat"}  # compat: derm.experiments.compatibility
        if unknown:
            raise ValueError(f"{path}: unknown sections {sorted(unknown)}")
        return cls(
            snapshot=_section(SnapshotThresholds, raw.get("snapshot") or {}, path),
            training_set=_section(TrainingSetThresholds, raw.get("training_set") or {}, path),
        )


def _section(kind: type, values: dict[str, Any], path: Path) -> Any:
    # A typo in a threshold name must not silently fall back to the default.
    known = {f.name for f in fields(kind)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{path}: unknown {kind.__name__} keys {sorted(unknown)}; expected {sorted(known)}")
    return kind(**values)


def load_thresholds(path: Path | None = None) -> GateThresholds:
    return GateThresholds.load(path)
