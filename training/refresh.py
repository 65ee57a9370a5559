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
    <snapshots_dir>/<family>/<version>/date=YYYY-MM-DD/          see training.snapshot

Example::

    paths = PlatformPaths.from_env()
    manifests = refresh(paths, ("ctr", "cvr"), UpstreamConfig())
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import PlatformPaths
from training.derm import PIN_KEYS, USER_KEYS, DermConfig, DermModel
from training.losses import derm_loss
from training.snapshot import (
    DATA_FILE,
    MANIFEST_FILE,
    SnapshotManifest,
    file_sha256,
    join_key,
    read_manifest,
    snapshot_dir,
    snapshot_schema,
)
from training.upstream_data import (
    OBJECTIVES,
    FeatureConfig,
    UpstreamDataset,
    day_start,
    entity_feature_batches,
    events_used_window,
    log_days,
    training_arrays,
)

ENTITIES = ("user", "pin")
AGGREGATIONS = ("ema", "overwrite")
VERSIONS_FILE = "versions.json"


class RefreshGapError(RuntimeError):
    """A day was asked for before the day it warm-starts from exists: the refresh never leaves a silent gap."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1  # passes over each day's examples (warm start carries the earlier days)
    batch_size: int = 512
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    temperature: float = 0.1  # tau of the in-batch sampled softmax
    contrastive_weight: float = 0.5  # total loss = BCE + weight * contrastive
    seed: int = 0  # initial weights and per-day shuffling


@dataclass(frozen=True)
class RefreshConfig:
    aggregation: str = "ema"  # "ema": w*E(t-1) + (1-w)*E_daily(t); "overwrite": E_daily(t)
    ema_weight: float = 0.8  # w; the paper's best setting
    active_window_days: int = 90  # entities without an event in this window are dropped
    publish_delay: timedelta = timedelta(hours=1)  # after end of day; shifts availability only
    inference_batch_size: int = 65_536  # rows per forward pass and per Parquet row group

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r}: expected one of {AGGREGATIONS}")
        if not 0.0 <= self.ema_weight < 1.0:
            raise ValueError(f"ema_weight={self.ema_weight}: expected 0 <= w < 1")
        if self.publish_delay < timedelta(0):
            raise ValueError("publish_delay must not be negative: a snapshot cannot exist before its data")


@dataclass(frozen=True)
class UpstreamConfig:
    model: DermConfig = field(default_factory=DermConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    refresh: RefreshConfig = field(default_factory=RefreshConfig)

    def version_payload(self, model_name: str) -> dict:
        """Everything that changes the embeddings; publish delay and batch size do not, so they are left out."""
        refresh = self.refresh
        return {
            "objective": model_name,
            "model": dataclasses.asdict(self.model),
            "features": dataclasses.asdict(self.features),
            "train": dataclasses.asdict(self.train),
            "aggregation": {
                "aggregation": refresh.aggregation,
                # Overwrite ignores w; keep it out so the same embeddings never get two versions.
                "ema_weight": refresh.ema_weight if refresh.aggregation == "ema" else None,
                "active_window_days": refresh.active_window_days,
            },
        }

    def config_hash(self, model_name: str) -> str:
        canonical = json.dumps(self.version_payload(model_name), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


# --------------------------------------------------------------------------- versions


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def resolve_version(snapshots_dir: Path, model_name: str, config_hash: str) -> str:
    """The version of ``config_hash`` in ``<snapshots_dir>/versions.json``, registering ``v<N+1>`` if new."""
    path = Path(snapshots_dir) / VERSIONS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    # Read-modify-write under an exclusive lock: two refreshes registering new configs at once must not
    # both take v<N+1>, and a version, once given, never changes.
    with open(path.with_name(VERSIONS_FILE + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        registry: dict[str, dict[str, str]] = json.loads(path.read_text()) if path.exists() else {}
        versions = registry.setdefault(model_name, {})
        if config_hash not in versions:
            versions[config_hash] = f"v{1 + max((int(v[1:]) for v in versions.values()), default=0)}"
            _write_atomic(path, (json.dumps(registry, indent=2, sort_keys=True) + "\n").encode())
        return versions[config_hash]


def checkpoint_path(models_dir: Path, model_name: str, version: str, day: date) -> Path:
    return Path(models_dir) / "upstream" / model_name / version / f"date={day.isoformat()}.pt"


# --------------------------------------------------------------------------- aggregation


def aggregate(
    daily: np.ndarray,
    previous: np.ndarray | None,
    has_previous: np.ndarray | None,
    aggregation: str = "ema",
    ema_weight: float = 0.8,
) -> np.ndarray:
    """``E(t) = w * E(t-1) + (1 - w) * E_daily(t)`` where ``E(t-1)`` exists, else ``E_daily(t)``.

    Args:
        daily: ``(N, D)`` today's embeddings.
        previous: ``(N, D)`` yesterday's aggregated embeddings aligned with ``daily``
            (rows where ``has_previous`` is false are ignored), or ``None``.
        has_previous: ``(N,)`` bool, whether the entity had an embedding yesterday.
        aggregation: ``"ema"`` or ``"overwrite"`` (``E(t) = E_daily(t)``).
        ema_weight: ``w``.

    Returns:
        ``(N, D)`` float32. No re-normalisation: the average is the feature.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}: expected one of {AGGREGATIONS}")
    daily = np.asarray(daily, dtype=np.float32)
    if aggregation == "overwrite" or previous is None or has_previous is None:
        return daily
    smoothed = ema_weight * np.asarray(previous, dtype=np.float32) + (1.0 - ema_weight) * daily
    return np.where(has_previous[:, None], smoothed, daily).astype(np.float32)


def _embedding_matrix(column: pa.Array | pa.ChunkedArray, dim: int) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)


class _SortedSnapshotReader:
    """Looks up rows of an id-sorted snapshot for ascending id batches, reading it once, in step.

    Memory stays at about one Parquet batch whatever the snapshot size (a merge join).
    """

    def __init__(self, data_file: Path, key: str, dim: int, batch_rows: int = 65_536) -> None:
        self.dim = dim
        self.key = key
        # pre_buffer off: it would cache every row group read so far, growing with the file.
        parquet = pq.ParquetFile(data_file, pre_buffer=False)
        self._batches = parquet.iter_batches(batch_size=batch_rows, columns=[key, "embedding"])
        self._ids = np.empty(0, dtype=np.int64)
        self._emb = np.empty((0, dim), dtype=np.float32)
        self._exhausted = False

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(found (n,), embeddings (n, D))`` for ascending ``ids`` greater than every earlier lookup."""
        if len(ids) == 0:
            return np.zeros(0, dtype=bool), np.zeros((0, self.dim), dtype=np.float32)
        while not self._exhausted and (len(self._ids) == 0 or self._ids[-1] < ids[-1]):
            batch = next(self._batches, None)
            if batch is None:
                self._exhausted = True
                break
            self._ids = np.concatenate([self._ids, batch.column(self.key).to_numpy(zero_copy_only=False)])
            self._emb = np.concatenate([self._emb, _embedding_matrix(batch.column("embedding"), self.dim)])
        pos = np.minimum(np.searchsorted(self._ids, ids), max(len(self._ids) - 1, 0))
        if len(self._ids) == 0:
            return np.zeros(len(ids), dtype=bool), np.zeros((len(ids), self.dim), dtype=np.float32)
        found = self._ids[pos] == ids
        embeddings = self._emb[pos]
        keep = self._ids > ids[-1]
        self._ids, self._emb = self._ids[keep], self._emb[keep]
        return found, embeddings


def aggregate_batches(
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    previous_data_file: Path | None,
    key: str,
    dim: int,
    aggregation: str,
    ema_weight: float,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Applies :func:`aggregate` to ``(ids, daily)`` batches in ascending id order against yesterday's file."""
    reader = None
    if previous_data_file is not None and aggregation == "ema":
        reader = _SortedSnapshotReader(previous_data_file, key, dim)
    last_id: int | None = None
    for ids, daily in batches:
        if len(ids) == 0:
            continue
        if np.any(np.diff(ids) <= 0) or (last_id is not None and ids[0] <= last_id):
            raise ValueError("entity ids must be unique and ascending across export batches")
        last_id = int(ids[-1])
        if reader is None:
            yield ids, aggregate(daily, None, None, aggregation, ema_weight)
            continue
        found, previous = reader.lookup(ids)
        yield ids, aggregate(daily, previous, found, aggregation, ema_weight)


# --------------------------------------------------------------------------- export


def embed_batches(
    model: DermModel,
    entity: str,
    feature_batches: Iterable[dict[str, np.ndarray]],
    batch_size: int = 65_536,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Runs an entity tower over feature batches; yields ``(ids (n,), embeddings (n, D) float32)``."""
    keys = USER_KEYS if entity == "user" else PIN_KEYS
    model.eval()
    with torch.inference_mode():
        for features in feature_batches:
            ids = features[f"{entity}_id"]
            for start in range(0, len(ids), batch_size):
                part = {k: torch.from_numpy(features[k][start : start + batch_size]) for k in keys}
                yield ids[start : start + batch_size], model.embed(entity, part).numpy()


def write_snapshot(
    directory: Path,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    manifest: SnapshotManifest,
    row_group_rows: int = 65_536,
) -> SnapshotManifest:
    """Writes ``embeddings.parquet`` + ``manifest.json`` into ``directory`` atomically.

    Rows are streamed into a hidden temp folder next to ``directory`` which is
    renamed into place at the end, so a killed run never leaves half a snapshot.

    Args:
        directory: the snapshot folder (see :func:`training.snapshot.snapshot_dir`).
        batches: ``(ids (n,) int64, embeddings (n, dim) float32)`` in ascending id order.
        manifest: the manifest to write; ``row_count`` and ``data_sha256`` are filled in here.

    Returns:
        The written manifest.
    """
    directory = Path(directory)
    family, dim = manifest.family, manifest.dim
    schema = snapshot_schema(family)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    timestamp_us = int(manifest.event_timestamp.timestamp() * 1_000_000)
    rows = 0
    try:
        with pq.ParquetWriter(tmp / DATA_FILE, schema) as writer:
            for ids, embeddings in batches:
                n = len(ids)
                if embeddings.shape != (n, dim):
                    raise ValueError(f"{family}: embeddings of shape {embeddings.shape}, expected ({n}, {dim})")
                flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1), pa.float32())
                offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32), pa.int32())
                table = pa.table(
                    [
                        pa.array(ids, pa.int64()),
                        pa.array(np.full(n, timestamp_us, dtype=np.int64)).cast(schema.field(1).type),
                        pa.ListArray.from_arrays(offsets, flat),
                        pa.repeat(pa.scalar(manifest.model_version, pa.string()), n),
                    ],
                    schema=schema,
                )
                writer.write_table(table, row_group_size=row_group_rows)
                rows += n
        manifest = dataclasses.replace(manifest, row_count=rows, data_sha256=file_sha256(tmp / DATA_FILE))
        (tmp / MANIFEST_FILE).write_text(manifest.to_json() + "\n")
        if directory.exists():  # a concurrent run finished first; its snapshot is the same version
            shutil.rmtree(tmp)
            return read_manifest(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def snapshot_available_at(day: date, publish_delay: timedelta) -> datetime:
    """When day ``t``'s snapshot becomes available: ``t+1 00:00 UTC + publish_delay``."""
    return day_start(day + timedelta(days=1)) + publish_delay


def write_precomputed_snapshot(
    paths: PlatformPaths,
    family: str,
    day: date,
    ids: np.ndarray,
    vectors: np.ndarray,
    config_hash: str,
    publish_delay: timedelta = timedelta(hours=1),
) -> Path:
    """One day's snapshot from vectors computed elsewhere (benchmarks, tests, another trainer's export).

    The version is the one ``config_hash`` is registered under for the family's model (a new
    hash gets the next ``vN``), exactly as :func:`refresh_day` registers its own.

    Args:
        ids: ``(n,)`` entity ids in ascending order.
        vectors: ``(n, D)`` float32 embeddings.

    Returns:
        The snapshot folder, ready for the validation gate and publishing.
    """
    version = resolve_version(paths.snapshots_dir, family.split("_")[0], config_hash)
    ts = snapshot_available_at(day, publish_delay)
    manifest = SnapshotManifest(
        family=family,
        model_version=version,
        config_hash=config_hash,
        weights_sha256="0" * 64,
        dim=vectors.shape[1],
        snapshot_date=day,
        event_timestamp=ts,
        data_window_start=ts - timedelta(days=30),
        data_window_end=ts - publish_delay - timedelta(microseconds=1),
        row_count=0,
        aggregation="ema",
        ema_weight=0.8,
        created_at=ts,
    )
    directory = snapshot_dir(paths.snapshots_dir, family, version, day)
    write_snapshot(directory, [(np.asarray(ids, dtype=np.int64), vectors)], manifest)
    return directory


# --------------------------------------------------------------------------- training


def _build_model(cfg: UpstreamConfig) -> tuple[DermModel, torch.optim.Optimizer]:
    torch.manual_seed(cfg.train.seed)
    model = DermModel(cfg.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    return model, optimizer


def load_checkpoint(path: Path, cfg: UpstreamConfig) -> tuple[DermModel, torch.optim.Optimizer]:
    """Model and optimizer restored from a refresh checkpoint."""
    model, optimizer = _build_model(cfg)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return model, optimizer


def train_one_day(
    model: DermModel,
    optimizer: torch.optim.Optimizer,
    dataset: UpstreamDataset,
    cfg: TrainConfig,
    day: date,
) -> dict[str, float]:
    """``cfg.epochs`` passes over the day's examples in a seeded order; returns mean losses."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + day.toordinal())
    model.train()
    totals = {"loss": 0.0, "bce": 0.0, "contrastive": 0.0}
    steps = 0
    for _ in range(cfg.epochs):
        for index in torch.randperm(len(dataset), generator=generator).split(cfg.batch_size):
            batch = dataset[index]
            logit, user_emb, pin_emb = model(batch)
            loss = derm_loss(
                logit,
                batch["label"],
                user_emb,
                pin_emb,
                batch["pin_logq"],
                batch["pin_id"],
                temperature=cfg.temperature,
                contrastive_weight=cfg.contrastive_weight,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            optimizer.step()
            totals["loss"] += loss.total.item()
            totals["bce"] += loss.bce.item()
            totals["contrastive"] += loss.contrastive.item()
            steps += 1
    return {k: v / max(steps, 1) for k, v in totals.items()}


def score_day(
    model: DermModel, events_dir: Path, day: date, model_name: str, features: FeatureConfig
) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, logits)`` of the model on ``day``'s examples (for held-out evaluation)."""
    dataset = UpstreamDataset(training_arrays(events_dir, day, model_name, features))
    model.eval()
    with torch.inference_mode():
        logits = [model(dataset[i])[0] for i in torch.arange(len(dataset)).split(4096)]
    return dataset.tensors["label"].numpy(), torch.cat(logits).numpy() if logits else np.zeros(0, np.float32)


# --------------------------------------------------------------------------- refresh


def _families(model_name: str) -> dict[str, str]:
    return {entity: f"{model_name}_{entity}" for entity in ENTITIES}


def _day_done(paths: PlatformPaths, model_name: str, version: str, day: date) -> bool:
    return checkpoint_path(paths.models_dir, model_name, version, day).exists() and all(
        (snapshot_dir(paths.snapshots_dir, family, version, day) / MANIFEST_FILE).exists()
        for family in _families(model_name).values()
    )


def refresh_day(
    model_name: str,
    day: date,
    paths: PlatformPaths,
    cfg: UpstreamConfig | None = None,
) -> list[SnapshotManifest]:
    """Trains, exports and snapshots one day of one model; a no-op if the day already exists.

    Args:
        model_name: ``"ctr"`` or ``"cvr"``.
        day: the day ``t`` to refresh; must be in the event log's span.
        paths: where the event log, snapshots and checkpoints live.
        cfg: the config defining the model version.

    Returns:
        The manifests of ``<model>_user`` and ``<model>_pin`` for ``day``.

    Raises:
        RefreshGapError: ``day`` is not the log's first day and day ``t-1`` of this
            version has not been refreshed.
    """
    cfg = cfg or UpstreamConfig()
    if model_name not in OBJECTIVES:
        raise ValueError(f"unknown model {model_name!r}: expected one of {sorted(OBJECTIVES)}")
    config_hash = cfg.config_hash(model_name)
    version = resolve_version(paths.snapshots_dir, model_name, config_hash)
    families = _families(model_name)
    targets = {entity: snapshot_dir(paths.snapshots_dir, family, version, day) for entity, family in families.items()}
    if _day_done(paths, model_name, version, day):
        return [read_manifest(targets[entity]) for entity in ENTITIES]

    days = log_days(paths.events_dir)
    if not days[0] <= day <= days[-1]:
        raise ValueError(f"{model_name} {version}: {day} is outside the event log ({days[0]} .. {days[-1]})")
    previous_day = day - timedelta(days=1)
    warm_start = day != days[0]
    if warm_start and not _day_done(paths, model_name, version, previous_day):
        raise RefreshGapError(
            f"{model_name} {version}: no snapshot for {previous_day}; run the refresh for that day first"
        )

    version_dir = checkpoint_path(paths.models_dir, model_name, version, day).parent
    config_file = version_dir / "config.json"
    if not config_file.exists():
        payload = {"model_version": version, "config_hash": config_hash, **cfg.version_payload(model_name)}
        _write_atomic(config_file, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())

    checkpoint = checkpoint_path(paths.models_dir, model_name, version, day)
    if checkpoint.exists():  # trained before an interrupted export; training is deterministic anyway
        model, _ = load_checkpoint(checkpoint, cfg)
    else:
        if warm_start:
            model, optimizer = load_checkpoint(
                checkpoint_path(paths.models_dir, model_name, version, previous_day), cfg
            )
        else:
            model, optimizer = _build_model(cfg)
        arrays = training_arrays(paths.events_dir, day, model_name, cfg.features)
        if len(arrays["label"]):
            train_one_day(model, optimizer, UpstreamDataset(arrays), cfg.train, day)
        buffer = io.BytesIO()  # bytes, not a path: torch.save names the archive after the file
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
        _write_atomic(checkpoint, buffer.getvalue())
    weights_sha256 = file_sha256(checkpoint)

    window = events_used_window(paths.events_dir, day, cfg.features, cfg.refresh.active_window_days)
    if window is None:
        raise ValueError(f"{model_name} {version}: no events in the window ending {day}; nothing to embed")
    available_at = snapshot_available_at(day, cfg.refresh.publish_delay)
    if available_at < window[1]:  # unreachable with day-bounded reads; guards point-in-time correctness
        raise RuntimeError(f"{model_name} {version}: snapshot of {day} would be available before its newest event")

    manifests = []
    for entity, family in families.items():
        if (targets[entity] / MANIFEST_FILE).exists():
            manifests.append(read_manifest(targets[entity]))
            continue
        previous_file = None
        if warm_start:
            previous_file = snapshot_dir(paths.snapshots_dir, family, version, previous_day) / DATA_FILE
        features = entity_feature_batches(
            paths.events_dir,
            entity,
            day,
            cfg.features,
            cfg.refresh.active_window_days,
            cfg.refresh.inference_batch_size,
        )
        batches = aggregate_batches(
            embed_batches(model, entity, features, cfg.refresh.inference_batch_size),
            previous_file,
            join_key(family),
            cfg.model.dim,
            cfg.refresh.aggregation,
            cfg.refresh.ema_weight,
        )
        manifest = SnapshotManifest(
            family=family,
            model_version=version,
            config_hash=config_hash,
            weights_sha256=weights_sha256,
            dim=cfg.model.dim,
            snapshot_date=day,
            event_timestamp=available_at,
            data_window_start=window[0],
            data_window_end=window[1],
            row_count=0,
            aggregation=cfg.refresh.aggregation,
            ema_weight=cfg.refresh.ema_weight,
            created_at=datetime.now(UTC),
        )
        manifests.append(write_snapshot(targets[entity], batches, manifest, cfg.refresh.inference_batch_size))
    return manifests


def refresh_days(paths: PlatformPaths, through_date: date | None = None, max_days: int | None = None) -> list[date]:
    """Every calendar day from the log's first day to its last (or ``through_date``), at most ``max_days``."""
    days = log_days(paths.events_dir)
    last = min(days[-1], through_date) if through_date else days[-1]
    span = [days[0] + timedelta(days=i) for i in range((last - days[0]).days + 1)]
    return span[:max_days] if max_days is not None else span


def refresh(
    paths: PlatformPaths,
    model_names: Iterable[str] = ("ctr", "cvr"),
    cfg: UpstreamConfig | None = None,
    through_date: date | None = None,
    max_days: int | None = None,
    on_day: Callable[[str, date, list[SnapshotManifest]], None] | None = None,
) -> dict[str, list[SnapshotManifest]]:
    """Refreshes every day of the log in order for each model; days already done are skipped.

    Args:
        paths: platform locations.
        model_names: models to refresh (``"ctr"``, ``"cvr"``).
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
        for model_name in model_names:
            manifests = refresh_day(model_name, day, paths, cfg)
            out.setdefault(model_name, []).extend(manifests)
            if on_day is not None:
                on_day(model_name, day, manifests)
    return out
