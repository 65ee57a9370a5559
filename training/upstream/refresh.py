"""Daily DERM refresh: warm-started training, embedding export, moving average, versioned snapshots.

Paper: "Decoupled Entity Representation Learning for Pinterest Ads Ranking",
https://arxiv.org/abs/2509.04337.

For each model (``ctr``: impressions -> click, ``cvr``: clicks -> conversion)
and each day ``t`` of the event log, :func:`refresh_day`:

1. trains on day ``t``'s examples, warm-started from day ``t-1``'s checkpoint
   (so the weights have seen every event up to the end of ``t``); a sparse day also
   replays a bounded window of the days just before it (``TrainConfig.replay_*``,
   :func:`~derm.training.upstream.train.replay_arrays`);
2. embeds every user and Pin active in the last ``active_window_days``, with
   features as of the end of day ``t`` -- one embedding per entity per day;
3. aggregates ``E(t) = w * E(t-1) + (1 - w) * E_daily(t)`` (or overwrites) for the
   entities with an event on day ``t``; an idle entity keeps its last embedding
   (``RefreshConfig.idle_entities="carry_forward"``, the paper's choice), and rows
   are re-normalised to unit norm (``renormalize``) for the inner-product Pin index;
4. writes one snapshot per family (``<model>_user``, ``<model>_pin``) with
   ``event_timestamp = t+1 00:00 UTC + publish_delay``, atomically;
5. measures the pair's quality on day ``t+1``'s events before anything is published
   (:func:`upstream_quality`: dot-product ROC-AUC and recall@k against a popularity
   baseline and day ``t-1``'s embeddings) and records it in both manifests.

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
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from derm.core.days import day_end, day_start
from derm.core.files import atomic_write_text
from derm.core.model_versions import ModelVersions
from derm.core.naming import FAMILIES, OBJECTIVES, families_of, join_key
from derm.core.paths import PlatformPaths
from derm.core.snapshot import DATA_FILE, MANIFEST_FILE, SnapshotManifest, file_sha256, read_manifest, snapshot_dir
from derm.core.sql import connect, ident
from derm.events.schema import event_files, log_days, partition_day
from derm.training.upstream.config import UpstreamConfig
from derm.training.upstream.export import (
    aggregate_batches,
    embed_batches,
    export_engine,
    snapshot_available_at,
    write_snapshot,
)
from derm.training.upstream.features import (
    UpstreamDataset,
    entity_feature_batches,
    events_used_window,
    window_events_sql,
)
from derm.training.upstream.model import DermModel
from derm.training.upstream.train import (
    VERSION_CONFIG_FILE,
    build_model,
    checkpoint_path,
    load_checkpoint,
    replay_arrays,
    save_checkpoint,
    train_one_day,
    version_dir,
)


class RefreshGapError(RuntimeError):
    """A day was asked for before the day it warm-starts from exists: the refresh never leaves a silent gap."""


@dataclass(frozen=True)
class RefreshDay:
    """One (objective, version, day) of the refresh, and where its outputs go (also a planted version's day:
    :mod:`derm.experiments.planted` writes its snapshots through :func:`export_family`)."""

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
    template = manifest_template(job, paths, cfg, weights_sha256=file_sha256(job.checkpoint(paths)))
    manifests = [
        export_family(job, paths, cfg, family, partial(_embedded, model, job, paths, cfg, entity), template)
        for entity, family in families.items()
    ]
    return record_quality(job, paths, cfg, manifests)


def _plan_day(paths: PlatformPaths, objective: str, version: str, config_hash: str, day: date) -> RefreshDay:
    """The day to refresh, refused when it is outside the log or would leave a gap after the day before."""
    days = log_days(paths.events_dir)
    if not days[0] <= day <= days[-1]:
        raise ValueError(f"{objective} {version}: {day} is outside the event log ({days[0]} .. {days[-1]})")
    job = RefreshDay(objective, version, config_hash, day, warm_start=day != days[0])
    if job.warm_start and not _day_done(paths, objective, version, job.previous_day):
        raise RefreshGapError(
            f"{objective} {version}: no snapshot for {job.previous_day}; run the refresh for that day first"
        )
    return job


def write_version_config(paths: PlatformPaths, job: RefreshDay, cfg: UpstreamConfig) -> None:
    """``config.json`` beside the version's checkpoints: what the version stands for, written once."""
    config_file = version_dir(paths.models_dir, job.objective, job.version) / VERSION_CONFIG_FILE
    if not config_file.exists():
        payload = {"model_version": job.version, "config_hash": job.config_hash, **cfg.version_payload(job.objective)}
        atomic_write_text(config_file, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def train_day(job: RefreshDay, paths: PlatformPaths, cfg: UpstreamConfig) -> DermModel:
    """The model of the day: trained on day ``t`` from day ``t-1``'s checkpoint, and checkpointed."""
    checkpoint = job.checkpoint(paths)
    shared = None if checkpoint.exists() else _same_training_checkpoint(job, paths, cfg)
    if shared is not None:  # another version differs only in its aggregation: the day's weights are the same
        staging = checkpoint.with_name(f".{checkpoint.name}.tmp")
        staging.unlink(missing_ok=True)
        try:
            # One copy on disk for every version of the sweep (a 215-day refresh is ~6 GB of checkpoints per
            # version). Safe because a checkpoint is never written in place: save_checkpoint replaces the file.
            os.link(shared, staging)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(shared, staging)
        staging.replace(checkpoint)
    if checkpoint.exists():  # trained before an interrupted export; training is deterministic anyway
        model, _ = load_checkpoint(checkpoint, cfg)
        return model
    model, optimizer = (
        load_checkpoint(job.checkpoint(paths, job.previous_day), cfg) if job.warm_start else build_model(cfg)
    )
    arrays, _ = replay_arrays(paths.events_dir, job.day, job.objective, cfg.features, cfg.train)
    if len(arrays["label"]):
        epochs = cfg.train.epochs if job.warm_start else cfg.train.first_day_epochs
        train_one_day(model, optimizer, UpstreamDataset(arrays), cfg.train, job.day, epochs)
    save_checkpoint(checkpoint, model, optimizer)
    return model


def _same_training_checkpoint(job: RefreshDay, paths: PlatformPaths, cfg: UpstreamConfig) -> Path | None:
    """The day's checkpoint of another version of the model trained identically (same model, features and
    training config; only the aggregation differs), so an aggregation sweep re-trains nothing."""
    training = {k: v for k, v in cfg.version_payload(job.objective).items() if k != "aggregation"}
    versions = version_dir(paths.models_dir, job.objective, job.version).parent
    for config_file in sorted(versions.glob(f"*/{VERSION_CONFIG_FILE}")):
        version = config_file.parent.name
        if version == job.version:
            continue
        other = json.loads(config_file.read_text())
        candidate = checkpoint_path(paths.models_dir, job.objective, version, job.day)
        if {k: other.get(k) for k in training} == json.loads(json.dumps(training)) and candidate.exists():
            return candidate
    return None


def _events_window(job: RefreshDay, paths: PlatformPaths, cfg: UpstreamConfig) -> tuple[datetime, datetime]:
    window = events_used_window(paths.events_dir, job.day, cfg.features, cfg.refresh.active_window_days)
    if window is None:
        raise ValueError(f"{job.objective} {job.version}: no events in the window ending {job.day}; nothing to embed")
    if snapshot_available_at(job.day, cfg.refresh.publish_delay) < window[1]:
        # Unreachable with day-bounded reads; guards point-in-time correctness.
        raise RuntimeError(f"{job.objective} {job.version}: snapshot of {job.day} would be available before its data")
    return window


def manifest_template(
    job: RefreshDay, paths: PlatformPaths, cfg: UpstreamConfig, weights_sha256: str
) -> SnapshotManifest:
    """The manifest both families of the day share; family, row count and data hash are set per family.

    ``weights_sha256``: what made the vectors (the day's checkpoint for a trained version).
    """
    window = _events_window(job, paths, cfg)
    return SnapshotManifest(
        family="",
        model_version=job.version,
        config_hash=job.config_hash,
        weights_sha256=weights_sha256,
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


def window_entity_batches(
    job: RefreshDay, paths: PlatformPaths, cfg: UpstreamConfig, entity: str
) -> Iterator[dict[str, np.ndarray]]:
    """The features of every entity the day's export embeds (active in the window), in id order."""
    refresh = cfg.refresh
    return entity_feature_batches(
        paths.events_dir, entity, job.day, cfg.features, refresh.active_window_days, refresh.inference_batch_size
    )


def _embedded(
    model: DermModel, job: RefreshDay, paths: PlatformPaths, cfg: UpstreamConfig, entity: str
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    # In process, or Ray Data on the cluster profile / DERM_EXPORT_ENGINE=ray: the same vectors either way.
    features = window_entity_batches(job, paths, cfg, entity)
    return embed_batches(model, entity, features, cfg.refresh.inference_batch_size, ray=export_engine())


def export_family(
    job: RefreshDay,
    paths: PlatformPaths,
    cfg: UpstreamConfig,
    family: str,
    daily: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    template: SnapshotManifest,
) -> SnapshotManifest:
    """One family's snapshot of the day: today's vectors averaged with yesterday, written atomically.

    Args:
        daily: called only when the snapshot is not written yet; ``(ids, vectors (n, D))`` batches of every
            entity of :func:`window_entity_batches`, in id order.
        template: :func:`manifest_template`'s manifest of the day.
    """
    target = job.snapshot(paths, family)
    if (target / MANIFEST_FILE).exists():  # written before an interrupted run stopped
        return read_manifest(target)
    previous_file = job.snapshot(paths, family, job.previous_day) / DATA_FILE if job.warm_start else None
    refresh = cfg.refresh
    carry = refresh.idle_entities == "carry_forward" and previous_file is not None
    entity = FAMILIES[family]
    batches = aggregate_batches(
        daily(),
        previous_file,
        join_key(family),
        cfg.model.dim,
        refresh.aggregation,
        refresh.ema_weight,
        active_ids=active_entities(paths.events_dir, entity, job.day) if carry else None,
        renormalize=refresh.renormalize,
    )
    manifest = dataclasses.replace(template, family=family)
    return write_snapshot(target, batches, manifest, refresh.inference_batch_size)


def active_entities(events_dir: Path, entity: str, day: date) -> np.ndarray:
    """Sorted ids of the users or Pins with at least one event on ``day`` (the entities refreshed that day)."""
    files = [str(p) for p in event_files(events_dir) if partition_day(p) == day]
    if not files:
        return np.zeros(0, dtype=np.int64)
    key = ident(join_key(f"ctr_{entity}"))
    sql = f"SELECT DISTINCT {key} FROM read_parquet($files) WHERE event_timestamp >= $start AND event_timestamp < $end"
    with connect() as con:
        ids = con.execute(sql, {"files": files, "start": day_start(day), "end": day_end(day)}).fetchnumpy()
    return np.sort(ids[join_key(f"ctr_{entity}")].astype(np.int64))


# --------------------------------------------------------------------------- upstream quality


def _read_snapshot(directory: Path, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(ids (n,), vectors (n, D))`` of a snapshot folder, or ``None`` when it does not exist."""
    if not (directory / DATA_FILE).exists():
        return None
    table = pq.read_table(directory / DATA_FILE, columns=[key, "embedding"])
    ids = table.column(key).to_numpy().astype(np.int64)
    flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return ids, flat.astype(np.float32).reshape(len(ids), -1)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney ROC-AUC with ties at half credit; NaN when a class is absent."""
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        return float("nan")
    s = np.asarray(scores, dtype=np.float64)
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    rank_sum = average_rank[inverse.reshape(-1)][labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _recall_at_k(
    users: np.ndarray,
    user_vectors: np.ndarray,
    pin_ids: np.ndarray,
    pin_vectors: np.ndarray | None,
    positives: dict[int, set[int]],
    k: int,
    popularity: np.ndarray | None = None,
) -> float:
    """Mean over users of |top-k Pins by u.p (or by ``popularity``) ∩ next-day positives| / |positives|."""
    if not len(users) or not len(pin_ids):
        return float("nan")
    k = min(k, len(pin_ids))
    recalls = []
    for start in range(0, len(users), 512):
        block = users[start : start + 512]
        if popularity is None:
            scores = user_vectors[start : start + 512] @ pin_vectors.T  # (b, P)
        else:
            scores = np.broadcast_to(popularity, (len(block), len(pin_ids)))
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        for user, row in zip(block, top, strict=True):
            wanted = positives[int(user)]
            recalls.append(len(wanted.intersection(pin_ids[row].tolist())) / len(wanted))
    return float(np.mean(recalls))


def upstream_quality(
    paths: PlatformPaths,
    objective: str,
    version: str,
    day: date,
    k: int = 10,
    count_window_days: int = 28,
    max_users: int = 2_000,
) -> dict:
    """How well day ``t``'s user x Pin embeddings predict day ``t+1``, before they are published.

    The events of day ``t+1`` (impressions labelled by click for ``ctr``, clicks labelled by
    conversion for ``cvr``) whose user and Pin have a vector in day ``t``'s snapshots (and in day
    ``t-1``'s, when it exists) are scored three ways on the same rows: the dot product of day
    ``t``'s vectors, the dot product of day ``t-1``'s (what stays online if ``t`` is not published),
    and Pin popularity (positives of the Pin in the ``count_window_days`` before the end of ``t``).

    Labels are judged as they were known (issue 17), through the upstream's own event relation
    (:func:`derm.training.upstream.features.window_events_sql`): a conversion of a ``t+1`` click
    counts only when it was known by the end of ``t+1``, when the snapshot's day of serving is over
    (the downstream window-end cut-off; the 7-day attribution window is then implied, since the
    click is less than a day before the cut-off), and popularity counts only the conversions known
    by the end of ``t``, when the snapshot is made.

    Args:
        paths: platform locations.
        objective: ``"ctr"`` or ``"cvr"``.
        version: the model version.
        day: the snapshot day ``t``.
        k: recall@k cut-off: per user with a positive on ``t+1``, the share of its positive Pins
            among the top-``k`` of all Pins in the snapshot.
        count_window_days: look-back of the popularity baseline.
        max_users: recall is averaged over at most this many users (lowest ids) to bound the cost.

    Returns:
        A JSON-ready dict: ``evaluated_on``, ``rows``, ``positives``, ``roc_auc``, ``roc_auc_popularity``,
        ``roc_auc_previous``, ``recall_at_k``, ``recall_at_k_popularity``, ``recall_at_k_previous``, ``k``,
        ``users``, ``no_better_than_popularity`` (ROC-AUC and recall both at or below popularity's);
        or ``{"evaluated_on": None, "note": ...}`` when day ``t+1`` has no events.
    """
    next_day = day + timedelta(days=1)
    files = [str(p) for p in event_files(paths.events_dir) if partition_day(p) == next_day]
    if not files:
        return {"evaluated_on": None, "note": f"no events on {next_day}: measured once that day is in the log"}
    label, population = OBJECTIVES[objective]
    families = families_of(objective)
    today = {
        e: _read_snapshot(snapshot_dir(paths.snapshots_dir, f, version, day), join_key(f)) for e, f in families.items()
    }
    before = day - timedelta(days=1)
    yesterday = {
        e: _read_snapshot(snapshot_dir(paths.snapshots_dir, f, version, before), join_key(f))
        for e, f in families.items()
    }
    has_yesterday = all(v is not None for v in yesterday.values())
    label_sql = ident(label)
    # Each relation's ``converted`` holds only conversions known before the relation's window closes.
    scored, scored_params = window_events_sql(paths.events_dir, "scored", day_start(next_day), day_end(next_day))
    history, history_params = window_events_sql(
        paths.events_dir, "history", day_end(day) - timedelta(days=count_window_days), day_end(day)
    )
    with connect() as con:
        events = con.execute(
            f"SELECT user_id, pin_id, {label_sql} AS label FROM {scored} "
            f"WHERE {ident(population) if population else 'true'}",
            scored_params,
        ).fetchnumpy()
        popular = con.execute(
            f"SELECT pin_id, count(*) FILTER (WHERE {label_sql}) AS n FROM {history} GROUP BY pin_id",
            history_params,
        ).fetchnumpy()
    users, pins = events["user_id"].astype(np.int64), events["pin_id"].astype(np.int64)
    labels = events["label"].astype(bool)

    def lookup(snapshot: tuple[np.ndarray, np.ndarray], ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        known, vectors = snapshot
        pos = np.clip(np.searchsorted(known, ids), 0, max(len(known) - 1, 0))
        found = (known[pos] == ids) if len(known) else np.zeros(len(ids), dtype=bool)
        return found, vectors[pos] if len(known) else np.zeros((len(ids), 1), np.float32)

    u_found, u_vec = lookup(today["user"], users)
    p_found, p_vec = lookup(today["pin"], pins)
    covered = u_found & p_found
    if has_yesterday:
        yu_found, yu_vec = lookup(yesterday["user"], users)
        yp_found, yp_vec = lookup(yesterday["pin"], pins)
        covered &= yu_found & yp_found
    pop_ids, pop_n = popular["pin_id"].astype(np.int64), popular["n"].astype(np.float64)
    order = np.argsort(pop_ids)
    pop_ids, pop_n = pop_ids[order], pop_n[order]

    def popularity_of(ids: np.ndarray) -> np.ndarray:
        if not len(pop_ids):
            return np.zeros(len(ids))
        pos = np.clip(np.searchsorted(pop_ids, ids), 0, len(pop_ids) - 1)
        return np.where(pop_ids[pos] == ids, pop_n[pos], 0.0)

    y = labels[covered]
    result: dict = {
        "evaluated_on": next_day.isoformat(),
        "rows": int(covered.sum()),
        "coverage": float(covered.mean()) if len(covered) else 0.0,
        "positives": int(y.sum()),
        "k": int(k),
        "roc_auc": roc_auc(y, np.einsum("nd,nd->n", u_vec[covered], p_vec[covered])),
        "roc_auc_popularity": roc_auc(y, popularity_of(pins[covered])),
        "roc_auc_previous": (
            roc_auc(y, np.einsum("nd,nd->n", yu_vec[covered], yp_vec[covered])) if has_yesterday else None
        ),
    }
    positives: dict[int, set[int]] = {}
    for user, pin in zip(users[covered & labels].tolist(), pins[covered & labels].tolist(), strict=True):
        positives.setdefault(user, set()).add(pin)
    ranked_users = np.array(sorted(positives)[:max_users], dtype=np.int64)
    pin_ids, pin_vectors = today["pin"]
    _, user_vectors = lookup(today["user"], ranked_users)
    result["users"] = len(ranked_users)
    result["recall_at_k"] = _recall_at_k(ranked_users, user_vectors, pin_ids, pin_vectors, positives, k)
    result["recall_at_k_popularity"] = _recall_at_k(
        ranked_users, user_vectors, pin_ids, None, positives, k, popularity=popularity_of(pin_ids)
    )
    if has_yesterday:
        _, old_user_vectors = lookup(yesterday["user"], ranked_users)
        old_pin_ids, old_pin_vectors = yesterday["pin"]
        result["recall_at_k_previous"] = _recall_at_k(
            ranked_users, old_user_vectors, old_pin_ids, old_pin_vectors, positives, k
        )
    else:
        result["recall_at_k_previous"] = None

    def at_most(value: float, baseline: float) -> bool:
        return bool(np.isfinite(value) and np.isfinite(baseline) and value <= baseline)

    result["no_better_than_popularity"] = at_most(result["roc_auc"], result["roc_auc_popularity"]) and at_most(
        result["recall_at_k"], result["recall_at_k_popularity"]
    )
    return {key: (None if isinstance(v, float) and not np.isfinite(v) else v) for key, v in result.items()}


def record_quality(
    job: RefreshDay, paths: PlatformPaths, cfg: UpstreamConfig, manifests: list[SnapshotManifest]
) -> list[SnapshotManifest]:
    """Both manifests of the day with :func:`upstream_quality` filled in (rewritten atomically, before publishing)."""
    if all(m.quality is not None for m in manifests):
        return manifests
    quality = upstream_quality(
        paths, job.objective, job.version, job.day, cfg.refresh.quality_k, cfg.features.count_window_days
    )
    out = []
    for manifest in manifests:
        manifest = dataclasses.replace(manifest, quality=quality)
        atomic_write_text(job.snapshot(paths, manifest.family) / MANIFEST_FILE, manifest.to_json() + "\n")
        out.append(manifest)
    return out


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
