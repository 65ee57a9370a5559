"""Point-in-time retrieval on Ray: the DuckDB ASOF kernel per hash bucket of the join key, results to Parquet.

The single-node ASOF store (:mod:`derm.feast_plugins.asof_offline_store`) builds the
whole training set in one process. This store splits the same computation so that no
process ever holds more than one bucket or one chunk of the result, and moves the wide
feature columns (embeddings) as few times as possible:

1. **Partition, narrow.** For each set of join keys (the user views, the Pin views), the
   entity rows' keys, timestamp and row number, and every view's keys, timestamps and a
   reference to each source row (file, row number) are hash-partitioned by join key
   (``hash(key) % buckets``, the key cast to text on both sides so that an ``int32`` entity
   column and an ``int64`` source column land in the same bucket). No feature is read.
2. **Match.** One Ray task per bucket runs the very query the single-node store runs
   (``asof_offline_store._asof_query``: one ASOF JOIN per view, TTL and created-timestamp
   rules included) on that bucket's narrow rows, the "feature" being the source-row
   reference: which row each entity row gets (NULL: none, or expired).
3. **Gather.** Per view and group of its source files, a task reads the matched rows'
   features once and writes them, with the entity row number, to the Arrow IPC file of the
   entity rows' output chunk.
4. **Assemble.** Per chunk of ``len(entity_df) / buckets`` entity rows, a task puts the
   entity columns and every view's features side by side (in entity order) and writes the
   chunk's Parquet file.

Every row of an entity and every row of its history fall in the same bucket, so the
matches are exactly the single-node store's, whatever the data: correct by construction,
with no time windows, and one partition of the entity frame per set of join keys.

The driver never reads the result unless asked: ``job.to_parquet_files()`` (or
``to_remote_storage()``) returns the files, ``persist`` streams them into a saved
dataset with DuckDB; ``to_arrow``/``to_df`` read them back (for results that fit).

Select it in ``feature_store.yaml`` (local Ray with 2 CPUs, or a real cluster)::

    offline_store:
      type: derm.feast_plugins.ray_asof_offline_store.RayAsofOfflineStore
      ray_address: ray://head:10001     # omitted: a local Ray, ray.init(num_cpus=..., object_store_memory=...)
      num_cpus: 2
      buckets: 16                       # buckets and result chunks; size them so one fits a worker
      storage_path: /shared/derm-retrieval   # on a real cluster: storage every worker can write

Everything this store does not express as an ASOF JOIN (see the single-node store) falls
back to the stock DuckDB store, in the driver.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
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
    """Hash buckets of the join key and chunks of the result; a task handles one, so one must fit a worker."""

    task_memory_limit: str | None = "512MB"
    """DuckDB memory limit inside each Ray task (DuckDB spills beyond it)."""

    storage_path: str | None = None
    """Folder for the partitions and the result files (shared storage on a real cluster); None = a temp dir."""


@contextlib.contextmanager
def _bytecode_cache_for_ray_processes() -> Iterator[None]:
    """While a local Ray starts, let the processes it spawns keep compiled bytecode in a cache folder.

    With ``PYTHONDONTWRITEBYTECODE`` set and the packages installed without byte-compiling
    (``pip install --no-compile``, as here), every Ray process compiles Ray's sources again on
    every start: the dashboard agent's imports take 1.8 s of CPU here, 0.8 s from cached bytecode,
    and a local ``ray.init`` 10 s instead of 5. It matters because the raylet gives the dashboard
    agent a fixed 15 s to write its port files (Ray 2.60's ``WaitForPersistedPort`` default; neither
    ``_system_config`` nor ``RAY_agent_register_timeout_ms`` changes it, and ``ray.init`` cannot
    pre-set the agent's ports) and fails the start when a loaded machine misses it. The raylet,
    agents and workers inherit the driver's environment when ``ray.init`` spawns them, so only
    during ``ray.init`` bytecode goes to ``PYTHONPYCACHEPREFIX`` (never beside the sources, which is
    what the setting protects); the driver's environment is restored afterwards.
    """
    names = ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")
    if not os.environ.get(names[0]) or os.environ.get(names[1]):
        yield  # bytecode is written next to the sources, or already goes to a cache folder of the user's
        return
    saved = {name: os.environ.get(name) for name in names}
    os.environ.pop(names[0])
    os.environ[names[1]] = os.path.join(tempfile.gettempdir(), f"derm-ray-pycache-{os.getuid()}")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def ensure_ray(config: RayAsofOfflineStoreConfig) -> None:
    """Connect to ``ray_address`` or start a local Ray once per process.

    A local start is tried three times: Ray gives its raylet a fixed 30 s to register and the raylet
    its dashboard agent a fixed 15 s to start, which a busy machine can miss; its processes start
    from cached bytecode (:func:`_bytecode_cache_for_ray_processes`) to keep that margin.
    """
    import ray

    if ray.is_initialized():
        return
    if config.ray_address:
        ray.init(address=config.ray_address, log_to_driver=False)
        return
    for attempt in (1, 2, 3):
        try:
            with _bytecode_cache_for_ray_processes():
                ray.init(
                    num_cpus=config.num_cpus,
                    object_store_memory=config.object_store_memory,
                    include_dashboard=False,
                    log_to_driver=False,
                )
            return
        except Exception:
            ray.shutdown()
            if attempt == 3:
                raise


def warm_up_workers(config: RayAsofOfflineStoreConfig) -> set[int]:
    """Start Ray (:func:`ensure_ray`) and one worker per CPU with the tasks' libraries loaded; their pids.

    What a long-lived cluster has already done: without it, the first retrieval of a fresh local Ray
    also pays the workers' start-up and imports.
    """
    import ray

    ensure_ray(config)
    warm = ray.remote(num_cpus=1)(ray_tasks.warm_up)
    workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return set(ray.get([warm.remote(1.0) for _ in range(workers)]))


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
        self._views = [view for view in views if view.feature_columns]  # a view asked for no feature adds no column
        self._config = config
        self._repo_path = repo_path
        self._files: list[str] | None = None
        # Entity columns, then every view's features in the order asked (stock order), as the files hold them.
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
        buckets, memory = config.buckets, config.task_memory_limit
        entity_table = self._plan._entity_table
        rows = entity_table.num_rows
        if rows == 0:
            return []
        os.makedirs(self.directory, exist_ok=True)
        chunk_rows = -(-rows // min(buckets, rows))
        chunks = -(-rows // chunk_rows)
        entity_path = os.path.join(self.directory, "entity.parquet")
        pq.write_table(entity_table, entity_path, row_group_size=chunk_rows)
        timestamp_column = self._plan._event_timestamp_column
        task = {
            name: ray.remote(num_cpus=1)(getattr(ray_tasks, name))
            for name in ("partition_entity", "partition_source", "match_bucket", "gather", "assemble")
        }
        files = {
            view.relation: ray_tasks.source_files(self._plan.parameters[view.source_parameter]) for view in self._views
        }
        feature_types = self._feature_types(files)
        gathered: list[ray.ObjectRef] = []
        for number, round_ in enumerate(self._rounds()):
            round_dir = os.path.join(self.directory, f"round{number}")
            entity_dir = f"{round_dir}/entity"
            os.makedirs(round_dir)  # DuckDB creates the last folder of a partitioned write, not its parents
            keys = list(round_.entity_keys)
            partitioned = [
                task["partition_entity"].remote(
                    entity_path, list(dict.fromkeys([*keys, timestamp_column])), keys, buckets, entity_dir, memory
                )
            ]
            # The match runs the single-node query with each view's source-row reference as its only feature.
            narrow = [
                dataclasses.replace(view, feature_columns={self._match_column(view): ray_tasks.SOURCE_ROW})
                for view in round_.views
            ]
            sources: dict[str, tuple[str, str]] = {}
            for view in round_.views:
                view_dir, empty = f"{round_dir}/{view.relation}", f"{round_dir}/{view.relation}-empty.parquet"
                sources[view.source_parameter] = (view_dir, empty)
                os.makedirs(view_dir)
                extra = [view.timestamp_column] + ([view.created_column] if view.created_column else [])
                for group, (first, group_files) in enumerate(self._groups(files[view.relation])):
                    partitioned.append(
                        task["partition_source"].remote(
                            group_files,
                            first,
                            list(view.key_columns),
                            extra,
                            buckets,
                            f"{view_dir}/g{group:05d}",
                            empty if group == 0 else None,
                            memory,
                        )
                    )
            query, parameters = asof._asof_query([ray_tasks.ROW], timestamp_column, narrow)
            bound = {name: "min" for name in parameters if name == asof._ENTITY_TS_MIN}
            bound.update({name: "max" for name in parameters if name == asof._ENTITY_TS_MAX})
            matched = [
                task["match_bucket"].remote(
                    query,
                    asof._ENTITY_RELATION,
                    entity_dir,
                    bucket,
                    timestamp_column,
                    bound,
                    sources,
                    f"{round_dir}/match-{bucket:05d}.parquet",
                    memory,
                    *partitioned,
                )
                for bucket in range(buckets)
            ]
            for view in round_.views:
                for group, (first, group_files) in enumerate(self._groups(files[view.relation])):
                    gathered.append(
                        task["gather"].remote(
                            f"{round_dir}/match-*.parquet",
                            self._match_column(view),
                            group_files,
                            first,
                            view.feature_columns,
                            chunk_rows,
                            f"{self.directory}/gather/{view.relation}",
                            f"g{group:05d}",
                            memory,
                            *matched,
                        )
                    )
        views = [(f"{self.directory}/gather/{view.relation}", list(view.feature_columns)) for view in self._views]
        paths = [os.path.join(self.directory, f"result-{chunk:05d}.parquet") for chunk in range(chunks)]
        assembled = [
            task["assemble"].remote(
                entity_path, chunk, chunk_rows, views, feature_types, self.columns, paths[chunk], *gathered
            )
            for chunk in range(chunks)
        ]
        ray.get(assembled)
        # Only the result files stay: the entity file, partitions and matches are the narrow rows of the plan.
        os.remove(entity_path)
        for intermediate in glob.glob(os.path.join(glob.escape(self.directory), "round*")):
            shutil.rmtree(intermediate)
        shutil.rmtree(os.path.join(self.directory, "gather"), ignore_errors=True)
        return paths

    @staticmethod
    def _match_column(view: asof._ViewJoin) -> str:
        return f"{view.relation}{ray_tasks.SOURCE_ROW}"

    def _groups(self, files: list[str]) -> list[tuple[int, list[str]]]:
        """The view's files in at most ``buckets`` contiguous groups, each with the index of its first file."""
        count = min(len(files), self._config.buckets)
        size = -(-len(files) // count)
        return [(first, files[first : first + size]) for first in range(0, len(files), size)]

    def _feature_types(self, files: dict[str, list[str]]) -> dict[str, pa.DataType]:
        """Each feature column's Arrow type as DuckDB reads it from the source (the single-node store's result)."""
        types: dict[str, pa.DataType] = {}
        with connect(threads=1) as con:
            for view in self._views:
                select = ", ".join(
                    f"{ident(column)} AS {ident(output)}" for output, column in view.feature_columns.items()
                )
                schema = (
                    con.sql(
                        f"SELECT {select} FROM read_parquet($files) LIMIT 0", params={"files": files[view.relation]}
                    )
                    .to_arrow_table()
                    .schema
                )
                types.update({field.name: field.type for field in schema})
        return types

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
