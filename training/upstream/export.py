"""The daily embedding export: entity towers over every active entity, the moving average, atomic snapshots.

Paper: "Decoupled Entity Representation Learning for Pinterest Ads Ranking",
https://arxiv.org/abs/2509.04337. Day ``t``'s export embeds every user and Pin
active in the last ``active_window_days`` (one embedding per entity per day),
smooths it with ``E(t) = w * E(t-1) + (1 - w) * E_daily(t)`` (or overwrites) and
writes one snapshot per family, stamped ``t+1 00:00 UTC + publish_delay``. Every
step streams id-ordered batches, so memory stays bounded whatever the number of
entities.

Example::

    batches = aggregate_batches(embed_batches(model, "user", features), previous_file, "user_id", 64, "ema", 0.8)
    manifest = write_snapshot(snapshot_dir(...), batches, manifest)

Inference on Ray Data: with ``ray=RayExport(...)`` (what :func:`export_engine` returns on
the cluster profile, ``DERM_PROFILE=cluster``, or with ``DERM_EXPORT_ENGINE=ray``),
:func:`embed_batches` runs the tower as ``ray.data`` ``map_batches`` over the entity
batches in Ray tasks, each worker process loading the model once; the batches come back
in id order and go through the same moving average and snapshot writer, so the snapshot
is the single-process one, bit for bit (``tests/test_ray_export.py``).
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from derm.core.days import day_end
from derm.core.files import publish_directory
from derm.core.model_versions import ModelVersions
from derm.core.naming import objective_of
from derm.core.paths import RAY_ADDRESS_ENV, PlatformPaths, active_profile
from derm.core.snapshot import (
    DATA_FILE,
    MANIFEST_FILE,
    SnapshotManifest,
    file_sha256,
    read_manifest,
    snapshot_dir,
    snapshot_schema,
)
from derm.training.upstream.config import AGGREGATIONS
from derm.training.upstream.model import PIN_KEYS, USER_KEYS, DermModel

# "ray" or "local": where the export runs the towers; unset = Ray on the cluster profile, else in process.
EXPORT_ENGINE_ENV = "DERM_EXPORT_ENGINE"
EXPORT_ENGINES = ("local", "ray")


def aggregate(
    daily: np.ndarray,
    previous: np.ndarray | None,
    has_previous: np.ndarray | None,
    aggregation: str = "ema",
    ema_weight: float = 0.8,
    active: np.ndarray | None = None,
    renormalize: bool = False,
) -> np.ndarray:
    """``E(t) = w * E(t-1) + (1 - w) * E_daily(t)`` where ``E(t-1)`` exists, else ``E_daily(t)``.

    Args:
        daily: ``(N, D)`` today's embeddings.
        previous: ``(N, D)`` yesterday's aggregated embeddings aligned with ``daily``
            (rows where ``has_previous`` is false are ignored), or ``None``.
        has_previous: ``(N,)`` bool, whether the entity had an embedding yesterday.
        aggregation: ``"ema"`` or ``"overwrite"`` (``E(t) = E_daily(t)``).
        ema_weight: ``w``.
        active: ``(N,)`` bool, whether the entity had an event on day ``t``; an idle entity with
            an embedding yesterday keeps it unchanged (carried forward, as the paper keeps the
            last embedding of each entity). ``None``: every entity is refreshed.
        renormalize: scale every row to unit L2 norm (the average of unit vectors is shorter than
            one, and the Pin index ranks by inner product).

    Returns:
        ``(N, D)`` float32.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}: expected one of {AGGREGATIONS}")
    out = np.asarray(daily, dtype=np.float32)
    carried = np.zeros(len(out), dtype=bool)
    if previous is not None and has_previous is not None:
        previous = np.asarray(previous, dtype=np.float32)
        if aggregation == "ema":
            out = np.where(has_previous[:, None], ema_weight * previous + (1.0 - ema_weight) * out, out)
        if active is not None:
            carried = has_previous & ~active
    if renormalize:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out = out / np.where(norms > 0, norms, 1.0)
    if carried.any():  # bit for bit: yesterday's vector was normalised when it was written
        out = np.where(carried[:, None], previous, out)
    return out.astype(np.float32)


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
    active_ids: np.ndarray | None = None,
    renormalize: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Applies :func:`aggregate` to ``(ids, daily)`` batches in ascending id order against yesterday's file.

    ``active_ids`` (sorted) are the entities with an event on the day; the others keep yesterday's
    vector when they have one (``None``: every entity is refreshed).
    """
    reader = None
    if previous_data_file is not None and (aggregation == "ema" or active_ids is not None):
        reader = _SortedSnapshotReader(previous_data_file, key, dim)
    last_id: int | None = None
    for ids, daily in batches:
        if len(ids) == 0:
            continue
        if np.any(np.diff(ids) <= 0) or (last_id is not None and ids[0] <= last_id):
            raise ValueError("entity ids must be unique and ascending across export batches")
        last_id = int(ids[-1])
        active = None if active_ids is None else np.isin(ids, active_ids, assume_unique=True)
        if reader is None:
            yield ids, aggregate(daily, None, None, aggregation, ema_weight, renormalize=renormalize)
            continue
        found, previous = reader.lookup(ids)
        yield ids, aggregate(daily, previous, found, aggregation, ema_weight, active, renormalize)


@dataclass(frozen=True)
class RayExport:
    """Where and how wide the export's inference runs on Ray.

    Args:
        ray_address: a running Ray cluster (``ray://head:10001`` or ``auto``); None starts a local Ray.
        workers: Ray tasks at a time, one CPU each (each worker process keeps its copy of the model).
        num_cpus: CPUs of the local Ray (ignored with ``ray_address``).
        object_store_memory: bytes of the local Ray's object store (the feature batches wait there).
        threads: torch threads per task; None leaves Ray's default (one per CPU the task holds).
    """

    ray_address: str | None = None
    workers: int = 2
    num_cpus: int = 2
    object_store_memory: int = 256 * 1024 * 1024
    threads: int | None = None


def export_engine() -> RayExport | None:
    """The configured export engine: a :class:`RayExport` for Ray, None for the single-process export.

    ``DERM_EXPORT_ENGINE=ray|local`` decides; unset, the cluster profile (``DERM_PROFILE=cluster``) runs on
    the Ray of ``DERM_RAY_ADDRESS`` (empty: a local Ray) and every other profile in process.
    """
    engine = os.environ.get(EXPORT_ENGINE_ENV) or ("ray" if active_profile() == "cluster" else "local")
    if engine not in EXPORT_ENGINES:
        raise ValueError(f"{EXPORT_ENGINE_ENV}={engine!r}: expected one of {', '.join(EXPORT_ENGINES)}")
    return RayExport(ray_address=os.environ.get(RAY_ADDRESS_ENV) or None) if engine == "ray" else None


def _embed_in_batches(
    model: DermModel, entity: str, features: dict[str, np.ndarray], batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    keys = USER_KEYS if entity == "user" else PIN_KEYS
    ids = features[f"{entity}_id"]
    for start in range(0, len(ids), batch_size):
        part = {k: torch.from_numpy(np.ascontiguousarray(features[k][start : start + batch_size])) for k in keys}
        yield ids[start : start + batch_size], model.embed(entity, part).numpy()


def embed_batches(
    model: DermModel,
    entity: str,
    feature_batches: Iterable[dict[str, np.ndarray]],
    batch_size: int = 65_536,
    ray: RayExport | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Runs an entity tower over feature batches; yields ``(ids (n,), embeddings (n, D) float32)``.

    Args:
        feature_batches: id-ordered feature batches (``{f"{entity}_id": (n,), <tower inputs>: (n, ...)}``).
        batch_size: rows per forward pass (a feature batch is cut into passes of this size).
        ray: run the passes on Ray Data (:func:`embed_batches_on_ray`); None runs them in this process.
    """
    if ray is not None:
        yield from embed_batches_on_ray(model, entity, feature_batches, batch_size, ray)
        return
    model.eval()
    with torch.inference_mode():
        for features in feature_batches:
            yield from _embed_in_batches(model, entity, features, batch_size)


# The tower a Ray worker process loaded last, with its object's id: an export's blocks are many tasks, and a
# worker process that runs several of them reads and unpickles the model once (each export puts its model
# anew, so only the last one is ever asked for again).
_loaded_tower: tuple[str, DermModel] | None = None


def _embed_block(
    block: dict[str, np.ndarray], *, model: list[Any], entity: str, batch_size: int, threads: int | None
) -> dict[str, np.ndarray]:
    """A Ray Data task: embeds one whole block (one feature batch) with the tower in ``model[0]`` (an ObjectRef).

    The ref is wrapped in a list so that Ray passes it through unresolved: it is fetched only by a
    process that has not loaded that model yet.
    """
    import ray

    global _loaded_tower
    (ref,) = model
    if _loaded_tower is None or _loaded_tower[0] != ref.hex():
        tower = torch.load(io.BytesIO(ray.get(ref)), weights_only=False)
        tower.eval()
        _loaded_tower = (ref.hex(), tower)
    tower = _loaded_tower[1]
    if threads:
        torch.set_num_threads(threads)
    # Blocks arrive read-only (shared memory); torch wants writable arrays (a copy of one batch).
    block = {name: values if values.flags.writeable else values.copy() for name, values in block.items()}
    with torch.inference_mode():
        parts = list(_embed_in_batches(tower, entity, block, batch_size))
    return {"id": np.concatenate([ids for ids, _ in parts]), "embedding": np.concatenate([e for _, e in parts])}


def embed_batches_on_ray(
    model: DermModel,
    entity: str,
    feature_batches: Iterable[dict[str, np.ndarray]],
    batch_size: int,
    config: RayExport,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`embed_batches` as ``ray.data`` ``map_batches`` over the feature batches, in Ray tasks.

    Tasks, not an actor pool: a pool's actors start (a process importing torch, seconds each) for
    every dataset, i.e. for every family of every day, where tasks reuse Ray's worker processes,
    which load the model once per export (:func:`_embed_block`).

    Each feature batch becomes one block (put in Ray's object store as it is read, so the
    driver holds one batch at a time); a task embeds a whole block in the same passes of
    ``batch_size`` rows as the single-process export, so every vector is the same; the
    output blocks are read back in order (``preserve_order``), ids ascending as they went in.

    Yields:
        ``(ids (n,) int64, embeddings (n, D) float32)`` per feature batch, in input order.
    """
    import ray as ray_module
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    from derm.feast_plugins.ray_asof_offline_store import RayAsofOfflineStoreConfig, ensure_ray

    ensure_ray(
        RayAsofOfflineStoreConfig(
            ray_address=config.ray_address, num_cpus=config.num_cpus, object_store_memory=config.object_store_memory
        )
    )
    refs = []
    for features in feature_batches:
        if len(features[f"{entity}_id"]) == 0:
            continue
        columns = {
            name: ArrowTensorArray.from_numpy(values) if values.ndim > 1 else pa.array(values)
            for name, values in features.items()
        }
        refs.append(ray_module.put(pa.table(columns)))
    if not refs:
        return
    buffer = io.BytesIO()
    torch.save(model, buffer)
    model_ref = ray_module.put(buffer.getvalue())
    context = ray.data.DataContext.get_current()
    preserve_order = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # the moving average merge-joins by ascending id
    try:
        embedded = ray.data.from_arrow_refs(refs).map_batches(
            _embed_block,
            fn_kwargs={"model": [model_ref], "entity": entity, "batch_size": batch_size, "threads": config.threads},
            batch_size=None,  # one feature batch per call: the same forward passes as in process
            batch_format="numpy",
            compute=ray.data.TaskPoolStrategy(size=config.workers),
            num_cpus=1,
        )
        for block in embedded.iter_batches(batch_size=None, batch_format="numpy"):
            ids, vectors = block["id"].astype(np.int64, copy=False), np.asarray(block["embedding"], dtype=np.float32)
            # Cut as the in-process export yields (one piece per forward pass): the snapshot's row groups match.
            for start in range(0, len(ids), batch_size):
                yield ids[start : start + batch_size], vectors[start : start + batch_size]
    finally:
        context.execution_options.preserve_order = preserve_order


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
        directory: the snapshot folder (see :func:`derm.core.snapshot.snapshot_dir`).
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
        publish_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def snapshot_available_at(day: date, publish_delay: timedelta) -> datetime:
    """When day ``t``'s snapshot becomes available: ``t+1 00:00 UTC + publish_delay``."""
    return day_end(day) + publish_delay


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
    version = ModelVersions(paths.snapshots_dir).resolve(objective_of(family), config_hash)
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
