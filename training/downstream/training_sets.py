"""Downstream training sets: labelled events joined point in time to a feature service through Feast.

Paper: "Decoupled Entity Representation Learning for Pinterest Ads Ranking",
https://arxiv.org/abs/2509.04337.

A training set is the event log's labelled events (DuckDB over
``events/date=*/*.parquet``) used as Feast's entity dataframe, joined point in time
with ``FeatureStore.get_historical_features`` to a feature service: the registered
``ctr_ranker`` / ``cvr_ranker`` (counting views + every family at its promoted
version) or a :class:`feast.FeatureService` built in code from registered views
(ablations). The rankers learn from ads impressions only (``is_ad``; organic engagement
reaches them only through the upstream embeddings). Objectives::

    ctr: every ads impression, label = clicked
    cvr: every ads click,      label = converted, as known at the label cut-off

Label timing. A conversion is a label only once it is known
(:data:`derm.events.schema.CONVERSION_KNOWN_SQL`): a CVR row is labelled 1 when its
conversion became known within :data:`ATTRIBUTION_WINDOW` of the click *and* before
the set's label cut-off, which is the end of the set's window (the moment the set is
built for). ``label_timestamp`` records when each positive label became known (the
click's time for CTR; null on negatives); :func:`labels_known_at` relabels a set as
known at an earlier cut-off. The last hours of a set have fewer known conversions
than they will have: delayed feedback, as in production.

A time split (:func:`split_table`) keeps the set's labels on both sides: relabelling
the training side as known at the split would hide the conversions of its last hours
from training *and* from the validation day that early stopping, calibration and the
"no harm" check rely on (on the tiny preset that sent the CVR ranker back to the base
rate); the training rows' labels carry no information on the evaluation rows' events.

The entity dataframe carries ``event_id``, ``event_timestamp``, ``user_id``,
``pin_id``, ``advertiser_id``, ``category_id``, ``surface``, ``day_of_week`` and
``label``; Feast carries them through. The result is written to Parquet, with the
feature service, feature refs and embedding versions in the file's metadata
(:mod:`derm.core.training_set`), so any later reader (trainer, leakage audit) knows
what was joined; :mod:`derm.training.downstream.dataset` turns it into tensors.

Example::

    store = feature_store()
    service = ranker_service(store, "ctr")                      # registered ctr_ranker
    window = default_window(paths, service_families(store, service))
    info = build_training_set(store, paths, "ctr", service, window, out_path)
    table, meta = read_training_set(out_path)
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from derm.core.days import day_end, day_start
from derm.core.naming import COUNTING_VIEWS, FAMILIES, OBJECTIVES, feature_name, feature_view_name, ranker_service_name
from derm.core.paths import PlatformPaths
from derm.core.sql import connect, ident
from derm.core.training_set import LABEL, TrainingSetInfo, write_training_set
from derm.events.schema import (
    CONVERSION_KNOWN_SQL,
    event_columns_sql,
    event_files,
    log_days,
    partition_day,
    read_events_sql,
)
from derm.materialization.catalog import Catalog

if TYPE_CHECKING:
    import pandas as pd

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
LABEL_TIMESTAMP = "label_timestamp"  # when a positive label became known (null on negatives)
# A conversion known later than this after its click is not attributed to it (a common ads attribution window).
ATTRIBUTION_WINDOW = timedelta(days=7)


# --------------------------------------------------------------------------- entity dataframe


def labelled_events(
    events_dir: Path,
    objective: str,
    start: datetime | None = None,
    end: datetime | None = None,
    label_cutoff: datetime | None = None,
):
    """The entity dataframe of ``objective``: labelled ads events in ``[start, end)``, ordered by time then event id.

    Args:
        events_dir: the event log.
        objective: ``"ctr"`` or ``"cvr"``.
        start, end: the window (``None``: unbounded).
        label_cutoff: labels as known at this time (default ``end``; ``None`` with no ``end``: every
            conversion in the log, within :data:`ATTRIBUTION_WINDOW`).

    Returns:
        pandas DataFrame with :data:`ENTITY_COLUMNS` and :data:`LABEL_TIMESTAMP`; ``day_of_week`` is
        0 = Monday (UTC), ``label`` is int64 0/1.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: expected one of {sorted(OBJECTIVES)}")
    label, population = OBJECTIVES[objective]  # column names the platform defines, not input
    if label == "converted":
        known = CONVERSION_KNOWN_SQL
        positive = f"converted AND {known} <= event_timestamp + $attribution AND ($cutoff IS NULL OR {known} < $cutoff)"
    else:  # a click is known when it happens
        known, positive = "event_timestamp", ident(label)
    first = start.date() if start is not None else None
    last = (end - timedelta(microseconds=1)).date() if end is not None else None
    files = [
        str(path)
        for path in event_files(events_dir)
        if (first is None or partition_day(path) >= first) and (last is None or partition_day(path) <= last)
    ]
    frame_columns = [*ENTITY_COLUMNS, LABEL_TIMESTAMP]
    if not files:
        return _empty_entity_frame(frame_columns)
    query = f"""
        SELECT event_id, event_timestamp, user_id, pin_id, advertiser_id, category_id, surface,
               CAST(isodow(event_timestamp) - 1 AS BIGINT) AS day_of_week,
               CAST(coalesce({positive}, false) AS BIGINT) AS {ident(LABEL)},
               CASE WHEN {positive} THEN {known} END AS {ident(LABEL_TIMESTAMP)}
        FROM (SELECT {event_columns_sql(files)} FROM {read_events_sql("files", files)})
        WHERE is_ad AND {ident(population) if population else "true"}
          AND ($start IS NULL OR event_timestamp >= $start) AND ($end IS NULL OR event_timestamp < $end)
        ORDER BY event_timestamp, event_id"""
    cutoff = label_cutoff if label_cutoff is not None else end
    params = {"files": files, "start": start, "end": end}
    if label == "converted":
        params.update(cutoff=cutoff, attribution=ATTRIBUTION_WINDOW)
    with connect() as con:
        frame = con.execute(query, params).df()
    for column in ("event_timestamp", LABEL_TIMESTAMP):
        frame[column] = frame[column].dt.tz_convert("UTC")
    return frame


def _empty_entity_frame(columns: list[str]):
    import pandas as pd

    frame = pd.DataFrame({column: pd.Series(dtype="int64") for column in columns})
    for column in ("event_timestamp", LABEL_TIMESTAMP):
        frame[column] = pd.Series(dtype="datetime64[us, UTC]")
    frame["surface"] = pd.Series(dtype="object")
    return frame


def default_window(paths: PlatformPaths, families: Sequence[tuple[str, str]]) -> tuple[datetime, datetime]:
    """``[start, end)`` of a training set: from when every given (family, version) and the counting
    features have a first snapshot, to the end of the event log."""
    days = log_days(paths.events_dir)
    start = day_end(days[0])  # counting features of day 0 are stamped end of day 0
    catalog = Catalog(paths.embeddings_offline_dir)
    for family, version in families:
        manifests = catalog.manifests(family, version)
        if manifests:
            start = max(start, min(m.event_timestamp for m in manifests))
    return start, day_end(days[-1])


def split_time(window: tuple[datetime, datetime], eval_days: int) -> datetime:
    """Temporal split: events before this time train, the last ``eval_days`` days evaluate."""
    end = window[1]
    split = day_start((end - timedelta(microseconds=1)).date() - timedelta(days=eval_days - 1))
    if split <= window[0]:
        raise ValueError(f"window {window[0]} .. {end} too short for {eval_days} evaluation day(s)")
    return split


# --------------------------------------------------------------------------- feature services


def ranker_service(
    store: Any, objective: str, families: Sequence[str] | None = None, versions: dict[str, str] | None = None
):
    """The feature service of a ranker.

    Args:
        store: a ``feast.FeatureStore``.
        objective: ``"ctr"`` or ``"cvr"``.
        families: ``None`` for the registered ``<objective>_ranker`` service; else the embedding
            families to include (``[]``: counting features only), built in code from registered views.
        versions: family -> version for ``families`` (default: each family's version in the
            registered ``<objective>_ranker``, i.e. the promoted one).
    """
    from feast import FeatureService

    registered = store.get_feature_service(ranker_service_name(objective))
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
    return FeatureService(name=f"{ranker_service_name(objective)}[{label}]", features=views, tags={"kind": "ablation"})


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
    objective: str,
    service: Any,
    window: tuple[datetime, datetime],
    out_path: Path,
    entity_df: pd.DataFrame | None = None,
) -> TrainingSetInfo:
    """Join the labelled events of ``window`` to ``service`` point in time; write Parquet to ``out_path``.

    Args:
        store: a ``feast.FeatureStore``.
        paths: platform locations (event log).
        objective: ``"ctr"`` or ``"cvr"``.
        service: a ``feast.FeatureService`` (see :func:`ranker_service`).
        window: ``[start, end)`` of the events.
        out_path: the Parquet file to write.
        entity_df: the labelled events (default: :func:`labelled_events` over ``window``).

    Returns:
        The :class:`TrainingSetInfo`, also stored in the file's metadata.
    """
    if entity_df is None:
        entity_df = labelled_events(paths.events_dir, objective, *window)
    families = service_families(store, service)
    dims = {f: int(store.get_feature_view(feature_view_name(f, v)).tags.get("dim", 0)) for f, v in families}
    label_times = None
    if LABEL_TIMESTAMP in entity_df.columns:  # kept out of Feast's join, put back by event id
        label_times = pa.Table.from_pandas(entity_df[["event_id", LABEL_TIMESTAMP]], preserve_index=False)
        entity_df = entity_df.drop(columns=[LABEL_TIMESTAMP])
    table = store.get_historical_features(entity_df=entity_df, features=_retrievable(store, service)).to_arrow()
    if label_times is not None:
        label_times = label_times.cast(
            pa.schema([pa.field("event_id", pa.int64()), pa.field(LABEL_TIMESTAMP, pa.timestamp("us", tz="UTC"))])
        )
        # A lookup, not Table.join: Acero's join refuses the list<float> embedding columns.
        position = pc.index_in(table.column("event_id"), value_set=label_times.column("event_id"))
        table = table.append_column(LABEL_TIMESTAMP, label_times.column(LABEL_TIMESTAMP).take(position))
    # Offline stores (stock and ASOF) return rows in no particular order; a fixed order makes the file reproducible.
    order = pc.sort_indices(table, [("event_timestamp", "ascending"), ("event_id", "ascending")])
    table = table.take(order)
    info = TrainingSetInfo(
        objective=objective,
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


def embedding_columns(info: TrainingSetInfo) -> list[str]:
    return [feature_name(f) for f in info.embedding_versions]


def gate_training_set(
    table: pa.Table,
    info: TrainingSetInfo,
    docs_dir: Path,
    thresholds_path: Path | None = None,
    events_dir: Path | None = None,
):
    """Run the training-set gate (:func:`derm.validation.gate.validate_training_set`) on a training set.

    ``thresholds_path`` is the gate's YAML (default: the thresholds shipped with the gate).
    Each embedding column is judged with its entity (``ctr_user_emb`` -> ``user_id``), so cold-start
    rows (entity first seen in the set less than ``cold_start_hours`` earlier) may miss it.
    With ``events_dir`` the label rate must match, within ``max_label_rate_difference``, the rate of
    the same labelled events (objective and window of ``info``) in the event log.
    """
    from derm.core.naming import join_key
    from derm.validation.gate import load_thresholds, validate_training_set

    window = (datetime.fromisoformat(info.window_start), datetime.fromisoformat(info.window_end))
    expected_label_rate = None
    if events_dir is not None:
        events = labelled_events(events_dir, info.objective, *window)
        expected_label_rate = float(events[LABEL].mean()) if len(events) else None
    frame = table.to_pandas()
    for column in embedding_columns(info):  # list cells stay lists (or None): the gate measures their length
        frame[column] = table.column(column).to_pylist()
    return validate_training_set(
        frame,
        label=LABEL,
        embedding_columns=embedding_columns(info),
        required_columns=["event_id", "user_id", "pin_id", "advertiser_id", "category_id", "surface"],
        window=window,
        thresholds=load_thresholds(thresholds_path),
        docs_dir=docs_dir,
        entity_columns={feature_name(family): join_key(family) for family in info.embedding_versions},
        expected_label_rate=expected_label_rate,
    )


def split_table(table: pa.Table, split: datetime) -> tuple[pa.Table, pa.Table]:
    """``(train, eval)``: rows before ``split`` and rows at or after it.

    Both sides keep the labels known at the set's cut-off (see the module docstring).
    """
    stamps = table.column("event_timestamp")
    cutoff = pa.scalar(split, type=stamps.type)
    before = pc.less(stamps, cutoff)
    return table.filter(before), table.filter(pc.invert(before))


def labels_known_at(table: pa.Table, cutoff: datetime) -> pa.Table:
    """``table`` relabelled as known at ``cutoff`` (an earlier cut-off than the set's): a positive whose
    :data:`LABEL_TIMESTAMP` is at or after ``cutoff`` becomes a negative, and its label time is dropped.

    A table without :data:`LABEL_TIMESTAMP` (a set written before label times) is returned as it is.
    """
    if LABEL_TIMESTAMP not in table.column_names or not table.num_rows:
        return table
    times = table.column(LABEL_TIMESTAMP)
    known = pc.fill_null(pc.less(times, pa.scalar(cutoff, type=times.type)), False)
    labels = table.column(LABEL)
    table = table.set_column(
        table.schema.get_field_index(LABEL), LABEL, pc.if_else(known, labels, pa.scalar(0, type=labels.type))
    )
    return table.set_column(
        table.schema.get_field_index(LABEL_TIMESTAMP),
        LABEL_TIMESTAMP,
        pc.if_else(known, times, pa.scalar(None, type=times.type)),
    )


__all__ = [
    "ATTRIBUTION_WINDOW",
    "ENTITY_COLUMNS",
    "LABEL_TIMESTAMP",
    "build_training_set",
    "default_window",
    "embedding_columns",
    "gate_training_set",
    "labelled_events",
    "labels_known_at",
    "ranker_service",
    "service_families",
    "service_feature_refs",
    "split_table",
    "split_time",
]
