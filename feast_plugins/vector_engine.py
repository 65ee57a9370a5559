"""Feast batch engine that materializes into :class:`FastRedisOnlineStore` without per-row protobuf.

Configured in ``feature_store.yaml``::

    batch_engine:
      type: derm.feast_plugins.vector_engine.VectorMaterializationEngine
      read_batch_rows: 65536   # rows per record batch streamed from the offline store

For a plain feature view going to a ``FastRedisOnlineStore``, a materialization
task pulls the latest row per entity in ``[start, end]`` with the offline
store's ``pull_latest_from_table_or_query`` (what the local engine's source read
+ dedup nodes compute: event time, then created time, descending), streams it
in record batches and hands them to the store's pipelined Arrow writer.
Everything else (transformations, aggregations, filters, validation, views
built on other views, offline writes, other online stores) runs the stock local
engine. ``feast materialize``, ``materialize-incremental`` and
``FeatureStore.materialize`` call it exactly as they call the local engine.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any, Literal

import pyarrow as pa
from feast import FeatureView, RepoConfig
from feast.infra.common.materialization_job import MaterializationJobStatus, MaterializationTask
from feast.infra.compute_engines.local.compute import LocalComputeEngine
from feast.infra.compute_engines.local.job import LocalMaterializationJob
from feast.infra.offline_stores.offline_store import OfflineStore, RetrievalJob
from feast.infra.online_stores.online_store import OnlineStore
from feast.infra.registry.base_registry import BaseRegistry
from feast.repo_config import FeastConfigBaseModel
from pydantic import PositiveInt

from derm.feast_plugins import compat
from derm.feast_plugins.redis_online_store import FastRedisOnlineStore


class VectorMaterializationEngineConfig(FeastConfigBaseModel):
    """Settings of the vector engine (the stock local engine's plus the streaming batch size)."""

    type: Literal[
        "derm.feast_plugins.vector_engine.VectorMaterializationEngine",
        "materialization.vector_engine.VectorMaterializationEngine",  # 0.1 path, kept by a shim until 0.3
    ] = "derm.feast_plugins.vector_engine.VectorMaterializationEngine"
    backend: str | None = None
    """DataFrame backend of the local-engine fallback (``pandas``/``polars``), as for ``type: local``."""
    read_batch_rows: PositiveInt = 65_536
    """Rows per record batch read from the offline store; with the store's queue this bounds memory."""


def _duckdb_batches(expression: Any, rows: int) -> pa.RecordBatchReader | None:
    """A streaming reader over an Ibis expression bound to DuckDB, or None for other backends.

    Ibis' own ``to_pyarrow_batches`` calls a DuckDB method that DuckDB 2 removed, so this
    runs the compiled query on the backend's connection the way Ibis does and reads it with
    a relation's ``to_arrow_reader``: DuckDB produces the next batches while the current one is written.
    """
    try:
        backend = compat.ibis_backend(expression)
    except Exception:
        return None
    if getattr(backend, "name", None) != "duckdb":
        return None
    compat.run_ibis_pre_execute_hooks(backend, expression)
    return backend.con.sql(backend.compile(expression.as_table())).to_arrow_reader(rows)


def record_batches(job: RetrievalJob, rows: int) -> Generator[pa.RecordBatch, None, None]:
    """The job's result as record batches of at most ``rows`` rows, streamed when the store can."""
    expression = getattr(job, "table", None)
    reader = _duckdb_batches(expression, rows) if expression is not None else None
    if reader is None:
        yield from job.to_arrow().to_batches(max_chunksize=rows)
        return
    try:
        for batch in reader:
            # DuckDB's batch size is a hint: keep every batch within the bound.
            for start in range(0, batch.num_rows, rows):
                yield batch.slice(start, rows)
    finally:
        reader.close()


class VectorMaterializationEngine(LocalComputeEngine):
    """The local engine, with a vectorized, pipelined path for views materialized into fast Redis."""

    config_class: type[VectorMaterializationEngineConfig] = VectorMaterializationEngineConfig
    """The settings model of ``batch_engine`` (a subclass engine brings its own)."""

    def __init__(
        self, *, repo_config: RepoConfig, offline_store: OfflineStore, online_store: OnlineStore, **settings: Any
    ):
        # Feast passes the raw ``batch_engine`` mapping from feature_store.yaml (including ``type``).
        self.config = self.config_class(**settings)
        super().__init__(
            backend=self.config.backend,
            repo_config=repo_config,
            offline_store=offline_store,
            online_store=online_store,
        )

    def uses_fast_path(self, task: MaterializationTask) -> bool:
        """True when the stock local plan for this task is exactly "latest row per entity -> online store"."""
        view = task.feature_view
        return (
            isinstance(self.online_store, FastRedisOnlineStore)
            and type(view) is FeatureView
            and view.batch_source is not None
            and not view.source_views
            and view.stream_source is None
            and view.online
            and not view.offline
            and task.only_latest
            and not getattr(view, "feature_transformation", None)
            and not getattr(view, "aggregations", None)
            and not getattr(view, "filter", None)
            and not getattr(view, "enable_validation", False)
        )

    def _materialize_one(
        self, registry: BaseRegistry, task: MaterializationTask, **kwargs: Any
    ) -> LocalMaterializationJob:
        # Feast's private per-task hook (ComputeEngine.materialize calls it); tests/test_feast_compat.py checks it.
        if not self.uses_fast_path(task):
            return super()._materialize_one(registry, task, **kwargs)
        job_id = f"{task.feature_view.name}-{task.start_time}-{task.end_time}"
        try:
            self.materialize_latest(registry, task)
        except Exception as error:
            # As the local engine: the provider raises the job's error to the caller.
            return LocalMaterializationJob(job_id=job_id, status=MaterializationJobStatus.ERROR, error=error)
        return LocalMaterializationJob(job_id=job_id, status=MaterializationJobStatus.SUCCEEDED)

    def pull_latest(self, registry: BaseRegistry, task: MaterializationTask) -> Any:
        """The offline store's latest row per entity of ``task``'s view in ``[start, end]`` (a retrieval job)."""
        view = task.feature_view
        entities = [registry.get_entity(name, task.project) for name in view.entities]
        join_keys, feature_columns, timestamp_column, created_column = compat.get_column_names(view, entities)
        return self.offline_store.pull_latest_from_table_or_query(
            config=self.repo_config,
            data_source=view.batch_source,
            join_key_columns=join_keys,
            feature_name_columns=feature_columns,
            timestamp_field=timestamp_column,
            created_timestamp_column=created_column,
            start_date=task.start_time,
            end_date=task.end_time,
        )

    def materialize_latest(self, registry: BaseRegistry, task: MaterializationTask) -> int:
        """Write the latest row per entity in ``[start, end]`` to the online store; returns rows written."""
        view = task.feature_view
        job = self.pull_latest(registry, task)
        source = record_batches(job, self.config.read_batch_rows)
        batches: Iterator[pa.RecordBatch] = source
        field_mapping = view.batch_source.field_mapping
        if field_mapping:
            # The local engine's source node renames source columns to the view's names the same way.
            batches = (
                batch.rename_columns([field_mapping.get(name, name) for name in batch.schema.names]) for batch in source
            )
        assert isinstance(self.online_store, FastRedisOnlineStore)
        try:
            # One row per entity by construction (the pull deduplicates on the join keys).
            return self.online_store.write_arrow(self.repo_config, view, batches, unique_keys=True)
        finally:
            # The stream holds an open result on Ibis' process-wide DuckDB connection; when the write fails,
            # the traceback keeps this generator alive, and every later Feast query on that connection would
            # fail with "connection has an open result". Close it now, not at garbage collection.
            source.close()
