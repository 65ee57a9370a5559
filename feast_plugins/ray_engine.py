"""Feast batch engine that splits materialization into Ray tasks, each writing its slice through the fast writer.

Configured in ``feature_store.cluster.yaml``::

    batch_engine:
      type: derm.feast_plugins.ray_engine.RayMaterializationEngine
      ray_address: ${DERM_RAY_ADDRESS}   # empty: a local Ray with num_cpus and object_store_memory below
      num_cpus: 2
      slices: 4                           # slot ranges: the tasks of one range write to the same masters
      task_rows: 250000                   # rows per Ray task
      storage_path: /shared/derm-materialize   # on a real cluster: storage every worker can read

It computes exactly what :class:`~derm.feast_plugins.vector_engine.VectorMaterializationEngine`
computes (the latest row per entity in ``[start, end]``, from the offline store's
``pull_latest_from_table_or_query``) and splits the writing:

1. **Slice.** The driver streams the pull's record batches, computes every row's Redis
   key and hash slot with NumPy (:func:`~derm.feast_plugins.redis_format.key_slots`),
   and appends each row to the Parquet file of its slot range (``slot * slices // 16384``).
   A file that reaches ``task_rows`` rows is closed and handed to a Ray task at once, so
   the driver keeps slicing while the workers write.
2. **Write.** Each Ray task streams its file into
   :meth:`FastRedisOnlineStore.write_arrow <derm.feast_plugins.redis_online_store.FastRedisOnlineStore.write_arrow>`:
   on a Redis Cluster, the slot-grouped RESP writer, one pipelined stream per master
   (a slot range spans one or two masters), with its dedup read, ``WAIT`` and retries.

The pull yields one row per entity, so no two tasks hold the same key: the order in which
tasks finish cannot change what Redis holds, and the result is byte-identical to stock
``feast materialize`` (``tests/test_ray_engine.py``). Tasks get file paths, never data;
the files are deleted when the view is done, whether it succeeded or not. Views the fast
path does not cover run the stock local engine in the driver, as with the vector engine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from feast import FeatureView, RepoConfig
from feast.infra.common.materialization_job import MaterializationTask
from feast.infra.offline_stores.offline_store import OfflineStore
from feast.infra.online_stores.online_store import OnlineStore
from feast.infra.registry.base_registry import BaseRegistry
from feast.protos.feast.core.FeatureView_pb2 import FeatureView as FeatureViewProto
from pydantic import PositiveInt

from derm.feast_plugins.ray_asof_offline_store import RayAsofOfflineStoreConfig, ensure_ray
from derm.feast_plugins.redis_format import encode_entity_keys, key_slots
from derm.feast_plugins.redis_online_store import FastRedisOnlineStore
from derm.feast_plugins.vector_engine import (
    VectorMaterializationEngine,
    VectorMaterializationEngineConfig,
    record_batches,
)

ENGINE_TYPE = "derm.feast_plugins.ray_engine.RayMaterializationEngine"
SLOTS = 16384


class RayMaterializationEngineConfig(VectorMaterializationEngineConfig):
    """The vector engine's settings plus where Ray runs, how rows are sliced, and where slices are staged."""

    type: Literal["derm.feast_plugins.ray_engine.RayMaterializationEngine"] = ENGINE_TYPE  # type: ignore[assignment]

    ray_address: str | None = None
    """A running Ray cluster (``ray://host:10001`` or ``auto``); None or empty starts a local Ray."""

    num_cpus: PositiveInt | None = 2
    """CPUs of the local Ray (ignored with ``ray_address``)."""

    object_store_memory: PositiveInt | None = 256 * 1024 * 1024
    """Bytes of the local Ray's object store; small, since tasks pass Parquet paths, not data."""

    slices: PositiveInt = 4
    """Slot ranges (``slot * slices // 16384``): the rows of one range go to the same one or two masters."""

    task_rows: PositiveInt = 250_000
    """Rows per Ray task at most; a slot range with more rows is written by several tasks."""

    storage_path: str | None = None
    """Folder for the staged slices (storage every Ray worker can read on a real cluster); None = a temp dir."""


def write_slice(repo_config: RepoConfig, view_proto: bytes, path: str, read_batch_rows: int) -> int:
    """Ray task: stream one staged slice into the online store with the fast writer; returns rows written.

    Args:
        repo_config: the driver's repo config (project, key serialization, online store settings).
        view_proto: the feature view, serialized (``FeatureView.to_proto()``).
        path: the slice's Parquet file; columns named as in the feature view, one row per entity.
        read_batch_rows: rows per record batch read from the file.
    """
    view = FeatureView.from_proto(FeatureViewProto.FromString(view_proto))
    parquet = pq.ParquetFile(path, pre_buffer=False)
    store = FastRedisOnlineStore()
    return store.write_arrow(repo_config, view, parquet.iter_batches(batch_size=read_batch_rows), unique_keys=True)


class _Slicer:
    """Appends rows to the Parquet file of their slot range; yields each file once it is full or at the end."""

    def __init__(self, directory: str, slices: int, task_rows: int) -> None:
        self.directory = directory
        self.slices = slices
        self.task_rows = task_rows
        self.writers: dict[int, tuple[pq.ParquetWriter, str]] = {}
        self.rows: dict[int, int] = {}

    def add(self, batch: pa.RecordBatch, slots: np.ndarray) -> Iterator[str]:
        ranges = slots * self.slices // SLOTS
        for part in np.unique(ranges).tolist():
            rows = batch.filter(pa.array(ranges == part))
            while rows.num_rows:
                if part not in self.writers:
                    path = os.path.join(self.directory, f"slice-{part}-{uuid.uuid4().hex}.parquet")
                    self.writers[part] = (pq.ParquetWriter(path, rows.schema), path)
                    self.rows[part] = 0
                room = self.task_rows - self.rows[part]
                self.writers[part][0].write_batch(rows.slice(0, room))
                self.rows[part] += min(room, rows.num_rows)
                rows = rows.slice(room)
                if self.rows[part] == self.task_rows:
                    yield self._close(part)

    def _close(self, part: int) -> str:
        writer, path = self.writers.pop(part)
        writer.close()
        del self.rows[part]
        return path

    def finish(self) -> Iterator[str]:
        for part in sorted(self.writers):
            yield self._close(part)

    def abort(self) -> None:
        for writer, _ in self.writers.values():
            writer.close()
        self.writers.clear()


class RayMaterializationEngine(VectorMaterializationEngine):
    """The vector engine with its writes split into Ray tasks, one per slice of the slot space."""

    config_class = RayMaterializationEngineConfig
    config: RayMaterializationEngineConfig

    def __init__(
        self, *, repo_config: RepoConfig, offline_store: OfflineStore, online_store: OnlineStore, **settings: Any
    ):
        super().__init__(repo_config=repo_config, offline_store=offline_store, online_store=online_store, **settings)
        self.last_task_rows: list[int] = []
        """Rows each Ray task of the last fast-path view wrote (what the tests and the benchmark inspect)."""

    def materialize_latest(self, registry: BaseRegistry, task: MaterializationTask) -> int:
        """Slice the latest row per entity in ``[start, end]`` by slot range; Ray tasks write the slices."""
        import ray

        config = self.config
        ensure_ray(
            RayAsofOfflineStoreConfig(
                ray_address=config.ray_address or None,
                num_cpus=config.num_cpus,
                object_store_memory=config.object_store_memory,
            )
        )
        view = task.feature_view
        job = self.pull_latest(registry, task)
        key_types = {field.name: field.dtype.to_value_type() for field in view.entity_columns}
        field_mapping = view.batch_source.field_mapping
        root = config.storage_path or tempfile.gettempdir()
        directory = os.path.join(root, f"derm-ray-materialize-{uuid.uuid4().hex}")
        os.makedirs(directory)
        write = ray.remote(num_cpus=1)(write_slice)
        view_proto = view.to_proto().SerializeToString()
        repo_config = ray.put(self.repo_config)
        slicer = _Slicer(directory, config.slices, config.task_rows)
        pending: list[Any] = []
        source = record_batches(job, config.read_batch_rows)
        try:

            def submit(paths: Iterator[str]) -> None:
                for path in paths:
                    pending.append(write.remote(repo_config, view_proto, path, config.read_batch_rows))

            for batch in source:
                if field_mapping:
                    # The local engine's source node renames source columns to the view's names the same way.
                    batch = batch.rename_columns([field_mapping.get(name, name) for name in batch.schema.names])
                if batch.num_rows == 0:
                    continue
                keys = encode_entity_keys(
                    batch, key_types, self.repo_config.project, self.repo_config.entity_key_serialization_version
                )
                submit(slicer.add(batch, key_slots(keys)))
            submit(slicer.finish())
            try:
                self.last_task_rows = ray.get(pending)
            except ray.exceptions.RayTaskError as error:
                # The task's own exception (e.g. a vector of the wrong length, naming the column), not Ray's wrapper.
                cause = getattr(error, "cause", None)
                raise (cause if isinstance(cause, Exception) else error) from None
            return sum(self.last_task_rows)
        finally:
            # As the vector engine: never leave an open result on Ibis' process-wide DuckDB connection.
            source.close()
            slicer.abort()
            if pending:
                ray.wait(pending, num_returns=len(pending))  # no task may still read a file about to be deleted
            shutil.rmtree(directory, ignore_errors=True)
