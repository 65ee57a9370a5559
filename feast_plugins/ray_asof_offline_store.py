"""Point-in-time retrieval on Ray: the DuckDB ASOF kernel per hash bucket of the join key, results to Parquet.

The single-node ASOF store (:mod:`derm.feast_plugins.asof_offline_store`) builds the
whole training set in one process. This store splits the same computation so that no
process ever holds more than one bucket:

1. **Partition.** The entity rows and every view's source rows are hash-partitioned by
   join key (``hash(key) % buckets``, the key cast to text on both sides so that an
   ``int32`` entity column and an ``int64`` source column land in the same bucket),
   each source by a Ray task running DuckDB, written as Parquet under
   ``storage_path/<job>/``.
2. **Join.** One Ray task per bucket runs the very query the single-node store runs
   (``asof_offline_store._asof_query``: one ASOF JOIN per view, TTL and created-timestamp
   rules included) on that bucket's rows only, and writes its result to its own Parquet
   file as soon as it finishes.

Every row of an entity and every row of its history fall in the same bucket, so the
result is exactly the single-node result, whatever the data: correct by construction,
with no time windows. Views keyed on another entity (a Pin view beside user views) are a
second round: round 1's output is re-partitioned by the Pin key and joined again.

The driver never reads the result unless asked: ``job.to_parquet_files()`` (or
``to_remote_storage()``) returns the files, ``persist`` streams them into a saved
dataset with DuckDB; ``to_arrow``/``to_df`` read them back (for results that fit).

Select it in ``feature_store.yaml`` (local Ray with 2 CPUs, or a real cluster)::

    offline_store:
      type: derm.feast_plugins.ray_asof_offline_store.RayAsofOfflineStore
      ray_address: ray://head:10001     # omitted: a local Ray, ray.init(num_cpus=..., object_store_memory=...)
      num_cpus: 2
      buckets: 16                       # entity buckets; size them so one bucket fits a worker
      storage_path: /shared/derm-retrieval   # on a real cluster: storage every worker can write

Everything this store does not express as an ASOF JOIN (see the single-node store) falls
back to the stock DuckDB store, in the driver.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from feast.feature_view import FeatureView
from feast.infra.offline_stores.duckdb import DuckDBOfflineStore
from feast.infra.offline_stores.offline_store import RetrievalJob, RetrievalMetadata
from feast.infra.registry.base_registry import BaseRegistry
from feast.on_demand_feature_view import OnDemandFeatureView
from feast.repo_config import RepoConfig
from feast.saved_dataset import SavedDatasetStorage
from pydantic import PositiveInt

from derm.feast_plugins import asof_offline_store as asof
from derm.feast_plugins import ray_tasks
from derm.feast_plugins.duckdb_sql import connect, ident

STORE_TYPE = "derm.feast_plugins.ray_asof_offline_store.RayAsofOfflineStore"


class RayAsofOfflineStoreConfig(asof.AsofDuckDBOfflineStoreConfig):
    """The ASOF store's settings plus where Ray runs, how many buckets, and where results go."""

    type: Literal["derm.feast_plugins.ray_asof_offline_store.RayAsofOfflineStore"] = STORE_TYPE  # type: ignore[assignment]

    ray_address: str | None = None
    """A running Ray cluster (``ray://host:10001`` or ``auto``); None or empty starts a local Ray."""

    num_cpus: PositiveInt | None = 2
    """CPUs of the local Ray (ignored with ``ray_address``)."""

    object_store_memory: PositiveInt | None = 256 * 1024 * 1024
    """Bytes of the local Ray's object store; small, since tasks pass Parquet paths, not data."""

    buckets: PositiveInt = 8
    """Hash buckets of the join key; one Ray task joins one bucket, so a bucket must fit a worker."""

    task_memory_limit: str | None = "512MB"
    """DuckDB memory limit inside each Ray task (DuckDB spills beyond it)."""

    storage_path: str | None = None
    """Folder for the partitions and the result files (shared storage on a real cluster); None = a temp dir."""


def ensure_ray(config: RayAsofOfflineStoreConfig) -> None:
    """Connect to ``ray_address`` or start a local Ray once per process.

    A local start is tried twice: Ray gives its raylet a fixed 30 s to register, which a
    busy machine can miss the first time.
    """
    import ray

    if ray.is_initialized():
        return
    if config.ray_address:
        ray.init(address=config.ray_address, log_to_driver=False)
        return
    for attempt in (1, 2):
        try:
            ray.init(
                num_cpus=config.num_cpus,
                object_store_memory=config.object_store_memory,
                include_dashboard=False,
                log_to_driver=False,
            )
            return
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise


@dataclass(frozen=True)
class _Round:
    """Views joined on the same entity columns: one partition + one join per bucket."""

    entity_keys: tuple[str, ...]
    views: tuple[asof._ViewJoin, ...]


class RayAsofRetrievalJob(RetrievalJob):
    """Partitions and joins on Ray when first asked for the result; the result is a folder of Parquet files."""

    def __init__(
        self,
        plan: asof.AsofRetrievalJob,
        views: list[asof._ViewJoin],
        config: RayAsofOfflineStoreConfig,
        repo_path: str,
    ) -> None:
        super().__init__()
        self._plan = plan
        self._views = views
        self._config = config
        self._repo_path = repo_path
        self._files: list[str] | None = None
        # Entity columns, then every view's features in the order asked (stock order); the files of a retrieval
        # over two entities hold the rounds' order, so readers select these.
        entity_names = list(plan._entity_table.column_names)
        self.columns = entity_names + [output for view in views for output in view.feature_columns]
        root = config.storage_path or tempfile.mkdtemp(prefix="derm-ray-asof-")
        self.directory = os.path.join(root, uuid.uuid4().hex)

    # -- the plan ------------------------------------------------------------------------------

    def _rounds(self) -> list[_Round]:
        by_keys: dict[tuple[str, ...], list[asof._ViewJoin]] = {}
        for view in self._views:
            by_keys.setdefault(tuple(view.key_columns.values()), []).append(view)
        return [_Round(keys, tuple(views)) for keys, views in by_keys.items()]

    def to_parquet_files(self) -> list[str]:
        """Run the retrieval (once) and return the result's Parquet files (one per non-empty bucket)."""
        if self._files is None:
            self._files = self._run()
        return list(self._files)

    def _run(self) -> list[str]:
        import ray

        config = self._config
        ensure_ray(config)
        buckets = config.buckets
        memory = config.task_memory_limit
        partition = ray.remote(num_cpus=1)(ray_tasks.partition)
        join = ray.remote(num_cpus=1)(ray_tasks.join_bucket)
        os.makedirs(self.directory, exist_ok=True)
        entity_table = self._plan._entity_table
        entity_path = os.path.join(self.directory, "entity.parquet")
        pq.write_table(entity_table, entity_path)
        entity_source: str | list[str] = entity_path
        entity_columns = list(entity_table.column_names)
        entity_types = {field.name: field.type for field in entity_table.schema}
        timestamp_column = self._plan._event_timestamp_column
        rounds = self._rounds()
        outputs: list[str] = []
        for number, round_ in enumerate(rounds):
            round_dir = os.path.join(self.directory, f"round{number}")
            os.makedirs(round_dir)
            views = list(round_.views)
            # The single-node store's query, over this round's entity columns (round 1's features included).
            query, parameters = asof._asof_query(entity_columns, timestamp_column, views)
            bound = {name: "min" for name in parameters if name == asof._ENTITY_TS_MIN}
            bound.update({name: "max" for name in parameters if name == asof._ENTITY_TS_MAX})
            entity_dir = f"{round_dir}/entity"
            view_dirs = {view.relation: f"{round_dir}/{view.relation}" for view in views}
            pending = [partition.remote(entity_source, list(round_.entity_keys), buckets, entity_dir, memory)]
            pending += [
                partition.remote(
                    view.source_path, list(view.key_columns), buckets, f"{round_dir}/{view.relation}", memory
                )
                for view in views
            ]
            ray.get(pending)
            empties = {
                view.relation: ray_tasks.empty_like(view.source_path, f"{round_dir}/{view.relation}-empty.parquet")
                for view in views
            }
            output_columns = entity_columns + [output for view in views for output in view.feature_columns]
            paths, jobs = [], []
            for bucket in range(buckets):
                entity_files = ray_tasks.bucket_files(entity_dir, bucket)
                if not entity_files:
                    continue
                sources = {
                    view.source_parameter: ray_tasks.bucket_files(view_dirs[view.relation], bucket)
                    or [empties[view.relation]]
                    for view in views
                }
                paths.append(f"{round_dir}/result-{bucket:05d}.parquet")
                jobs.append(
                    join.remote(
                        query,
                        asof._ENTITY_RELATION,
                        entity_files,
                        timestamp_column,
                        bound,
                        sources,
                        output_columns,
                        entity_types,
                        paths[-1],
                        memory,
                    )
                )
            counts = ray.get(jobs)
            outputs = [path for path, count in zip(paths, counts, strict=True) if count]
            entity_source = outputs
            entity_columns = output_columns
        return outputs

    # -- RetrievalJob --------------------------------------------------------------------------

    def _to_arrow_internal(self, timeout: int | None = None) -> pa.Table:
        files = self.to_parquet_files()
        if not files:
            return self._plan._to_arrow_internal(timeout).slice(0, 0)
        return pa.concat_tables([pq.read_table(path) for path in files]).select(self.columns)

    def _to_df_internal(self, timeout: int | None = None) -> pd.DataFrame:
        return self._to_arrow_internal(timeout=timeout).to_pandas()

    @property
    def full_feature_names(self) -> bool:
        return self._plan.full_feature_names

    @property
    def on_demand_feature_views(self) -> list[OnDemandFeatureView]:
        return []

    @property
    def metadata(self) -> RetrievalMetadata | None:
        return self._plan.metadata

    def supports_remote_storage_export(self) -> bool:
        return True

    def to_remote_storage(self) -> list[str]:
        """The result's Parquet files, written by the Ray tasks (nothing passes through the driver)."""
        return self.to_parquet_files()

    def persist(self, storage: SavedDatasetStorage, allow_overwrite: bool = False, timeout: int | None = None) -> None:
        """Stream the result files into the saved dataset's Parquet file with DuckDB (bounded memory)."""
        destination = storage.to_data_source().path
        if os.path.exists(destination) and not allow_overwrite:
            raise FileExistsError(f"saved dataset {destination} exists (pass allow_overwrite=True)")
        files = self.to_parquet_files()
        with connect(memory_limit=self._config.task_memory_limit) as con:
            partial = destination + f".{uuid.uuid4().hex}.partial"
            columns = ", ".join(ident(column) for column in self.columns)
            con.sql(f"SELECT {columns} FROM read_parquet($files)", params={"files": files}).write_parquet(partial)
        os.replace(partial, destination)  # nothing half-written under the dataset's name


class RayAsofOfflineStore(asof.AsofDuckDBOfflineStore):
    """The DuckDB offline store with ``get_historical_features`` as bucketed ASOF JOINs in Ray tasks."""

    @staticmethod
    def get_historical_features(
        config: RepoConfig,
        feature_views: list[FeatureView],
        feature_refs: list[str],
        entity_df: pd.DataFrame | str,
        registry: BaseRegistry,
        project: str,
        full_feature_names: bool = False,
        filter_by_created_timestamp: bool = False,
    ) -> RetrievalJob:
        plan = asof._asof_retrieval(config, feature_views, feature_refs, entity_df, full_feature_names)
        if plan is None or filter_by_created_timestamp:
            return DuckDBOfflineStore.get_historical_features(
                config=config,
                feature_views=feature_views,
                feature_refs=feature_refs,
                entity_df=entity_df,
                registry=registry,
                project=project,
                full_feature_names=full_feature_names,
                filter_by_created_timestamp=filter_by_created_timestamp,
            )
        views = [
            asof._plan_view(index, view, feature_refs, full_feature_names) for index, view in enumerate(feature_views)
        ]
        planned = [view for view in views if view is not None]
        return RayAsofRetrievalJob(plan, planned, config.offline_store, str(config.repo_path))
