"""Test snapshots written by the upstream refresh's own writer, under a registered model version."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import numpy as np

from pipeline.config import PlatformPaths
from training.refresh import resolve_version, snapshot_available_at, write_snapshot
from training.snapshot import SnapshotManifest, snapshot_dir


def write_test_snapshot(
    paths: PlatformPaths, family: str, day: date, ids: np.ndarray, vectors: np.ndarray, config_hash: str
) -> Path:
    """Register ``config_hash`` for the family's model (as the refresh does) and write one day's snapshot."""
    version = resolve_version(paths.snapshots_dir, family.split("_")[0], config_hash)
    ts = snapshot_available_at(day, timedelta(hours=1))
    manifest = SnapshotManifest(
        family=family,
        model_version=version,
        config_hash=config_hash,
        weights_sha256="0" * 64,
        dim=vectors.shape[1],
        snapshot_date=day,
        event_timestamp=ts,
        data_window_start=ts - timedelta(days=30),
        data_window_end=ts - timedelta(hours=1, microseconds=1),
        row_count=0,
        aggregation="ema",
        ema_weight=0.8,
        created_at=ts,
    )
    directory = snapshot_dir(paths.snapshots_dir, family, version, day)
    write_snapshot(directory, [(np.asarray(ids, dtype=np.int64), vectors)], manifest)
    return directory
