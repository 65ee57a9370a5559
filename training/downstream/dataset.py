"""A training set as PyTorch tensors: transformed once, column by column; batches are index gathers.

Paper: "Decoupled Entity Representation Learning for Pinterest Ads Ranking",
https://arxiv.org/abs/2509.04337.

With a sequence encoder, :func:`with_user_sequences` first adds each row's recent engaged
Pins, point in time, from the event log (DuckDB).

Example::

    table, info = read_training_set(path)
    table = with_user_sequences(table, paths.events_dir, length=20)   # only for a sequence encoder
    train = RankerDataset(table, FeatureTransform(spec))
    for batch in train.loader(batch_size=1024, shuffle=True):  # dict of (B, ...) tensors
        ...
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from derm.core.sql import connect
from derm.core.training_set import LABEL
from derm.events.schema import event_columns_sql, event_files, partition_day, read_events_sql
from derm.training.downstream.ranker import SEQUENCE_COLUMN, FeatureTransform


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


def with_user_sequences(table: pa.Table, events_dir: Path, length: int, lookback_days: int = 28) -> pa.Table:
    """``table`` with :data:`~derm.training.downstream.ranker.SEQUENCE_COLUMN` added: per row, the Pins its user
    clicked strictly before the row's ``event_timestamp`` (at most ``length``, most recent first, within
    ``lookback_days``), read from the event log with DuckDB.

    Point in time: an engagement at or after the impression's own time never enters its sequence
    (the impression's own click is the label). Ties in time are ordered by ``event_id``. Ads clicks
    only (``is_ad``): organic engagement reaches the ranker only through the upstream embeddings.

    Args:
        table: rows with ``user_id`` and ``event_timestamp`` (a training set).
        events_dir: the event log.
        length: longest sequence ``L``.
        lookback_days: engagements older than this before the impression are left out.

    Returns:
        The table with a ``list<int64>`` column (empty list for a user without earlier clicks).
    """
    if table.num_rows == 0:
        return table.append_column(SEQUENCE_COLUMN, pa.array([], pa.list_(pa.int64())))
    stamps = table.column("event_timestamp")
    low, high = pc.min_max(stamps).values()
    first, last = (low.as_py() - timedelta(days=lookback_days)).date(), high.as_py().date()
    files = [str(p) for p in event_files(events_dir) if first <= partition_day(p) <= last]
    rows = pa.table(
        {
            "row": pa.array(np.arange(table.num_rows, dtype=np.int64)),
            "user_id": table.column("user_id").cast(pa.int64()),
            "ts": stamps.cast(pa.timestamp("us", tz="UTC")),
        }
    )
    sql = f"""
        WITH clicks AS (  -- ads clicks only: the ranker never sees organic engagement (issue 17)
            SELECT user_id, pin_id, event_timestamp AS ts, event_id
            FROM (SELECT {event_columns_sql(files)} FROM {read_events_sql("files", files)}) WHERE clicked AND is_ad
        ),
        recent AS (
            SELECT r.row, c.pin_id, c.ts, c.event_id
            FROM rows_ r JOIN clicks c
              ON c.user_id = r.user_id AND c.ts < r.ts AND c.ts >= r.ts - to_days($lookback)
            QUALIFY row_number() OVER (PARTITION BY r.row ORDER BY c.ts DESC, c.event_id DESC) <= $length
        )
        SELECT r.row, coalesce(list(x.pin_id ORDER BY x.ts DESC, x.event_id DESC)
                               FILTER (WHERE x.pin_id IS NOT NULL), []::BIGINT[]) AS seq
        FROM rows_ r LEFT JOIN recent x USING (row)
        GROUP BY r.row ORDER BY r.row"""
    with connect() as con:
        con.register("rows_", rows)
        if not files:
            return table.append_column(SEQUENCE_COLUMN, pa.array([[]] * table.num_rows, pa.list_(pa.int64())))
        params = {"files": files, "lookback": int(lookback_days), "length": int(length)}
        seq = con.sql(sql, params=params).to_arrow_table().column("seq")
    return table.append_column(SEQUENCE_COLUMN, seq.cast(pa.list_(pa.int64())))


def label_array(table: pa.Table) -> np.ndarray:
    return table.column(LABEL).to_numpy().astype(np.float64)


__all__ = ["PermutationBatchSampler", "RankerDataset", "label_array", "with_user_sequences"]
