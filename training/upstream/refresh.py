"""Daily DERM refresh: warm-started training, embedding export, moving average, versioned snapshots.

Paper: "Decoupled Entity Representation Learning for Pinterest Ads Ranking",
https://arxiv.org/abs/2509.04337.

For each model (``ctr``: impressions -> click, ``cvr``: clicks -> conversion)
and each day ``t`` of the event log, :func:`refresh_day`:

1. trains on day ``t``'s examples, warm-started from day ``t-1``'s checkpoint
   (so the weights have seen every event up to the end of ``t``);
2. embeds every user and Pin active in the last ``active_window_days``, with
   features as of the end of day ``t`` -- one embedding per entity per day;
3. aggregates ``E(t) = w * E(t-1) + (1 - w) * E_daily(t)`` (or overwrites);
4. writes one snapshot per family (``<model>_user``, ``<model>_pin``) with
   ``event_timestamp = t+1 00:00 UTC + publish_delay``, atomically.

Versions: the canonical JSON of everything that shapes the embeddings (model
architecture, dim, features, training and aggregation config; not the day)
is hashed, and ``<snapshots_dir>/versions.json`` maps ``{model: {hash: "vN"}}``.
A new hash gets the next version, whose snapshots are separate feature views;
an existing version is never rewritten.

Layout::

    <models_dir>/upstream/<model>/<version>/date=YYYY-MM-DD.pt   checkpoint (model + optimizer)
    <models_dir>/upstream/<model>/<version>/config.json          canonical config of the version
    <snapshots_dir>/<family>/<version>/date=YYYY-MM-DD/          see derm.core.snapshot

Example::

    paths = PlatformPaths.from_env()
    manifests = refresh(paths, ("ctr", "cvr"), UpstreamConfig())
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from derm.core.files import atomic_write_text
from derm.core.model_versions import ModelVersions
from derm.core.naming import OBJECTIVES, families_of, join_key
from derm.core.paths import PlatformPaths
from derm.core.snapshot import DATA_FILE, MANIFEST_FILE, SnapshotManifest, file_sha256, read_manifest, snapshot_dir
from derm.events.schema import log_days
from derm.training.upstream.config import UpstreamConfig
from derm.training.upstream.export import aggregate_batches, embed_batches, snapshot_available_at, write_snapshot
from derm.training.upstream.features import (
    UpstreamDataset,
    entity_feature_batches,
    events_used_window,
    training_arrays,
)
from derm.training.upstream.model import DermModel
from derm.training.upstream.train import build_model, checkpoint_path, load_checkpoint, save_checkpoint, train_one_day


class RefreshGapError(RuntimeError):
    """A day was asked for before the day it warm-starts from exists: the refresh never leaves a silent gap."""


@dataclass(frozen=True)
class _Day:
    """One (objective, version, day) of the refresh, and where its outputs go."""

    objective: str
    version: str
    config_hash: str
    day: date
    warm_start: bool  # False only on the event log's first day

    @property
    def previous_day(self) -> date:
        return self.day - timedelta(days=1)

    def snapshot(self, paths: PlatformPaths, family: str, day: date | None = None) -> Path:
        return snapshot_dir(paths.snapshots_dir, family, self.version, day or self.day)

    def checkpoint(self, paths: PlatformPaths, day: date | None = None) -> Path:
        return checkpoint_path(paths.models_dir, self.objective, self.version, day or self.day)


def _day_done(paths: PlatformPaths, objective: str, version: str, day: date) -> bool:
    return checkpoint_path(paths.models_dir, objective, version, day).exists() and all(
        (snapshot_dir(paths.snapshots_dir, family, version, day) / MANIFEST_FILE).exists()
        for family in families_of(objective).values()
    )


def refresh_day(
    objective: str,
    day: date,
    paths: PlatformPaths,
    cfg: UpstreamConfig | None = None,
) -> list[SnapshotManifest]:
    """Trains, exports and snapshots one day of one model; a no-op if the day already exists.

    Args:
        objective: ``"ctr"`` or ``"cvr"``.
        day: the day ``t`` to refresh; must be in the event log's span.
        paths: where the event log, snapshots and checkpoints live.
        cfg: the config defining the model version.

    Returns:
        The manifests of ``<objective>_user`` and ``<objective>_pin`` for ``day``.

    Raises:
        RefreshGapError: ``day`` is not the log's first day and day ``t-1`` of this
            version has not been refreshed.
    """
    cfg = cfg or UpstreamConfig()
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: expected one of {sorted(OBJECTIVES)}")
    config_hash = cfg.config_hash(objective)
    version = ModelVersions(paths.snapshots_dir).resolve(objective, config_hash)
    families = families_of(objective)
    if _day_done(paths, objective, version, day):
        return [read_manifest(snapshot_dir(paths.snapshots_dir, f, version, day)) for f in families.values()]
    job = _plan_day(paths, objective, version, config_hash, day)
    write_version_config(paths, job, cfg)
    model = train_day(job, paths, cfg)
    window = _events_window(job, paths, cfg)
    manifest = _manifest_template(job, paths, cfg, window)
    return [_export_family(job, paths, cfg, model, entity, family, manifest) for entity, family in families.items()]


def _plan_day(paths: PlatformPaths, objective: str, version: str, config_hash: str, day: date) -> _Day:
    """The day to refresh, refused when it is outside the log or would leave a gap after the day before."""
    days = log_days(paths.events_dir)
    if not days[0] <= day <= days[-1]:
        raise ValueError(f"{objective} {version}: {day} is outside the event log ({days[0]} .. {days[-1]})")
    job = _Day(objective, version, config_hash, day, warm_start=day != days[0])
    if job.warm_start and not _day_done(paths, objective, version, job.previous_day):
        raise RefreshGapError(
            f"{objective} {version}: no snapshot for {job.previous_day}; run the refresh for that day first"
        )
    return job


def write_version_config(paths: PlatformPaths, job: _Day, cfg: UpstreamConfig) -> None:
    """``config.json`` beside the version's checkpoints: what the version stands for, written once."""
    config_file = job.checkpoint(paths).parent / "config.json"
    if not config_file.exists():
        payload = {"model_version": job.version, "config_hash": job.config_hash, **cfg.version_payload(job.objective)}
        atomic_write_text(config_file, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def train_day(job: _Day, paths: PlatformPaths, cfg: UpstreamConfig) -> DermModel:
    """The model of the day: trained on day ``t`` from day ``t-1``'s checkpoint, and checkpointed."""
    checkpoint = job.checkpoint(paths)
    if checkpoint.exists():  # trained before an interrupted export; training is deterministic anyway
        model, _ = load_checkpoint(checkpoint, cfg)
        return model
    model, optimizer = (
        load_checkpoint(job.checkpoint(paths, job.previous_day), cfg) if job.warm_start else build_model(cfg)
    )
    arrays = training_arrays(paths.events_dir, job.day, job.objective, cfg.features)
    if len(arrays["label"]):
        train_one_day(model, optimizer, UpstreamDataset(arrays), cfg.train, job.day)
    save_checkpoint(checkpoint, model, optimizer)
    return model


def _events_window(job: _Day, paths: PlatformPaths, cfg: UpstreamConfig) -> tuple[datetime, datetime]:
    window = events_used_window(paths.events_dir, job.day, cfg.features, cfg.refresh.active_window_days)
    if window is None:
        raise ValueError(f"{job.objective} {job.version}: no events in the window ending {job.day}; nothing to embed")
    if snapshot_available_at(job.day, cfg.refresh.publish_delay) < window[1]:
        # Unreachable with day-bounded reads; guards point-in-time correctness.
        raise RuntimeError(f"{job.objective} {job.version}: snapshot of {job.day} would be available before its data")
    return window


def _manifest_template(
    job: _Day, paths: PlatformPaths, cfg: UpstreamConfig, window: tuple[datetime, datetime]
) -> SnapshotManifest:
    """The manifest both families of the day share; family, row count and data hash are set per family."""
    return SnapshotManifest(
        family="",
        model_version=job.version,
        config_hash=job.config_hash,
        weights_sha256=file_sha256(job.checkpoint(paths)),
        dim=cfg.model.dim,
        snapshot_date=job.day,
        event_timestamp=snapshot_available_at(job.day, cfg.refresh.publish_delay),
        data_window_start=window[0],
        data_window_end=window[1],
        row_count=0,
        aggregation=cfg.refresh.aggregation,
        ema_weight=cfg.refresh.ema_weight,
        created_at=datetime.now(UTC),
    )


def _export_family(
    job: _Day,
    paths: PlatformPaths,
    cfg: UpstreamConfig,
    model: DermModel,
    entity: str,
    family: str,
    template: SnapshotManifest,
) -> SnapshotManifest:
    """One family's snapshot of the day: embed every active entity, average with yesterday, write atomically."""
    target = job.snapshot(paths, family)
    if (target / MANIFEST_FILE).exists():  # written before an interrupted run stopped
        return read_manifest(target)
    previous_file = job.snapshot(paths, family, job.previous_day) / DATA_FILE if job.warm_start else None
    refresh = cfg.refresh
    features = entity_feature_batches(
        paths.events_dir, entity, job.day, cfg.features, refresh.active_window_days, refresh.inference_batch_size
    )
    batches = aggregate_batches(
        embed_batches(model, entity, features, refresh.inference_batch_size),
        previous_file,
        join_key(family),
        cfg.model.dim,
        refresh.aggregation,
        refresh.ema_weight,
    )
    manifest = dataclasses.replace(template, family=family)
    return write_snapshot(target, batches, manifest, refresh.inference_batch_size)


def refresh_days(paths: PlatformPaths, through_date: date | None = None, max_days: int | None = None) -> list[date]:
    """Every calendar day from the log's first day to its last (or ``through_date``), at most ``max_days``."""
    days = log_days(paths.events_dir)
    last = min(days[-1], through_date) if through_date else days[-1]
    span = [days[0] + timedelta(days=i) for i in range((last - days[0]).days + 1)]
    return span[:max_days] if max_days is not None else span


def refresh(
    paths: PlatformPaths,
    objectives: Iterable[str] = ("ctr", "cvr"),
    cfg: UpstreamConfig | None = None,
    through_date: date | None = None,
    max_days: int | None = None,
    on_day: Callable[[str, date, list[SnapshotManifest]], None] | None = None,
) -> dict[str, list[SnapshotManifest]]:
    """Refreshes every day of the log in order for each model; days already done are skipped.

    Args:
        paths: platform locations.
        objectives: models to refresh (``"ctr"``, ``"cvr"``).
        cfg: the config defining the versions.
        through_date: last day to refresh (default: the log's last day).
        max_days: refresh at most this many days from the log's start.
        on_day: called after each (model, day) with its manifests (progress reporting).

    Returns:
        ``{model: [manifests of every day, user and Pin]}``.
    """
    cfg = cfg or UpstreamConfig()
    days = refresh_days(paths, through_date, max_days)
    out: dict[str, list[SnapshotManifest]] = {}
    for day in days:
        for objective in objectives:
            manifests = refresh_day(objective, day, paths, cfg)
            out.setdefault(objective, []).extend(manifests)
            if on_day is not None:
                on_day(objective, day, manifests)
    return out
