"""A Feast offline store whose point-in-time join is one DuckDB ASOF JOIN per feature view.

Feast's DuckDB offline store (through its ibis point-in-time join) inner-joins
every entity row with *every* older feature row of the same entity and then
keeps the newest one with a window function. The intermediate result grows with
the length of the history (30 daily embedding snapshots = 30 candidate rows per
entity row) and carries the wide embedding columns through the sort. DuckDB's
ASOF JOIN finds the newest row directly, so the cost no longer multiplies with
the history length.

Select it in ``feature_store.yaml``::

    offline_store:
      type: derm.feast_plugins.asof_offline_store.AsofDuckDBOfflineStore

``FeatureStore.get_historical_features`` stays the API, and the result is the
one the stock store returns (same columns, order of columns, Arrow types, nulls,
TTL, created-timestamp tie-breaking, feature-service aliases and join-key maps);
like the stock store's, its rows come back in no particular order (putting them
back in entity order would cost more than the join: a gather of every wide
embedding row). Everything this store cannot express
as an ASOF JOIN falls back to the stock implementation: an entity dataframe given
as SQL, on-demand feature views, ``filter_by_created_timestamp``, sources other
than local Parquet files, and feature columns whose names collide.

A Parquet folder source with a timestamp index (:mod:`derm.feast_plugins.source_index`) is read
file by file: a retrieval reads only the files whose timestamps can meet its entity rows (within
the view's TTL), and materialization's ``pull_latest_from_table_or_query`` only those in its window,
so materializing one new day costs the same after 2,000 published days as after 10. Otherwise
``pull_latest_from_table_or_query`` and every other method are the stock DuckDB store's.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import duckdb
import ibis
import pandas as pd
import pyarrow as pa
from feast.data_format import ParquetFormat
from feast.data_source import DataSource
from feast.feature_view import FeatureView
from feast.infra.offline_stores import offline_utils
from feast.infra.offline_stores.duckdb import DuckDBOfflineStore, DuckDBOfflineStoreConfig
from feast.infra.offline_stores.file_source import FileSource
from feast.infra.offline_stores.ibis import list_s3_files, pull_latest_from_table_or_query_ibis
from feast.infra.offline_stores.offline_store import RetrievalJob, RetrievalMetadata
from feast.infra.registry.base_registry import BaseRegistry
from feast.on_demand_feature_view import OnDemandFeatureView
from feast.repo_config import RepoConfig
from feast.saved_dataset import SavedDatasetStorage
from ibis.formats.pandas import PandasData
from ibis.formats.pyarrow import PyArrowSchema

from derm.feast_plugins.compat import get_entity_df_event_timestamp_range, write_data_source
from derm.feast_plugins.duckdb_sql import connect, ident, parquet_source
from derm.feast_plugins.source_index import files_in_window

STORE_TYPE = "derm.feast_plugins.asof_offline_store.AsofDuckDBOfflineStore"

# Names this store adds to the query; prefixed so they cannot clash with user columns.
_ENTITY_RELATION = "__asof_entity_df"
_ENTITY_TS = "__asof_entity_ts"
_FEATURE_TS = "__asof_ts"
_ASOF_KEY = "__asof_key"
# Parameters of the query: the entity dataframe's time range, bound at execution (DuckDB pushes bound
# values into the Parquet scan as it does literals), and each view's source path.
_ENTITY_TS_MIN = "__asof_entity_ts_min"
_ENTITY_TS_MAX = "__asof_entity_ts_max"


class AsofDuckDBOfflineStoreConfig(DuckDBOfflineStoreConfig):
    """The stock DuckDB offline store's settings plus the resources of the retrieval's DuckDB connection."""

    type: Literal[
        "derm.feast_plugins.asof_offline_store.AsofDuckDBOfflineStore",
        "retrieval.asof_offline_store.AsofDuckDBOfflineStore",  # 0.1 path, kept by a shim until 0.3
    ] = STORE_TYPE  # type: ignore[assignment]

    threads: int | None = None
    """DuckDB worker threads for one retrieval; None = DuckDB's default (all cores)."""

    memory_limit: str | None = None
    """DuckDB memory limit for one retrieval, e.g. "4GB"; None = DuckDB's default (80% of RAM). DuckDB
    spills the join to a temporary directory beyond it."""


@dataclass(frozen=True)
class _ViewJoin:
    """What one feature view contributes to the query, resolved the way Feast's ibis join resolves it."""

    relation: str  # the CTE holding the view's rows
    source_parameter: str  # the query parameter holding the path of the view's batch source
    source_path: str  # the local Parquet file or folder it holds
    key_columns: dict[str, str]  # source column -> entity dataframe column
    timestamp_column: str  # source column
    created_column: str | None  # source column
    feature_columns: dict[str, str]  # output column -> source column
    ttl: timedelta | None


def _parquet_path(source: FileSource) -> str | None:
    """The local Parquet file or folder behind ``source``, or None when DuckDB cannot read it as stock does."""
    file_format = source.file_format
    is_parquet = isinstance(file_format, ParquetFormat) or (file_format is None and source.path.endswith(".parquet"))
    # Remote paths need the credentials and endpoint handling of Feast's reader: leave them to it.
    if not is_parquet or "://" in source.path:
        return None
    return os.path.expanduser(source.path)


def _plan_view(
    index: int, feature_view: FeatureView, feature_refs: list[str], full_feature_names: bool
) -> _ViewJoin | None:
    source = feature_view.batch_source
    if not isinstance(source, FileSource):
        return None
    path = _parquet_path(source)
    if path is None:
        return None

    # Feast renames source columns by field_mapping (only those present) before it uses any name; keep a map
    # from the post-mapping name back to the column in the file instead of renaming.
    with connect() as connection:
        described = connection.execute(
            "DESCRIBE SELECT * FROM read_parquet($path)", {"path": parquet_source(path)}
        ).fetchall()
    source_columns = [row[0] for row in described]
    column_of = {column: column for column in source_columns}
    for old_name, new_name in source.field_mapping.items():
        if old_name in source_columns:
            column_of.pop(old_name, None)
            column_of[new_name] = old_name

    def source_column(name: str) -> str:
        if name not in column_of:
            raise ValueError(
                f"Feature view '{feature_view.name}': column '{name}' is not in {path} (columns: {sorted(column_of)})"
            )
        return column_of[name]

    # Same resolution as feast.infra.offline_stores.ibis.get_historical_features_ibis.read_fv.
    projection = feature_view.projection
    features = [ref.split(":")[1] for ref in feature_refs if ref.startswith(f"{projection.name_to_use()}:")]
    output_prefix = projection.name_alias or feature_view.name
    join_key_map = projection.join_key_map or {column.name: column.name for column in feature_view.entity_columns}
    return _ViewJoin(
        relation=f"__asof_view_{index}",
        source_parameter=f"__asof_source_{index}",
        source_path=path,
        key_columns={source_column(key): entity_column for key, entity_column in join_key_map.items()},
        timestamp_column=source_column(source.timestamp_field),
        created_column=source_column(source.created_timestamp_column) if source.created_timestamp_column else None,
        feature_columns={
            (f"{output_prefix}__{feature}" if full_feature_names else feature): source_column(feature)
            for feature in features
        },
        ttl=feature_view.ttl,
    )


def _utc(moment: datetime) -> datetime:
    # Feast reads naive timestamps as UTC.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _interval(ttl: timedelta) -> str:
    microseconds = (ttl.days * 86_400 + ttl.seconds) * 1_000_000 + ttl.microseconds
    return f"INTERVAL {microseconds} MICROSECONDS"


def _view_cte(view: _ViewJoin) -> str:
    # Feast casts the source timestamps to TIMESTAMPTZ (microseconds, rounding nanoseconds) before comparing:
    # do the same so boundary rows fall on the same side.
    timestamp = f"CAST({ident(view.timestamp_column)} AS TIMESTAMPTZ)"
    if view.created_column:
        # Feast keeps, among the rows at the newest event timestamp, the newest created timestamp, NULL last
        # (ORDER BY event DESC, created DESC with DuckDB's NULLS LAST). An ASOF JOIN on the pair
        # (event, created) against (entity time, +infinity) picks exactly that row without deduplicating the
        # whole source first.
        created = f"COALESCE(CAST({ident(view.created_column)} AS TIMESTAMPTZ), '-infinity'::TIMESTAMPTZ)"
        asof_key = f"{{'ts': {timestamp}, 'created': {created}}}"
    columns = [f"{ident(column)} AS {ident(f'__asof_key_{i}')}" for i, column in enumerate(view.key_columns)]
    columns += [f"{ident(column)} AS {ident(output)}" for output, column in view.feature_columns.items()]
    columns.append(f"{timestamp} AS {_FEATURE_TS}")
    if view.created_column:
        columns.append(f"{asof_key} AS {_ASOF_KEY}")  # otherwise the ASOF JOIN is on the timestamp alone
    # Rows newer than every entity row, or expired before the oldest one, can never be picked; dropping them
    # in the scan (row-group statistics permitting) keeps them out of the join's sort.
    window = [f"{timestamp} <= CAST(${_ENTITY_TS_MAX} AS TIMESTAMPTZ)"]
    if view.ttl:
        window.append(f"{timestamp} + {_interval(view.ttl)} >= CAST(${_ENTITY_TS_MIN} AS TIMESTAMPTZ)")
    return (
        f"{view.relation} AS (\n"
        f"  SELECT {', '.join(columns)}\n"
        f"  FROM read_parquet(${view.source_parameter})\n"
        f"  WHERE {' AND '.join(window)}\n"
        f")"
    )


def _asof_query(
    entity_columns: list[str], event_timestamp_column: str, views: list[_ViewJoin]
) -> tuple[str, dict[str, str | list[str] | None]]:
    """The query and its parameters: the source paths, and the entity time bounds (None until execution)."""
    entity_ts = f"CAST({ident(event_timestamp_column)} AS TIMESTAMPTZ)"
    ctes = [f"entity AS (\n  SELECT *, {entity_ts} AS {_ENTITY_TS} FROM {_ENTITY_RELATION}\n)"]
    ctes += [_view_cte(view) for view in views]
    select = [f"e.{ident(column)}" for column in entity_columns]
    joins = []
    for alias_index, view in enumerate(views):
        alias = f"v{alias_index}"
        conditions = [
            f"e.{ident(entity_column)} = {alias}.{ident(f'__asof_key_{i}')}"
            for i, entity_column in enumerate(view.key_columns.values())
        ]
        if view.created_column:
            # A NULL entity timestamp must match nothing, as in Feast's join; a struct holding a NULL is not
            # NULL itself, so null the whole struct.
            entity_key = (
                f"CASE WHEN e.{_ENTITY_TS} IS NOT NULL "
                f"THEN {{'ts': e.{_ENTITY_TS}, 'created': 'infinity'::TIMESTAMPTZ}} END"
            )
        else:
            entity_key = f"e.{_ENTITY_TS}"
        conditions.append(f"{entity_key} >= {alias}.{_ASOF_KEY if view.created_column else _FEATURE_TS}")
        joins.append(f"ASOF LEFT JOIN {view.relation} AS {alias} ON {' AND '.join(conditions)}")
        # The ASOF JOIN found the newest row at or before the entity time; it is the one Feast picks unless it
        # is older than the TTL, in which case every row is, and Feast returns NULL.
        expired = f"{alias}.{_FEATURE_TS} + {_interval(view.ttl)} < e.{_ENTITY_TS}" if view.ttl else None
        for output in view.feature_columns:
            value = f"{alias}.{ident(output)}"
            select.append(f"CASE WHEN {expired} THEN NULL ELSE {value} END" if expired else value)
            select[-1] += f" AS {ident(output)}"
    query = "WITH " + ",\n".join(ctes) + "\nSELECT " + ",\n  ".join(select) + "\nFROM entity AS e\n" + "\n".join(joins)
    # DuckDB rejects parameters a query does not use: the bounds are there only when a view reads them.
    parameters: dict[str, str | list[str] | None] = {
        view.source_parameter: parquet_source(view.source_path) for view in views
    }
    if views:
        parameters[_ENTITY_TS_MAX] = None
    if any(view.ttl for view in views):
        parameters[_ENTITY_TS_MIN] = None
    return query, parameters


def _entity_df_utc(entity_df: pd.DataFrame, event_timestamp_column: str) -> pd.DataFrame:
    """Feast's ``_to_utc``: string or object timestamps are parsed as UTC; the caller's frame is left alone."""
    timestamps = entity_df[event_timestamp_column].infer_objects()
    if pd.api.types.is_string_dtype(timestamps) or pd.api.types.is_object_dtype(timestamps):
        return entity_df.assign(**{event_timestamp_column: pd.to_datetime(timestamps, utc=True)})
    return entity_df


def _entity_arrow(entity_df: pd.DataFrame) -> pa.Table:
    """The entity dataframe as Arrow exactly as Feast's ibis memtable converts it (so types, precision and
    conversion errors match the stock store)."""
    schema = PyArrowSchema.from_ibis(PandasData.infer_table(entity_df))
    return pa.Table.from_pandas(entity_df, schema=schema, preserve_index=False)


class AsofRetrievalJob(RetrievalJob):
    """Runs the ASOF JOIN query lazily, on a private DuckDB connection, when the result is asked for."""

    def __init__(
        self,
        query: str,
        parameters: dict[str, str | list[str] | None],
        entity_table: pa.Table,
        event_timestamp_column: str,
        full_feature_names: bool,
        metadata: RetrievalMetadata | None,
        repo_path: str,
        config: AsofDuckDBOfflineStoreConfig | DuckDBOfflineStoreConfig,
    ) -> None:
        super().__init__()
        self.query = query
        self.parameters = parameters
        self._entity_table = entity_table
        self._event_timestamp_column = event_timestamp_column
        self._full_feature_names = full_feature_names
        self._metadata = metadata
        self._repo_path = repo_path
        self._config = config

    def _entity_ts_bounds(self, connection: duckdb.DuckDBPyConnection) -> dict[str, object]:
        ts_min, ts_max = connection.execute(
            f"SELECT min(ts), max(ts) FROM "
            f"(SELECT CAST({ident(self._event_timestamp_column)} AS TIMESTAMPTZ) AS ts FROM {_ENTITY_RELATION})"
        ).fetchall()[0]  # fetched to the end: DuckDB runs nothing else on a connection with a pending result
        return {_ENTITY_TS_MIN: ts_min, _ENTITY_TS_MAX: ts_max}

    def _to_arrow_internal(self, timeout: int | None = None) -> pa.Table:
        # Feast's ibis backend runs DuckDB in UTC too (connect() sets it): naive timestamps compare as UTC and
        # TTL days are 24 hours.
        threads = getattr(self._config, "threads", None) or None
        memory_limit = getattr(self._config, "memory_limit", None) or None
        with connect(threads=threads, memory_limit=memory_limit) as connection:
            connection.register(_ENTITY_RELATION, self._entity_table)
            bounds = self._entity_ts_bounds(connection)
            parameters = {name: bounds.get(name, value) for name, value in self.parameters.items()}
            result = connection.sql(self.query, params=parameters).to_arrow_table()
        # Entity columns keep the types they came in with (e.g. the time zone of the event timestamp), as
        # ibis casts them back in the stock store; DuckDB would return TIMESTAMPTZ in UTC.
        entity_types = {field.name: field.type for field in self._entity_table.schema}
        columns = [
            column.cast(entity_types[name]) if name in entity_types and column.type != entity_types[name] else column
            for name, column in zip(result.column_names, result.columns, strict=True)
        ]
        return pa.Table.from_arrays(columns, names=result.column_names)

    def _to_df_internal(self, timeout: int | None = None) -> pd.DataFrame:
        return self._to_arrow_internal(timeout=timeout).to_pandas()

    @property
    def full_feature_names(self) -> bool:
        return self._full_feature_names

    @property
    def on_demand_feature_views(self) -> list[OnDemandFeatureView]:
        # Retrievals that need on-demand views are left to the stock store.
        return []

    @property
    def metadata(self) -> RetrievalMetadata | None:
        return self._metadata

    def persist(self, storage: SavedDatasetStorage, allow_overwrite: bool = False, timeout: int | None = None) -> None:
        write_data_source(
            ibis.memtable(self.to_arrow(timeout=timeout)),
            storage.to_data_source(),
            self._repo_path,
            "overwrite",
            allow_overwrite,
        )

    def supports_remote_storage_export(self) -> bool:
        return self._config.staging_location is not None

    def to_remote_storage(self) -> list[str]:
        # As the stock IbisRetrievalJob does it.
        assert self._config.staging_location is not None
        path = f"{self._config.staging_location}/{uuid.uuid4()}"
        endpoint = self._config.staging_location_endpoint_override
        ibis.memtable(self.to_arrow()).to_delta(path, storage_options={"AWS_ENDPOINT_URL": endpoint})
        return list_s3_files(path, endpoint)


class AsofDuckDBOfflineStore(DuckDBOfflineStore):
    """The stock DuckDB offline store with ``get_historical_features`` done by DuckDB ASOF JOINs."""

    @staticmethod
    def pull_latest_from_table_or_query(
        config: RepoConfig,
        data_source: DataSource,
        join_key_columns: list[str],
        feature_name_columns: list[str],
        timestamp_field: str,
        created_timestamp_column: str | None,
        start_date: datetime,
        end_date: datetime,
    ) -> RetrievalJob:
        """The stock query, over the files of an indexed folder source that can hold rows in the window."""
        files = None
        if isinstance(data_source, FileSource) and (path := _parquet_path(data_source)) is not None:
            files = files_in_window(path, _utc(start_date), _utc(end_date))
        if files is None:
            return DuckDBOfflineStore.pull_latest_from_table_or_query(
                config, _literal_source(data_source), join_key_columns, feature_name_columns, timestamp_field,
                created_timestamp_column, start_date, end_date,
            )  # fmt: skip
        return pull_latest_from_table_or_query_ibis(
            config=config,
            data_source=data_source,
            join_key_columns=join_key_columns,
            feature_name_columns=feature_name_columns,
            timestamp_field=timestamp_field,
            created_timestamp_column=created_timestamp_column,
            start_date=start_date,
            end_date=end_date,
            data_source_reader=lambda _source, _repo_path: ibis.read_parquet([parquet_source(f) for f in files]),
            data_source_writer=write_data_source,
            staging_location=config.offline_store.staging_location,
            staging_location_endpoint_override=config.offline_store.staging_location_endpoint_override,
        )

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
        job = _asof_retrieval(config, feature_views, feature_refs, entity_df, full_feature_names)
        if job is not None and not filter_by_created_timestamp:
            return job
        return DuckDBOfflineStore.get_historical_features(
            config=config,
            feature_views=[_literal_view(feature_view) for feature_view in feature_views],
            feature_refs=feature_refs,
            entity_df=entity_df,
            registry=registry,
            project=project,
            full_feature_names=full_feature_names,
            filter_by_created_timestamp=filter_by_created_timestamp,
        )

    @staticmethod
    def pull_all_from_table_or_query(
        config: RepoConfig,
        data_source: DataSource,
        join_key_columns: list[str],
        feature_name_columns: list[str],
        timestamp_field: str,
        created_timestamp_column: str | None = None,
        start_date: datetime | None = None,
        end_date: datetime | None = None,
    ) -> RetrievalJob:
        """The stock query, over a source whose path is read as itself even when it holds glob characters."""
        return DuckDBOfflineStore.pull_all_from_table_or_query(
            config, _literal_source(data_source), join_key_columns, feature_name_columns, timestamp_field,
            created_timestamp_column, start_date, end_date,
        )  # fmt: skip


def _literal_source(source: DataSource) -> DataSource:
    """``source``, or for a local Parquet file or folder whose path holds ``[``, ``*`` or ``?`` a copy whose path
    is the escaped pattern that reads it as itself (:func:`parquet_source`).

    Stock Feast hands a folder source's path to DuckDB as is, and DuckDB reads it as a glob: under a data dir
    named ``[derm]`` the stock store finds no file, or another folder's files. Plain paths are returned unchanged.
    """
    if not isinstance(source, FileSource) or (path := _parquet_path(source)) is None:
        return source
    literal = parquet_source(path)
    if literal == path:
        return source
    copied = FileSource.from_proto(source.to_proto())
    copied.file_options.uri = literal
    return copied


def _literal_view(feature_view: FeatureView) -> FeatureView:
    """``feature_view`` whose batch source is :func:`_literal_source` (a copy only when the path changes)."""
    source = feature_view.batch_source
    literal = _literal_source(source) if source is not None else None
    if literal is source:
        return feature_view
    copied = feature_view.__copy__()
    copied.batch_source = literal
    return copied


def _asof_retrieval(
    config: RepoConfig,
    feature_views: list[FeatureView],
    feature_refs: list[str],
    entity_df: pd.DataFrame | str,
    full_feature_names: bool,
) -> AsofRetrievalJob | None:
    """The ASOF JOIN job for this retrieval, or None when only the stock store can do it."""
    if not isinstance(entity_df, pd.DataFrame):
        return None
    # A reference no given feature view serves belongs to an on-demand feature view.
    served = {fv.projection.name_to_use() for fv in feature_views}
    if any(ref.split(":")[0] not in served for ref in feature_refs):
        return None
    views = []
    for index, feature_view in enumerate(feature_views):
        view = _plan_view(index, feature_view, feature_refs, full_feature_names)
        if view is None:
            return None
        views.append(view)
    outputs = [output for view in views for output in view.feature_columns]
    # Feast's ibis join silently lets an entity column shadow a feature of the same name (or fails on it);
    # keep those odd cases on the stock path rather than reproduce them.
    if len(set(outputs)) != len(outputs) or set(outputs) & set(entity_df.columns):
        return None

    entity_schema = dict(zip(entity_df.columns, entity_df.dtypes, strict=True))
    event_timestamp_column = offline_utils.infer_event_timestamp_from_entity_df(entity_schema=entity_schema)
    timestamp_range = get_entity_df_event_timestamp_range(entity_df, event_timestamp_column)
    entity_df = _entity_df_utc(entity_df, event_timestamp_column)
    entity_table = _entity_arrow(entity_df)

    offline_config = config.offline_store
    query, parameters = _asof_query(list(entity_table.column_names), event_timestamp_column, views)
    for view in views:
        # Rows newer than the newest entity row, or expired before the oldest, can never be picked.
        oldest = _utc(timestamp_range[0]) - view.ttl if view.ttl else None
        files = files_in_window(view.source_path, oldest, _utc(timestamp_range[1]))
        if files is not None:
            parameters[view.source_parameter] = [parquet_source(file) for file in files]
    return AsofRetrievalJob(
        query=query,
        parameters=parameters,
        entity_table=entity_table,
        event_timestamp_column=event_timestamp_column,
        full_feature_names=full_feature_names,
        metadata=RetrievalMetadata(
            features=feature_refs,
            keys=list(set(entity_df.columns) - {event_timestamp_column}),
            min_event_timestamp=timestamp_range[0],
            max_event_timestamp=timestamp_range[1],
        ),
        repo_path=str(config.repo_path),
        config=offline_config,
    )
