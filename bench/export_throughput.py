"""Benchmark: throughput of the daily DERM embedding export (embeddings/s).

Measures what :func:`derm.training.upstream.refresh.refresh_day` does per family after
training: run the entity tower over every active entity in batches, blend with
yesterday's snapshot (EMA, merge-joined by id) and stream the Parquet snapshot
to disk. Entity features are generated on the fly (random ids, counts and click
sequences), so the number measures the export, not DuckDB feature queries.

Usage::

    python -m bench.export_throughput --entities 1000000 --repeats 3

Example::

    from bench.export_throughput import run
    result = run(entities=2_000, repeats=1)   # {"user_embeddings_per_s": ..., ...}
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import click
import numpy as np


def synthetic_entity_features(
    entity: str, entities: int, batch_rows: int, seq_len: int = 20, seed: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Feature batches shaped like :func:`derm.training.upstream.features.entity_feature_batches`, ids ascending."""
    rng = np.random.default_rng(seed)
    for start in range(0, entities, batch_rows):
        n = min(batch_rows, entities - start)
        ids = (np.arange(start, start + n, dtype=np.int64) * 7) + 3  # sparse, ascending ids
        counts = np.log1p(rng.poisson(5.0, size=(n, 3))).astype(np.float32)
        if entity == "user":
            seq = rng.integers(0, 1 << 20, size=(n, seq_len), dtype=np.int64)
            lengths = rng.integers(0, seq_len + 1, size=n)
            seq[np.arange(seq_len)[None, :] >= lengths[:, None]] = -1  # right padding
            yield {"user_id": ids, "user_counts": counts, "user_seq": seq}
        else:
            yield {
                "pin_id": ids,
                "category_id": rng.integers(0, 50, size=n, dtype=np.int64),
                "advertiser_id": rng.integers(0, 5_000, size=n, dtype=np.int64),
                "pin_counts": counts,
            }


def run(entities: int = 1_000_000, repeats: int = 3, dim: int = 64, batch_rows: int = 65_536) -> dict:
    """Times the export of ``entities`` users and Pins, ``repeats`` times each; returns medians.

    Each timed export reads yesterday's snapshot of the same entities (EMA
    aggregation, the default refresh path) and writes a full snapshot.

    Returns:
        ``{"entities", "repeats", "dim", "threads", "user_embeddings_per_s",
        "pin_embeddings_per_s", "user_seconds", "pin_seconds"}`` (medians).
    """
    import torch

    from derm.core.naming import join_key
    from derm.core.snapshot import DATA_FILE, SnapshotManifest
    from derm.training.upstream.export import aggregate_batches, embed_batches, write_snapshot
    from derm.training.upstream.model import DermConfig, DermModel

    torch.manual_seed(0)
    model = DermModel(DermConfig(dim=dim))
    now = datetime.now(UTC)

    def export(entity: str, directory: Path, previous: Path | None) -> float:
        family = f"ctr_{entity}"
        manifest = SnapshotManifest(
            family=family,
            model_version="bench",
            config_hash="",
            weights_sha256="",
            dim=dim,
            snapshot_date=date(2026, 1, 1),
            event_timestamp=now,
            data_window_start=now,
            data_window_end=now,
            row_count=0,
            aggregation="ema",
            ema_weight=0.8,
            created_at=now,
        )
        started = time.perf_counter()
        batches = aggregate_batches(
            embed_batches(model, entity, synthetic_entity_features(entity, entities, batch_rows), batch_rows),
            previous,
            join_key(family),
            dim,
            "ema",
            0.8,
        )
        written = write_snapshot(directory, batches, manifest, batch_rows)
        elapsed = time.perf_counter() - started
        assert written.row_count == entities
        return elapsed

    result: dict = {"entities": entities, "repeats": repeats, "dim": dim, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        for entity in ("user", "pin"):
            previous = Path(tmp) / entity / "previous"
            export(entity, previous, None)  # yesterday's snapshot; also warms up
            seconds = []
            for r in range(repeats):
                target = Path(tmp) / entity / f"run-{r}"
                seconds.append(export(entity, target, previous / DATA_FILE))
                (target / DATA_FILE).unlink()  # keep disk use at two snapshots
            median = statistics.median(seconds)
            result[f"{entity}_seconds"] = median
            result[f"{entity}_embeddings_per_s"] = entities / median
    return result


@click.command()
@click.option("--entities", default=1_000_000, show_default=True, help="Entities exported per family.")
@click.option("--repeats", default=3, show_default=True, help="Timed runs per family (median reported).")
@click.option("--dim", default=64, show_default=True, help="Embedding dimension.")
def main(entities: int, repeats: int, dim: int) -> None:
    """Print the export throughput as JSON."""
    click.echo(json.dumps(run(entities, repeats, dim), indent=2))


if __name__ == "__main__":
    main()
