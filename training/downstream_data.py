"""Downstream training sets through Feast, and a columnar PyTorch dataset over them.

Paper: "Decoupled Entity Representation Learning for Pinterest Ads Ranking",
https://arxiv.org/abs/2509.04337.

A training set is the event log's labelled events (DuckDB over
``events/date=*/*.parquet``) used as Feast's entity dataframe, joined point in time
with ``FeatureStore.get_historical_features`` to a feature service: the registered
``ctr_ranker`` / ``cvr_ranker`` (counting views + every family at its promoted
version) or a :class:`feast.FeatureService` built in code from registered views
(ablations). Tasks::

    ctr: every impression, label = clicked
    cvr: every click,      label = converted

The entity dataframe carries ``event_id``, ``event_timestamp``, ``user_id``,
``pin_id``, ``advertiser_id``, ``category_id``, ``surface``, ``day_of_week`` and
``label``; Feast carries them through. The result is written to Parquet, with the
feature service, feature refs and embedding versions in the file's metadata
(key ``derm.training_set``), so any later reader (trainer, leakage audit) knows
what was joined.

Example::

    store = feature_store()
    service = ranker_service(store, "ctr")                      # registered ctr_ranker
    window = default_window(paths, service_families(store, service))
    info = build_training_set(store, paths, "ctr", service, window, out_path)
    table, meta = read_training_set(out_path)
    train = RankerDataset(table.filter(...), FeatureTransform(spec))
    for batch in train.loader(batch_size=1024, shuffle=True):  # dict of (B, ...) tensors
        ...
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from events.schema import event_glob
from materialization.catalog import COUNTING_VIEWS, Catalog, feature_view_name
from pipeline.config import PlatformPaths
from training.ranker import FeatureTransform, embedding_column
from training.snapshot import FAMILIES
from training.upstream_data import OBJECTIVES, day_start, log_days

if TYPE_CHECKING:
    import pandas as pd

METADATA_KEY = b"derm.training_set"
LABEL = "label"
ENTITY_COLUMNS = (
    "event_id",
    "event_timestamp",
    "user_id",
    "pin_id",
    "advertiser_id",
    "category_id",
    "surface",
    "day_of_week",
    LABEL,
)
TASKS = tuple(OBJECTIVES)


@dataclass(frozen=True)
class TrainingSetInfo:
    """What a training set holds: written into its Parquet metadata."""

    task: str
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


# --------------------------------------------------------------------------- entity dataframe


def _connect():
    import duckdb

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    return con


def labelled_events(events_dir: Path, task: str, start: datetime | None = None, end: datetime | None = None):
    """The entity dataframe of ``task``: labelled events in ``[start, end)``, ordered by time then event id.

    Returns:
        pandas DataFrame with :data:`ENTITY_COLUMNS`; ``day_of_week`` is 0 = Monday (UTC),
        ``label`` is int64 0/1.
    """
    if task not in OBJECTIVES:
        raise ValueError(f"unknown task {task!r}: expected one of {TASKS}")
    label, population = OBJECTIVES[task]
    where = [population] if population else []
    if start is not None:
        where.append(f"event_timestamp >= TIMESTAMPTZ '{start.astimezone(UTC).isoformat()}'")
    if end is not None:
        where.append(f"event_timestamp < TIMESTAMPTZ '{end.astimezone(UTC).isoformat()}'")
    query = f"""
        SELECT event_id, event_timestamp, user_id, pin_id, advertiser_id, category_id, surface,
               CAST(isodow(event_timestamp) - 1 AS BIGINT) AS day_of_week,
               CAST({label} AS BIGINT) AS {LABEL}
        FROM read_parquet('{event_glob(events_dir)}')
        {"WHERE " + " AND ".join(where) if where else ""}
        ORDER BY event_timestamp, event_id"""
    frame = _connect().execute(query).df()
    frame["event_timestamp"] = frame["event_timestamp"].dt.tz_convert("UTC")
    return frame


def default_window(paths: PlatformPaths, families: Sequence[tuple[str, str]]) -> tuple[datetime, datetime]:
    """``[start, end)`` of a training set: from when every given (family, version) and the counting
    features have a first snapshot, to the end of the event log."""
    days = log_days(paths.events_dir)
    start = day_start(days[0] + timedelta(days=1))  # counting features of day 0 are stamped end of day 0
    catalog = Catalog(paths.embeddings_offline_dir)
    for family, version in families:
        manifests = catalog.manifests(family, version)
        if manifests:
            start = max(start, min(m.event_timestamp for m in manifests))
    return start, day_start(days[-1] + timedelta(days=1))


def split_time(window: tuple[datetime, datetime], eval_days: int) -> datetime:
    """Temporal split: events before this time train, the last ``eval_days`` days evaluate."""
    end = window[1]
    split = day_start((end - timedelta(microseconds=1)).date() - timedelta(days=eval_days - 1))
    if split <= window[0]:
        raise ValueError(f"window {window[0]} .. {end} too short for {eval_days} evaluation day(s)")
    return split


# --------------------------------------------------------------------------- feature services


def ranker_service(
    store: Any, task: str, families: Sequence[str] | None = None, versions: dict[str, str] | None = None
):
    """The feature service of a ranker.

    Args:
        store: a ``feast.FeatureStore``.
        task: ``"ctr"`` or ``"cvr"``.
        families: ``None`` for the registered ``<task>_ranker`` service; else the embedding
            families to include (``[]``: counting features only), built in code from registered views.
        versions: family -> version for ``families`` (default: each family's version in the
            registered ``<task>_ranker``, i.e. the promoted one).
    """
    from feast import FeatureService

    registered = store.get_feature_service(f"{task}_ranker")
    if families is None:
        return registered
    promoted = dict(service_families(store, registered))
    versions = {**promoted, **(versions or {})}
    views = [store.get_feature_view(name) for name in COUNTING_VIEWS]
    for family in families:
        if family not in versions:
            raise ValueError(f"{family}: no version given and none promoted")
        views.append(store.get_feature_view(feature_view_name(family, versions[family])))
    label = "+".join(f"{f}@{versions[f]}" for f in families) or "none"
    return FeatureService(name=f"{task}_ranker[{label}]", features=views, tags={"kind": "ablation"})


def service_families(store: Any, service: Any) -> list[tuple[str, str]]:
    """``[(family, version)]`` of the embedding views in a feature service, from the views' tags."""
    result = []
    for projection in service.feature_view_projections:
        tags = store.get_feature_view(projection.name).tags
        if tags.get("family") in FAMILIES:
            result.append((tags["family"], tags["model_version"]))
    return result


def _retrievable(store: Any, service: Any) -> Any:
    """The service itself when registered; else its exact feature refs.

    Feast resolves a ``FeatureService`` argument through the registry by name, so a
    service built in code (an ablation variant) is passed as the refs of its projections,
    which selects exactly the same views and columns without touching the shared registry.
    """
    from feast.errors import FeatureServiceNotFoundException

    try:
        registered = store.get_feature_service(service.name)
    except FeatureServiceNotFoundException:
        return service_feature_refs(service)
    return (
        service if service_feature_refs(registered) == service_feature_refs(service) else service_feature_refs(service)
    )


def service_feature_refs(service: Any) -> list[str]:
    return [f"{p.name_to_use()}:{f.name}" for p in service.feature_view_projections for f in p.features]


# --------------------------------------------------------------------------- training sets


def build_training_set(
    store: Any,
    paths: PlatformPaths,
    task: str,
    service: Any,
    window: tuple[datetime, datetime],
    out_path: Path,
    entity_df: pd.DataFrame | None = None,
) -> TrainingSetInfo:
    """Join the labelled events of ``window`` to ``service`` point in time; write Parquet to ``out_path``.

    Args:
        store: a ``feast.FeatureStore``.
        paths: platform locations (event log).
        task: ``"ctr"`` or ``"cvr"``.
        service: a ``feast.FeatureService`` (see :func:`ranker_service`).
        window: ``[start, end)`` of the events.
        out_path: the Parquet file to write.
        entity_df: the labelled events (default: :func:`labelled_events` over ``window``).

    Returns:
        The :class:`TrainingSetInfo`, also stored in the file's metadata.
    """
    if entity_df is None:
        entity_df = labelled_events(paths.events_dir, task, *window)
    families = service_families(store, service)
    dims = {f: int(store.get_feature_view(feature_view_name(f, v)).tags.get("dim", 0)) for f, v in families}
    table = store.get_historical_features(entity_df=entity_df, features=_retrievable(store, service)).to_arrow()
    # Offline stores (stock and ASOF) return rows in no particular order; a fixed order makes the file reproducible.
    order = pc.sort_indices(table, [("event_timestamp", "ascending"), ("event_id", "ascending")])
    table = table.take(order)
    info = TrainingSetInfo(
        task=task,
        feature_service=service.name,
        feature_refs=service_feature_refs(service),
        embedding_versions=dict(families),
        embedding_dims=dims,
        window_start=window[0].isoformat(),
        window_end=window[1].isoformat(),
        rows=table.num_rows,
    )
    write_training_set(table, info, out_path)
    return info


def write_training_set(table: pa.Table, info: TrainingSetInfo, out_path: Path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {**(table.schema.metadata or {}), METADATA_KEY: info.to_json().encode()}
    metadata.pop(b"pandas", None)
    pq.write_table(table.replace_schema_metadata(metadata), out_path)
    return out_path


def read_training_set(path: Path) -> tuple[pa.Table, TrainingSetInfo | None]:
    """The training set's table and its :class:`TrainingSetInfo` (``None`` if written elsewhere)."""
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    return table, (TrainingSetInfo(**json.loads(raw)) if raw else None)


def embedding_columns(info: TrainingSetInfo) -> list[str]:
    return [embedding_column(f) for f in info.embedding_versions]


def gate_training_set(table: pa.Table, info: TrainingSetInfo, docs_dir: Path | None = None):
    """Run the training-set gate (:func:`validation.gate.validate_training_set`) on a training set."""
    from validation.gate import validate_training_set

    frame = table.to_pandas()
    for column in embedding_columns(info):  # list cells stay lists (or None): the gate measures their length
        frame[column] = table.column(column).to_pylist()
    return validate_training_set(
        frame,
        label=LABEL,
        embedding_columns=embedding_columns(info),
        required_columns=["event_id", "user_id", "pin_id", "advertiser_id", "category_id", "surface"],
        window=(datetime.fromisoformat(info.window_start), datetime.fromisoformat(info.window_end)),
        docs_dir=docs_dir,
    )


def split_table(table: pa.Table, split: datetime) -> tuple[pa.Table, pa.Table]:
    """``(train, eval)``: rows before ``split`` and rows at or after it."""
    stamps = table.column("event_timestamp")
    cutoff = pa.scalar(split, type=stamps.type)
    before = pc.less(stamps, cutoff)
    return table.filter(before), table.filter(pc.invert(before))


# --------------------------------------------------------------------------- dataset


class RankerDataset(Dataset):
    """A training set as tensors: transformed once, column by column; batches are index gathers.

    ``__getitems__`` returns a whole batch (dict of tensors), so a ``DataLoader`` with a
    batch sampler does one gather per tensor per batch and no per-row Python.

    Args:
        table: the training-set rows (Arrow table or anything :class:`FeatureTransform` reads).
        transform: the ranker's feature transformation.
        label: label column.

    Example::

        data = RankerDataset(table, FeatureTransform(spec))
        batch = data.__getitems__([0, 5, 9])   # {"sparse": (3, S), "dense": (3, C), ..., "label": (3,)}
    """

    def __init__(self, table: Any, transform: FeatureTransform, label: str = LABEL) -> None:
        columns = {name: table.column(name) for name in table.column_names} if isinstance(table, pa.Table) else table
        self.tensors = transform(columns, label=label)

    def __len__(self) -> int:
        return int(self.tensors["label"].shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}

    def __getitems__(self, indices: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return {k: v.index_select(0, index) for k, v in self.tensors.items()}

    def loader(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
        """A ``DataLoader`` yielding dicts of ``(B, ...)`` tensors (seeded shuffling, a new order every epoch)."""
        sampler = PermutationBatchSampler(len(self), batch_size, shuffle=shuffle, seed=seed)
        return DataLoader(self, batch_sampler=sampler, collate_fn=_batch_identity)


class PermutationBatchSampler(Sampler):
    """Batches of row indices as tensors: slices of one ``randperm`` per epoch (no per-row Python)."""

    def __init__(self, n: int, batch_size: int, shuffle: bool = True, seed: int = 0) -> None:
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        yield from order.split(self.batch_size)


def _batch_identity(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch


def label_array(table: pa.Table) -> np.ndarray:
    return table.column(LABEL).to_numpy().astype(np.float64)


__all__ = [
    "ENTITY_COLUMNS",
    "LABEL",
    "METADATA_KEY",
    "TASKS",
    "PermutationBatchSampler",
    "RankerDataset",
    "TrainingSetInfo",
    "build_training_set",
    "default_window",
    "embedding_columns",
    "gate_training_set",
    "label_array",
    "labelled_events",
    "ranker_service",
    "read_training_set",
    "service_families",
    "service_feature_refs",
    "split_table",
    "split_time",
    "write_training_set",
]
