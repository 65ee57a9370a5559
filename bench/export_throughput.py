"""Benchmark: throughput of the daily DERM embedding export (embeddings/s).

Measures what :func:`derm.training.upstream.refresh.refresh_day` does per family after
training: run the entity tower over every active entity in batches, blend with
yesterday's snapshot (EMA, merge-joined by id) and stream the Parquet snapshot
to disk. Entity features are generated on the fly (random ids, counts and click
sequences), so the number measures the export, not DuckDB feature queries.

Side by side in one run: the single-process export and the export on Ray Data
(``ray.data`` ``map_batches`` in at most ``ray_workers`` Ray tasks at a time, local Ray with
``num_cpus`` CPUs; the cluster profile's engine). Ray's start-up is warmed up once; each
timed Ray export includes loading the model in the worker processes, as a daily export does.

Usage::

    python -m bench.export_throughput --entities 1000000 --repeats 3 --ray-workers 2

Example::

    from bench.export_throughput import run
    result = run(entities=2_000, repeats=1)   # {"user_embeddings_per_s": ..., ...}
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

if TYPE_CHECKING:
    from derm.core.snapshot import SnapshotManifest
    from derm.training.upstream.export import RayExport
    from derm.training.upstream.model import DermModel


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


def export_snapshot(
    model: DermModel,
    entity: str,
    features: Iterable[dict[str, np.ndarray]],
    directory: Path,
    previous: Path | None,
    *,
    now: datetime,
    model_version: str,
    batch_rows: int,
    row_group_rows: int,
    ray: RayExport | None = None,
    renormalize: bool = False,
) -> SnapshotManifest:
    """One family's daily export, as :func:`derm.training.upstream.refresh.refresh_day` runs it.

    The entity tower embeds ``features`` in forward passes of ``batch_rows`` (on Ray Data when ``ray`` is
    given), blends them with yesterday's snapshot (EMA, weight 0.8, merge-joined by id) and streams the
    snapshot into ``directory`` (``embeddings.parquet`` + ``manifest.json``).

    Args:
        features: id-ordered feature batches, e.g. :func:`synthetic_entity_features`.
        previous: yesterday's ``embeddings.parquet`` (None: no previous snapshot, today's vectors as they are).
        now: the manifest's event time, data window and creation time.
        model_version: the manifest's model version.
        row_group_rows: rows per Parquet row group.
        renormalize: scale every blended vector back to unit length.

    Returns:
        The written manifest (``row_count``: rows written).

    Example::

        features = synthetic_entity_features("user", 1_000, batch_rows=256)
        manifest = export_snapshot(model, "user", features, out, None, now=now, model_version="v1",
                                   batch_rows=256, row_group_rows=256)
    """
    from derm.core.naming import join_key
    from derm.core.snapshot import SnapshotManifest
    from derm.training.upstream.export import aggregate_batches, embed_batches, write_snapshot

    family = f"ctr_{entity}"
    manifest = SnapshotManifest(
        family=family,
        model_version=model_version,
        config_hash="",
        weights_sha256="",
        dim=model.cfg.dim,
        snapshot_date=date(2026, 1, 1),
        event_timestamp=now,
        data_window_start=now,
        data_window_end=now,
        row_count=0,
        aggregation="ema",
        ema_weight=0.8,
        created_at=now,
    )
    batches = aggregate_batches(
        embed_batches(model, entity, features, batch_rows, ray),
        previous,
        join_key(family),
        model.cfg.dim,
        "ema",
        0.8,
        renormalize=renormalize,
    )
    return write_snapshot(directory, batches, manifest, row_group_rows)


def run(
    entities: int = 1_000_000,
    repeats: int = 3,
    dim: int = 64,
    batch_rows: int = 65_536,
    ray_workers: int | None = None,
    num_cpus: int = 2,
) -> dict:
    """Times the export of ``entities`` users and Pins, ``repeats`` times each, in process and on Ray; medians.

    Each timed export reads yesterday's snapshot of the same entities (EMA
    aggregation, the default refresh path) and writes a full snapshot. The Ray
    export's snapshot is checked to be the single-process one, byte for byte.

    Args:
        ray_workers: Ray tasks at a time of the Ray Data export (None: the single-process export only;
            ``python -m bench`` asks for 2).
        num_cpus: CPUs of the local Ray.

    Returns:
        ``{"entities", "repeats", "dim", "threads", "user_embeddings_per_s", "pin_embeddings_per_s",
        "user_seconds", "pin_seconds"}`` (medians), and with Ray ``"ray_user_embeddings_per_s"``,
        ``"ray_pin_embeddings_per_s"``, ``"ray_user_seconds"``, ``"ray_pin_seconds"``,
        ``"ray_over_local_user"``, ``"ray_over_local_pin"``.
    """
    import torch

    from derm.core.snapshot import DATA_FILE
    from derm.training.upstream.export import RayExport
    from derm.training.upstream.model import DermConfig, DermModel

    torch.manual_seed(0)
    model = DermModel(DermConfig(dim=dim))
    now = datetime.now(UTC)

    engine = None
    if ray_workers:
        from derm.feast_plugins.ray_asof_offline_store import RayAsofOfflineStoreConfig, ensure_ray

        engine = RayExport(workers=ray_workers, num_cpus=num_cpus)
        ensure_ray(RayAsofOfflineStoreConfig(num_cpus=num_cpus))

    def export(entity: str, directory: Path, previous: Path | None, ray: RayExport | None = None) -> float:
        features = synthetic_entity_features(entity, entities, batch_rows)
        started = time.perf_counter()
        written = export_snapshot(
            model,
            entity,
            features,
            directory,
            previous,
            now=now,
            model_version="bench",
            batch_rows=batch_rows,
            row_group_rows=batch_rows,
            ray=ray,
        )
        elapsed = time.perf_counter() - started
        assert written.row_count == entities
        return elapsed

    result: dict = {"entities": entities, "repeats": repeats, "dim": dim, "threads": torch.get_num_threads()}
    if engine is not None:
        result.update(ray_workers=ray_workers, ray_cpus=num_cpus)
    with tempfile.TemporaryDirectory() as tmp:
        for entity in ("user", "pin"):
            previous = Path(tmp) / entity / "previous"
            export(entity, previous, None)  # yesterday's snapshot; also warms up
            seconds: dict[str, list[float]] = {"local": [], "ray": []}
            for r in range(repeats):  # alternated, so both see the same machine load
                target = Path(tmp) / entity / f"run-{r}"
                seconds["local"].append(export(entity, target, previous / DATA_FILE))
                if engine is not None:
                    on_ray = Path(tmp) / entity / f"ray-{r}"
                    seconds["ray"].append(export(entity, on_ray, previous / DATA_FILE, engine))
                    if (on_ray / DATA_FILE).read_bytes() != (target / DATA_FILE).read_bytes():
                        raise AssertionError(f"{entity}: the Ray export's snapshot differs from the single-process one")
                    (on_ray / DATA_FILE).unlink()
                (target / DATA_FILE).unlink()  # keep disk use at a few snapshots
            median = statistics.median(seconds["local"])
            result[f"{entity}_seconds"] = median
            result[f"{entity}_embeddings_per_s"] = entities / median
            if engine is not None:
                ray_median = statistics.median(seconds["ray"])
                result[f"ray_{entity}_seconds"] = ray_median
                result[f"ray_{entity}_embeddings_per_s"] = entities / ray_median
                result[f"ray_over_local_{entity}"] = median / ray_median
    return result


@click.command()
@click.option("--entities", default=1_000_000, show_default=True, help="Entities exported per family.")
@click.option("--repeats", default=3, show_default=True, help="Timed runs per family (median reported).")
@click.option("--dim", default=64, show_default=True, help="Embedding dimension.")
@click.option("--ray-workers", default=2, show_default=True, help="Ray Data tasks at a time (0: single process only).")
def main(entities: int, repeats: int, dim: int, ray_workers: int) -> None:
    """Print the export throughput as JSON."""
    click.echo(json.dumps(run(entities, repeats, dim, ray_workers=ray_workers or None), indent=2))


if __name__ == "__main__":
    main()
