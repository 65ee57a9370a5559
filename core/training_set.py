"""The training-set format: a Parquet file whose metadata says what was joined.

A training set is the labelled events of one objective joined point in time to a
feature service (``derm.training.downstream.training_sets`` builds it through
``FeatureStore.get_historical_features``). Its Parquet schema metadata holds a
:class:`TrainingSetInfo` under :data:`METADATA_KEY`, so every later reader (the
trainer, the leakage audit, the ablations) knows the feature service, the feature
refs and the embedding versions without being told.

Example::

    write_training_set(table, info, Path("data/training_sets/ctr/run.parquet"))
    table, info = read_training_set(path)            # info is None for a file written elsewhere
    read_training_set_info(path).embedding_versions  # {"ctr_user": "v1", ...}, without reading rows
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from derm.core.files import atomic_path

METADATA_KEY = b"derm.training_set"
LABEL = "label"


@dataclass(frozen=True)
class TrainingSetInfo:
    """What a training set holds: written into its Parquet metadata."""

    objective: str  # "ctr" | "cvr"
    feature_service: str
    feature_refs: list[str]
    embedding_versions: dict[str, str]  # family -> version
    embedding_dims: dict[str, int]
    window_start: str  # ISO timestamps, [start, end)
    window_end: str
    rows: int = 0
    note: str = ""  # e.g. "leaky: latest snapshot joined regardless of time"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> TrainingSetInfo:
        values = json.loads(raw)
        if "task" in values:  # written by 0.1, which called the objective "task"
            values["objective"] = values.pop("task")
        return cls(**values)

    def with_note(self, note: str) -> TrainingSetInfo:
        return dataclasses.replace(self, note=note)


def write_training_set(table: pa.Table, info: TrainingSetInfo, out_path: Path) -> Path:
    """Write ``table`` with ``info`` in its metadata, atomically (a reader never sees half a file)."""
    out_path = Path(out_path)
    metadata = {**(table.schema.metadata or {}), METADATA_KEY: info.to_json().encode()}
    metadata.pop(b"pandas", None)
    with atomic_path(out_path) as tmp:
        pq.write_table(table.replace_schema_metadata(metadata), tmp)
    return out_path


def read_training_set(path: Path) -> tuple[pa.Table, TrainingSetInfo | None]:
    """The training set's table and its :class:`TrainingSetInfo` (``None`` if written elsewhere)."""
    table = pq.read_table(path)
    return table, _info(table.schema)


def read_training_set_info(path: Path) -> TrainingSetInfo | None:
    """The :class:`TrainingSetInfo` of a training set, from its footer alone."""
    return _info(pq.read_schema(path))


def _info(schema: pa.Schema) -> TrainingSetInfo | None:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return TrainingSetInfo.from_json(raw) if raw else None
