"""Benchmark P4: downstream training samples/s through the DataLoader vs the same tensors in memory.

Writes a synthetic training set shaped like the one ``get_historical_features``
returns for ``ctr_ranker`` (ids, context, 12 counting features with nulls, four
64-d embedding columns with missing rows, label) to Parquet, loads it into a
:class:`derm.training.downstream.training_sets.RankerDataset` (columnar -> tensors once), then
times one shuffled epoch of batches

* through ``RankerDataset.loader`` (``DataLoader`` + batch sampler + ``__getitems__``), and
* by gathering the same tensors directly with ``randperm(...).split(batch_size)``,

and reports the medians over ``repeats`` and their ratio (target >= 0.8).

Usage::

    python -m bench.dataloader --rows 1000000 --repeats 5

Example::

    from bench.dataloader import run
    result = run(rows=20_000, repeats=3)   # {"loader_samples_per_s": ..., "ratio": ...}
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FAMILY_DIMS = {"ctr_user": 64, "ctr_pin": 64, "cvr_user": 64, "cvr_pin": 64}


def synthetic_training_set(rows: int, seed: int = 0, missing_rate: float = 0.05) -> pa.Table:
    """A training-set table with the ranker's columns (embeddings as list<float32>, some null)."""
    from derm.core.naming import all_counting_features, feature_name
    from derm.events.schema import SURFACES

    rng = np.random.default_rng(seed)
    columns: dict[str, pa.Array] = {
        "event_id": pa.array(np.arange(rows, dtype=np.int64)),
        "user_id": pa.array(rng.integers(0, 1_000_000, rows)),
        "pin_id": pa.array(rng.integers(0, 200_000, rows)),
        "advertiser_id": pa.array(rng.integers(0, 5_000, rows)),
        "category_id": pa.array(rng.integers(0, 50, rows)),
        "surface": pa.array(np.asarray(SURFACES, dtype=object)[rng.integers(0, len(SURFACES), rows)]),
        "day_of_week": pa.array(rng.integers(0, 7, rows)),
        "label": pa.array(rng.random(rows) < 0.1).cast(pa.int64()),
    }
    for name in all_counting_features():
        values = rng.poisson(5.0, rows).astype(np.int64)
        columns[name] = pa.array(values, mask=rng.random(rows) < missing_rate)
    for family, dim in FAMILY_DIMS.items():
        flat = pa.array(rng.normal(size=rows * dim).astype(np.float32))
        offsets = pa.array(np.arange(0, (rows + 1) * dim, dim, dtype=np.int32))
        mask = pa.array(rng.random(rows) < missing_rate)
        columns[feature_name(family)] = pa.ListArray.from_arrays(offsets, flat, mask=mask)
    return pa.table(columns)


def _spec():
    from derm.training.downstream.ranker import RankerSpec

    return RankerSpec(
        objective="ctr",
        feature_service="bench",
        feature_refs=[],
        embedding_versions=dict.fromkeys(FAMILY_DIMS, "v1"),
        embedding_dims=dict(FAMILY_DIMS),
    )


def run(rows: int = 1_000_000, repeats: int = 5, batch_size: int = 4096) -> dict:
    """Times a shuffled epoch through the DataLoader and in memory, ``repeats`` times each; returns medians."""
    import torch

    from derm.training.downstream.dataset import RankerDataset
    from derm.training.downstream.ranker import FeatureTransform

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "training_set.parquet"
        pq.write_table(synthetic_training_set(rows), path)
        started = time.perf_counter()
        table = pq.read_table(path)
        columns = {name: table.column(name) for name in table.column_names}
        dataset = RankerDataset(table, FeatureTransform(_spec().with_counting_stats(columns)))
        load_seconds = time.perf_counter() - started
    tensors = dataset.tensors

    def consume(batch: dict[str, torch.Tensor]) -> int:
        return int(batch["label"].shape[0])

    loader_times, memory_times = [], []
    for repeat in range(repeats):
        started = time.perf_counter()
        seen = sum(consume(b) for b in dataset.loader(batch_size, shuffle=True, seed=repeat))
        loader_times.append(time.perf_counter() - started)
        assert seen == rows

        started = time.perf_counter()
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(repeat))
        seen = sum(consume({k: v.index_select(0, i) for k, v in tensors.items()}) for i in order.split(batch_size))
        memory_times.append(time.perf_counter() - started)
        assert seen == rows
    loader = rows / statistics.median(loader_times)
    memory = rows / statistics.median(memory_times)
    return {
        "rows": rows,
        "repeats": repeats,
        "batch_size": batch_size,
        "parquet_to_tensors_rows_per_s": rows / load_seconds,
        "loader_samples_per_s": loader,
        "in_memory_samples_per_s": memory,
        "ratio": loader / memory,
    }


@click.command()
@click.option("--rows", type=int, default=1_000_000, show_default=True)
@click.option("--repeats", type=int, default=5, show_default=True)
@click.option("--batch-size", type=int, default=4096, show_default=True)
def main(rows: int, repeats: int, batch_size: int) -> None:
    """Print the benchmark result as JSON."""
    print(json.dumps(run(rows, repeats, batch_size), indent=2))


if __name__ == "__main__":
    main()
