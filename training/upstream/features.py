"""Features and datasets for DERM upstream training and the daily embedding export.

Paper: "Decoupled Entity Representation Learning for Pinterest Ads Ranking",
https://arxiv.org/abs/2509.04337.

All features are computed with DuckDB straight from the day-partitioned event
log and are point-in-time correct: an entity's features *as of* a cutoff only
read events strictly before it.

* Training examples of day ``t`` are that day's events (impressions for CTR,
  clicks for CVR) joined to entity features as of ``t 00:00 UTC``: nothing from
  day ``t`` itself leaks into the inputs.
* The export for day ``t`` embeds every entity active in the last
  ``active_window_days`` with features as of ``t+1 00:00 UTC`` (end of day ``t``),
  which is before the snapshot becomes available.
* Labels have times too: every relation over a window ``[start, end)`` marks a row
  ``converted`` only when its conversion was known before ``end``
  (:data:`derm.events.schema.CONVERSION_KNOWN_SQL`). Day ``t``'s CVR examples are
  labelled with the conversions known by the end of day ``t``, when the day is
  trained; ``n_conv`` counts conversions known before the cutoff.
* Upstream models learn from every row of the log: ads impressions and organic
  engagement (``is_ad``) alike; that is the broader data the rankers never see.

Entity features: log1p of impressions, clicks and conversions in the
``count_window_days`` before the cutoff, and for users the last ``seq_len``
clicked Pin ids in that window (most recent first, ``-1``-padded).

Example::

    arrays = training_arrays(events_dir, date(2026, 1, 3), "ctr", FeatureConfig())
    dataset = UpstreamDataset(arrays)
    batch = dataset[torch.arange(256)]    # dict of (256, ...) tensors
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from derm.core.days import day_end, day_start
from derm.core.naming import OBJECTIVES
from derm.core.sql import connect, ident
from derm.events.schema import (
    CONVERSION_KNOWN_SQL,
    SURFACES,
    event_columns_sql,
    event_files,
    latest_pin_attributes_sql,
    partition_day,
    read_events_sql,
)


@dataclass(frozen=True)
class FeatureConfig:
    count_window_days: int = 28  # counting features and click sequence look this far back
    seq_len: int = 20  # recent clicked Pins per user (the user tower pools any length)


def files_between(events_dir: Path, start: datetime, end: datetime) -> list[Path]:
    """Event files whose day overlaps ``[start, end)`` (partition pruning before DuckDB opens anything)."""
    first, last = start.date(), (end - timedelta(microseconds=1)).date()
    return [p for p in event_files(events_dir) if first <= partition_day(p) <= last]


_Params = dict[str, object]

# The contract accepts any time unit (pandas writes nanoseconds); the relations below carry microseconds,
# truncated (see EVENT_TIMESTAMP_US_SQL), so ``epoch_us`` and the rest see one type.


def _events_sql(name: str, files: list[Path], start: datetime, end: datetime) -> tuple[str, _Params]:
    """A relation over the events in ``[start, end)``, with its parameters (named ``<name>_*`` so that
    relations over other windows can share a query); an empty, correctly typed one when no file overlaps.

    ``converted`` is true only for a conversion known before ``end``: nothing read through a window
    sees a label that was not known when the window closed."""
    if not files:
        return (
            "(SELECT NULL::BIGINT AS event_id, NULL::TIMESTAMPTZ AS event_timestamp, NULL::BIGINT AS user_id, "
            "NULL::BIGINT AS pin_id, NULL::BIGINT AS advertiser_id, NULL::BIGINT AS category_id, "
            "NULL::VARCHAR AS surface, NULL::BOOLEAN AS clicked, NULL::BOOLEAN AS converted, "
            "NULL::BOOLEAN AS is_ad LIMIT 0)"
        ), {}
    sql = (
        "(SELECT event_id, event_timestamp, user_id, pin_id, advertiser_id, category_id, surface, clicked, "
        f"converted AND {CONVERSION_KNOWN_SQL} < ${name}_end AS converted, is_ad "
        f"FROM (SELECT {event_columns_sql(files)} "
        f"FROM {read_events_sql(f'{name}_files', files)} "
        f"WHERE event_timestamp >= ${name}_start AND event_timestamp < ${name}_end))"
    )
    params = {f"{name}_files": [str(p) for p in files], f"{name}_start": start, f"{name}_end": end}
    return sql, params


def window_events_sql(events_dir: Path, name: str, start: datetime, end: datetime) -> tuple[str, _Params]:
    """:func:`_events_sql` over the files of ``[start, end)``."""
    return _events_sql(name, files_between(events_dir, start, end), start, end)


def _stats_sql(events_dir: Path, entity: str, cutoff: datetime, cfg: FeatureConfig) -> tuple[str, _Params]:
    """Per-entity counting features (and the user click sequence) from ``[cutoff - window, cutoff)``."""
    start, name = cutoff - timedelta(days=cfg.count_window_days), f"{entity}_stats"
    events, params = window_events_sql(events_dir, name, start, cutoff)
    key = ident(f"{entity}_id")
    counts = (
        f"SELECT {key}, ln(1 + count(*)) AS n_imp, ln(1 + count(*) FILTER (WHERE clicked)) AS n_click, "
        f"ln(1 + count(*) FILTER (WHERE converted)) AS n_conv FROM {events} GROUP BY {key}"
    )
    if entity == "pin":
        return counts, params
    # Ties broken by event_id so the sequence is deterministic.
    sql = f"""
        SELECT c.*, coalesce(s.seq, []::BIGINT[]) AS seq
        FROM ({counts}) c
        LEFT JOIN (
            SELECT user_id, list(pin_id ORDER BY event_timestamp DESC, event_id DESC) AS seq
            FROM (
                SELECT user_id, pin_id, event_timestamp, event_id FROM {events} WHERE clicked
                QUALIFY row_number() OVER (PARTITION BY user_id ORDER BY event_timestamp DESC, event_id DESC)
                    <= ${name}_seq_len
            ) GROUP BY user_id
        ) s USING (user_id)"""
    return sql, {**params, f"{name}_seq_len": int(cfg.seq_len)}


def pad_sequences(sequences: pa.Array, seq_len: int) -> np.ndarray:
    """A list<int64> column to a ``(N, seq_len)`` int64 array, ``-1``-padded on the right."""
    sequences = sequences.combine_chunks() if isinstance(sequences, pa.ChunkedArray) else sequences
    n = len(sequences)
    out = np.full((n, seq_len), -1, dtype=np.int64)
    if n == 0:
        return out
    lengths = np.minimum(sequences.value_lengths().fill_null(0).to_numpy(zero_copy_only=False), seq_len)
    offsets = sequences.offsets.to_numpy()[:-1]
    values = sequences.values.to_numpy(zero_copy_only=False)
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, cols] = values[np.repeat(offsets, lengths) + cols]
    return out


def _counts(table: pa.Table | pa.RecordBatch, prefix: str = "") -> np.ndarray:
    columns = [f"{prefix}n_imp", f"{prefix}n_click", f"{prefix}n_conv"]
    return np.stack(
        [table.column(c).fill_null(0.0).to_numpy(zero_copy_only=False).astype(np.float32) for c in columns], axis=1
    )  # (N, 3)


def training_arrays(events_dir: Path, day: date, objective: str, cfg: FeatureConfig) -> dict[str, np.ndarray]:
    """The examples of ``day`` for ``objective`` ("ctr" or "cvr") with point-in-time features.

    Returns:
        Column arrays, one row per example in time order: ``user_id (N,)``,
        ``user_counts (N, 3)``, ``user_seq (N, L)``, ``pin_id``, ``category_id``,
        ``advertiser_id``, ``pin_counts (N, 3)``, ``surface``, ``day_of_week`` (0 = Monday),
        ``label (N,)`` float32, ``pin_logq (N,)`` float32 (log share of the Pin among the
        day's positives, ``0`` on negatives) and ``event_timestamp (N,)`` int64 microseconds.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: expected one of {sorted(OBJECTIVES)}")
    label, example_filter = OBJECTIVES[objective]
    start, end = day_start(day), day_end(day)
    events, params = window_events_sql(events_dir, "examples", start, end)
    users, user_params = _stats_sql(events_dir, "user", start, cfg)
    pins, pin_params = _stats_sql(events_dir, "pin", start, cfg)
    where = f"WHERE e.{ident(example_filter)}" if example_filter else ""
    label = ident(label)
    sql = f"""
        WITH ex AS (SELECT * FROM {events} e {where}),
        q AS (
            SELECT pin_id, ln(count(*) / sum(count(*)) OVER ()) AS logq FROM ex WHERE {label} GROUP BY pin_id
        )
        SELECT e.user_id, e.pin_id, e.category_id, e.advertiser_id,
               list_position($surfaces, e.surface) - 1 AS surface, isodow(e.event_timestamp) - 1 AS day_of_week,
               e.{label}::FLOAT AS label, CASE WHEN e.{label} THEN q.logq ELSE 0 END::FLOAT AS pin_logq,
               epoch_us(e.event_timestamp) AS ts_us,
               u.n_imp AS u_n_imp, u.n_click AS u_n_click, u.n_conv AS u_n_conv,
               coalesce(u.seq, []::BIGINT[]) AS seq,
               p.n_imp AS p_n_imp, p.n_click AS p_n_click, p.n_conv AS p_n_conv
        FROM ex e
        LEFT JOIN ({users}) u USING (user_id)
        LEFT JOIN ({pins}) p USING (pin_id)
        LEFT JOIN q USING (pin_id)
        ORDER BY e.event_timestamp, e.event_id"""
    params = {**params, **user_params, **pin_params, "surfaces": list(SURFACES)}
    with connect() as con:
        table = con.sql(sql, params=params).to_arrow_table()

    def col(name: str, dtype: type) -> np.ndarray:
        return table.column(name).to_numpy(zero_copy_only=False).astype(dtype)

    return {
        "user_id": col("user_id", np.int64),
        "user_counts": _counts(table, "u_"),
        "user_seq": pad_sequences(table.column("seq"), cfg.seq_len),
        "pin_id": col("pin_id", np.int64),
        "category_id": col("category_id", np.int64),
        "advertiser_id": col("advertiser_id", np.int64),
        "pin_counts": _counts(table, "p_"),
        "surface": col("surface", np.int64),
        "day_of_week": col("day_of_week", np.int64),
        "label": col("label", np.float32),
        "pin_logq": col("pin_logq", np.float32),
        "event_timestamp": col("ts_us", np.int64),
    }


class UpstreamDataset(torch.utils.data.Dataset):
    """Training examples of :func:`training_arrays` as tensors; indexing with an index tensor gives a batch.

    Example::

        ds = UpstreamDataset(arrays)
        for idx in torch.randperm(len(ds), generator=g).split(512):
            batch = ds[idx]                       # {"user_id": (512,), "user_seq": (512, L), ...}
    """

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        self._len = len(arrays["label"])

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int | torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}

    # DataLoader with a BatchSampler fetches a whole batch in one call.
    __getitems__ = __getitem__


def entity_feature_batches(
    events_dir: Path,
    entity: str,
    day: date,
    cfg: FeatureConfig,
    active_window_days: int = 90,
    batch_rows: int = 65_536,
) -> Iterator[dict[str, np.ndarray]]:
    """Features of every entity active in the window ending with ``day``, as of end of ``day``, in id order.

    Streams DuckDB's result in batches of ``batch_rows`` so memory stays bounded
    whatever the number of entities.

    Yields:
        For ``"user"``: ``user_id (n,)``, ``user_counts (n, 3)``, ``user_seq (n, L)``;
        for ``"pin"``: ``pin_id``, ``category_id``, ``advertiser_id`` (latest seen), ``pin_counts (n, 3)``.
    """
    cutoff = day_end(day)
    active_start = cutoff - timedelta(days=active_window_days)
    events, params = window_events_sql(events_dir, "active", active_start, cutoff)
    key = ident(f"{entity}_id")
    if entity == "user":
        active = f"SELECT DISTINCT user_id FROM {events}"
        extra = "coalesce(s.seq, []::BIGINT[]) AS seq"
    elif entity == "pin":
        active = latest_pin_attributes_sql(events)
        extra = "a.category_id, a.advertiser_id"
    else:
        raise ValueError(f"unknown entity {entity!r}: expected 'user' or 'pin'")
    stats, stats_params = _stats_sql(events_dir, entity, cutoff, cfg)
    sql = f"""
        SELECT a.{key}, s.n_imp, s.n_click, s.n_conv, {extra}
        FROM ({active}) a LEFT JOIN ({stats}) s USING ({key})
        ORDER BY a.{key}"""
    # The connection stays open while the caller consumes the stream; closing the generator closes it.
    with connect() as con:
        for batch in con.sql(sql, params={**params, **stats_params}).to_arrow_reader(batch_rows):
            if batch.num_rows == 0:
                continue
            ids = batch.column(f"{entity}_id").to_numpy(zero_copy_only=False).astype(np.int64)
            if entity == "user":
                yield {
                    "user_id": ids,
                    "user_counts": _counts(batch),
                    "user_seq": pad_sequences(batch.column("seq"), cfg.seq_len),
                }
            else:
                yield {
                    "pin_id": ids,
                    "category_id": batch.column("category_id").to_numpy(zero_copy_only=False).astype(np.int64),
                    "advertiser_id": batch.column("advertiser_id").to_numpy(zero_copy_only=False).astype(np.int64),
                    "pin_counts": _counts(batch),
                }


def events_used_window(
    events_dir: Path, day: date, cfg: FeatureConfig, active_window_days: int
) -> tuple[datetime, datetime] | None:
    """Oldest and newest event read to train on and export ``day``; ``None`` when there is none."""
    end = day_end(day)
    start = end - timedelta(days=max(active_window_days, cfg.count_window_days + 1, 1))
    events, params = window_events_sql(events_dir, "used", start, end)
    with connect() as con:
        low, high = con.execute(f"SELECT min(event_timestamp), max(event_timestamp) FROM {events}", params).fetchone()
    if low is None:
        return None
    return low.astimezone(UTC), high.astimezone(UTC)
