"""The one place that touches private names of Feast, redis-py and Ibis.

The plugins and the serving reader reproduce Feast's Redis format and plug into
Feast's engines, and a few of the things they need exist only as private names.
Every such name is imported or accessed here, and only here, under a public name;
``tests/test_feast_compat.py`` resolves each one against the installed libraries
(so an upgrade that removes or changes one fails there, by name, rather than
deep inside a materialization) and scans ``derm.feast_plugins`` and
``derm.serving`` for private names used anywhere else.

Checked against feast 0.67.0, redis (redis-py) 7.4.1 and ibis-framework 12.0.0
(:data:`CHECKED_AGAINST`). Public name here <- private name, where it is defined, who uses it:

* :func:`mmh3_hash` <- ``_mmh3`` in ``feast.infra.online_stores.helpers``
  (feast 0.67.0): the Redis field name of a feature (``redis_format.feature_field``).
* :func:`versioned_fv_name` <- ``_versioned_fv_name`` in ``feast.infra.online_stores.redis``
  (feast 0.67.0): the view name fields are named with (``redis_format.stored_view_name``).
* :func:`validate_vector_field_lengths` <- ``_validate_vector_field_lengths`` in ``feast.utils``
  (feast 0.67.0): the vector-width check every engine runs before writing (the Arrow writer).
* :func:`get_column_names` <- ``_get_column_names`` in ``feast.utils`` (feast 0.67.0):
  a view's source column names (the vector engine).
* :func:`redis_client` <- method ``RedisOnlineStore._get_client`` in
  ``feast.infra.online_stores.redis`` (feast 0.67.0): the store's client (the Arrow writer).
* :func:`parse_redis_connection_string` <- static method
  ``RedisOnlineStore._parse_connection_string``, same module (feast 0.67.0): Feast's
  connection-string format (the serving reader).
* :func:`connection_socket` <- instance attribute ``_sock`` of ``redis.connection.Connection``
  (set by ``AbstractConnection``; redis 7.4.1): the socket the RESP reply loop
  (``resp.RespConnection``) reads with hiredis.
* :func:`ibis_backend` <- method ``Expr._find_backend`` in ``ibis.expr.types.core``
  (ibis 12.0.0): the backend an expression is bound to (the vector engine).
* :func:`run_ibis_pre_execute_hooks` <- method ``BaseBackend._run_pre_execute_hooks`` in
  ``ibis.backends`` (overridden by ``ibis.backends.duckdb.Backend``; ibis 12.0.0): the
  vector engine's streaming DuckDB read.
* :func:`write_data_source` <- ``_write_data_source`` in ``feast.infra.offline_stores.duckdb``
  (feast 0.67.0): the as-of offline store's ``persist``.
* :func:`get_entity_df_event_timestamp_range` <- ``_get_entity_df_event_timestamp_range`` in
  ``feast.infra.offline_stores.ibis`` (feast 0.67.0): the as-of offline store's
  historical retrieval.

One private name cannot move here: ``VectorMaterializationEngine`` overrides the
hook ``LocalComputeEngine._materialize_one`` (``feast.infra.compute_engines``),
which ``ComputeEngine.materialize`` calls per task. If Feast renamed it, the fast
path would silently stop running, so the compat test checks that hook as well.

The two offline-store names are imported when first called, so that the online
path (the Redis writer and the serving reader) does not load the offline stores.

Example::

    from derm.feast_plugins import compat

    field = compat.mmh3_hash("ctr_pin_emb_v1:ctr_pin_emb")   # the 4-byte Redis field name
    nodes, params = compat.parse_redis_connection_string("localhost:6379,db=1")
"""

from __future__ import annotations

import socket
from datetime import datetime
from typing import Any

from feast.infra.online_stores.helpers import _mmh3
from feast.infra.online_stores.redis import RedisOnlineStore, _versioned_fv_name
from feast.utils import _get_column_names, _validate_vector_field_lengths

CHECKED_AGAINST = {"feast": "0.67.0", "redis": "7.4.1", "ibis-framework": "12.0.0"}
"""Distribution name -> the version every private name here was checked against."""


# --- Feast: the Redis format -----------------------------------------------------------------


def mmh3_hash(key: str) -> bytes:
    """Feast's ``_mmh3``: the 4 little-endian bytes of unsigned murmur3_32 of ``key`` (a feature's field name)."""
    return _mmh3(key)


def versioned_fv_name(feature_view: Any, config: Any) -> str:
    """Feast's ``_versioned_fv_name``: the view name Redis fields are named with (versioned when enabled)."""
    return _versioned_fv_name(feature_view, config)


# --- Feast: materialization ------------------------------------------------------------------


def validate_vector_field_lengths(table: Any, feature_view: Any) -> None:
    """Feast's ``_validate_vector_field_lengths``: the vector-width check every engine runs before writing."""
    _validate_vector_field_lengths(table, feature_view)


def get_column_names(feature_view: Any, entities: list[Any]) -> tuple[list[str], list[str], str, str | None]:
    """Feast's ``_get_column_names``: (join keys, features, event time, created time) as the source names them."""
    return _get_column_names(feature_view, entities)


# --- Feast: the Redis online store -----------------------------------------------------------


def redis_client(store: RedisOnlineStore, online_store_config: Any) -> Any:
    """``RedisOnlineStore._get_client``: the store's (cached) redis-py client, Redis, Cluster or Sentinel."""
    return store._get_client(online_store_config)


def parse_redis_connection_string(connection_string: str) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """``RedisOnlineStore._parse_connection_string``: ``([{"host", "port"}, ...], redis-py keyword arguments)``."""
    return RedisOnlineStore._parse_connection_string(connection_string)


# --- redis-py --------------------------------------------------------------------------------


def connection_socket(connection: Any) -> socket.socket:
    """The socket of a connected redis-py ``Connection`` (``_sock``), for reading replies with hiredis."""
    return connection._sock


# --- Ibis ------------------------------------------------------------------------------------


def ibis_backend(expression: Any) -> Any:
    """``Expr._find_backend()``: the backend an Ibis expression is bound to (raises when it has none)."""
    return expression._find_backend()


def run_ibis_pre_execute_hooks(backend: Any, expression: Any) -> None:
    """``backend._run_pre_execute_hooks(expression)``: what Ibis runs before executing (e.g. registers tables)."""
    backend._run_pre_execute_hooks(expression)


# --- Feast: offline stores (imported on first use) -------------------------------------------


def write_data_source(
    table: Any, data_source: Any, repo_path: str, mode: str = "append", allow_overwrite: bool = False
) -> None:
    """Feast's DuckDB-store ``_write_data_source``: append or overwrite a file source with an Arrow table."""
    from feast.infra.offline_stores.duckdb import _write_data_source

    _write_data_source(table, data_source, repo_path, mode=mode, allow_overwrite=allow_overwrite)


def get_entity_df_event_timestamp_range(
    entity_df: Any, entity_df_event_timestamp_col: str
) -> tuple[datetime, datetime]:
    """Feast's Ibis-store ``_get_entity_df_event_timestamp_range``: (min, max) event time of an entity frame."""
    from feast.infra.offline_stores.ibis import _get_entity_df_event_timestamp_range

    return _get_entity_df_event_timestamp_range(entity_df, entity_df_event_timestamp_col)
