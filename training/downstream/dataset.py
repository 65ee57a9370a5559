"""A training set as PyTorch tensors: transformed once, column by column; batches are index gathers.

Paper: "Decoupled Entity Representation Learning for Pinterest Ads Ranking",
https://arxiv.org/abs/2509.04337.

Example::

    table, info = read_training_set(path)
    train = RankerDataset(table, FeatureTransform(spec))
    for batch in train.loader(batch_size=1024, shuffle=True):  # dict of (B, ...) tensors
        ...
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from derm.core.training_set import LABEL
from derm.training.downstream.ranker import FeatureTransform


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


__all__ = ["PermutationBatchSampler", "RankerDataset", "label_array"]
