"""The private Feast, redis-py and Ibis names the platform relies on, checked against the installed versions.

``derm.feast_plugins.compat`` is the only module allowed to touch them. Two kinds of test:

* one per private name: it still exists where compat expects it, has the same kind
  (function, method, static method, instance attribute) and parameters, and behaves
  as compat relies on. After an upgrade, a failure names the private name, the
  installed version and the version compat was checked against;
* a scan of the source of every module of ``derm.feast_plugins`` and ``derm.serving``
  (found through the installed packages' ``__path__``) that fails when a module
  other than compat imports a ``_private`` name from Feast, redis-py, hiredis or
  Ibis, or reaches for one of the private attributes compat wraps.

Both can fail: ``test_the_checks_can_fail`` runs them on a removed name and on a
module that breaks the rule.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import socket
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import derm.feast_plugins
import derm.serving
from derm.feast_plugins import compat
from derm.infra.redis_server import LocalRedisServer

# ---------------------------------------------------------------------------------------------
# One check per private name
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Private:
    """A private name: where it is defined, what it must look like, and compat's public name for it."""

    distribution: str  # as importlib.metadata knows it: feast, redis, ibis-framework
    module: str
    qualname: str  # "name" or "Class.name"
    kind: str  # function | method | staticmethod | attribute
    parameters: tuple[str, ...] = ()  # expected parameter names, in order (not for attributes)
    compat_name: str = ""  # the public name in compat; "" for a hook that cannot be wrapped
    called_from: str = ""  # "module:Class.method" whose source must call ``self.<name>(``

    @property
    def name(self) -> str:
        return self.qualname.rpartition(".")[2]

    def __str__(self) -> str:
        return f"{self.module}.{self.qualname}"


PRIVATE_NAMES = [
    Private("feast", "feast.infra.online_stores.helpers", "_mmh3", "function", ("key",), "mmh3_hash"),
    Private(
        "feast", "feast.infra.online_stores.redis", "_versioned_fv_name", "function", ("table", "config"),
        "versioned_fv_name",
    ),
    Private(
        "feast", "feast.utils", "_validate_vector_field_lengths", "function", ("table", "feature_view"),
        "validate_vector_field_lengths",
    ),
    Private("feast", "feast.utils", "_get_column_names", "function", ("feature_view", "entities"), "get_column_names"),
    Private(
        "feast", "feast.infra.online_stores.redis", "RedisOnlineStore._get_client", "method",
        ("self", "online_store_config"), "redis_client",
    ),
    Private(
        "feast", "feast.infra.online_stores.redis", "RedisOnlineStore._parse_connection_string", "staticmethod",
        ("connection_string",), "parse_redis_connection_string",
    ),
    Private(
        "feast", "feast.infra.offline_stores.duckdb", "_write_data_source", "function",
        ("table", "data_source", "repo_path", "mode", "allow_overwrite"), "write_data_source",
    ),
    Private(
        "feast", "feast.infra.offline_stores.ibis", "_get_entity_df_event_timestamp_range", "function",
        ("entity_df", "entity_df_event_timestamp_col"), "get_entity_df_event_timestamp_range",
    ),
    Private(
        "feast", "feast.infra.compute_engines.local.compute", "LocalComputeEngine._materialize_one", "method",
        ("self", "registry", "task", "kwargs"),
        called_from="feast.infra.compute_engines.base:ComputeEngine.materialize",
    ),
    Private("redis", "redis.connection", "Connection._sock", "attribute", (), "connection_socket"),
    Private(
        "ibis-framework", "ibis.expr.types.core", "Expr._find_backend", "method", ("self", "use_default"),
        "ibis_backend",
    ),
    Private(
        "ibis-framework", "ibis.backends", "BaseBackend._run_pre_execute_hooks", "method", ("self", "expr"),
        "run_ibis_pre_execute_hooks",
    ),
    Private(
        "ibis-framework", "ibis.backends.duckdb", "Backend._run_pre_execute_hooks", "method", ("self", "expr"),
        "run_ibis_pre_execute_hooks",
    ),
]  # fmt: skip


def _named(name: str) -> Private:
    return next(private for private in PRIVATE_NAMES if private.name == name)


def _where(private: Private) -> str:
    installed = importlib.metadata.version(private.distribution)
    checked = compat.CHECKED_AGAINST[private.distribution]
    uses = f"derm.feast_plugins.compat.{private.compat_name}" if private.compat_name else "VectorMaterializationEngine"
    return (
        f"private name {private} ({private.distribution} {installed} installed; compat was checked against "
        f"{private.distribution} {checked}; used by {uses})"
    )


def _resolve(private: Private) -> Any:
    """The private object, or AssertionError naming it and the library versions."""
    try:
        owner: Any = importlib.import_module(private.module)
    except ImportError as error:
        raise AssertionError(f"{_where(private)}: module {private.module} is gone ({error})") from error
    *path, name = private.qualname.split(".")
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            raise AssertionError(f"{_where(private)}: {private.module} has no {part} any more")
    if private.kind == "attribute":
        instance = owner()  # an unconnected connection: no I/O
        if name not in vars(instance):
            raise AssertionError(f"{_where(private)}: {owner.__name__} instances no longer have {name}")
        return getattr(instance, name)
    raw = inspect.getattr_static(owner, name, None)
    if raw is None:
        raise AssertionError(f"{_where(private)}: it was removed or renamed")
    kind = {staticmethod: "staticmethod", classmethod: "classmethod"}.get(type(raw), "method" if path else "function")
    if kind != private.kind or not callable(getattr(owner, name)):
        raise AssertionError(f"{_where(private)}: expected a {private.kind}, found {kind} {raw!r}")
    parameters = tuple(inspect.signature(getattr(owner, name)).parameters)
    if parameters != private.parameters:
        raise AssertionError(f"{_where(private)}: parameters changed from {private.parameters} to {parameters}")
    return getattr(owner, name)


def _check_called(private: Private) -> None:
    module_name, _, qualname = private.called_from.partition(":")
    caller: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        caller = getattr(caller, part)
    if f"self.{private.name}(" not in inspect.getsource(caller):
        raise AssertionError(
            f"{_where(private)}: {private.called_from} no longer calls self.{private.name}(...), "
            "so the override would silently never run"
        )


@pytest.mark.parametrize("private", PRIVATE_NAMES, ids=str)
def test_private_name_is_still_there(private: Private) -> None:
    _resolve(private)
    if private.called_from:
        _check_called(private)
    if private.compat_name:
        assert callable(getattr(compat, private.compat_name, None)), f"compat.{private.compat_name} is missing"
    assert private.name in (compat.__doc__ or ""), f"compat's docstring does not list {private}"


# --- what compat relies on, exercised --------------------------------------------------------


def test_mmh3_hash_is_little_endian_murmur3() -> None:
    import mmh3

    for key in ("ctr_pin_emb_v1:ctr_pin_emb", "view:feature", "é:ü"):
        assert compat.mmh3_hash(key) == struct.pack("<I", mmh3.hash(key, signed=False)), _where(_named("_mmh3"))


def test_versioned_fv_name_is_the_plain_name_without_versioning() -> None:
    view = SimpleNamespace(name="pin_daily_stats", current_version_number=3)
    config = SimpleNamespace(registry=SimpleNamespace(enable_online_feature_view_versioning=False))
    assert compat.versioned_fv_name(view, config) == "pin_daily_stats", _where(_named("_versioned_fv_name"))


def test_parse_redis_connection_string() -> None:
    nodes, params = compat.parse_redis_connection_string("redis-a:6379,db=2,ssl=true,password=p=w")
    assert (nodes, params) == ([{"host": "redis-a", "port": "6379"}], {"db": 2, "ssl": True, "password": "p=w"}), (
        _where(_named("_parse_connection_string"))
    )


def test_redis_client_and_connection_socket(redis_server: LocalRedisServer) -> None:
    from feast.infra.online_stores.redis import RedisOnlineStore, RedisOnlineStoreConfig
    from redis import Redis

    store = RedisOnlineStore()
    config = RedisOnlineStoreConfig(connection_string=redis_server.connection_string)
    client = compat.redis_client(store, config)
    assert isinstance(client, Redis) and compat.redis_client(store, config) is client, _where(_named("_get_client"))
    connection = client.connection_pool.get_connection()
    try:
        assert isinstance(compat.connection_socket(connection), socket.socket), _where(_named("_sock"))
        connection.disconnect()
        assert compat.connection_socket(connection) is None, _where(_named("_sock"))
    finally:
        client.connection_pool.release(connection)
        client.close()


def test_ibis_backend_and_pre_execute_hooks_register_memtables() -> None:
    """What the vector engine does: find the DuckDB backend, run its hooks, run the compiled SQL itself."""
    import ibis

    backend = ibis.duckdb.connect()
    try:
        backend.con.execute("CREATE TABLE entities AS SELECT * FROM (VALUES (1), (2)) AS t(id)")
        table = backend.table("entities")
        expression = table.join(ibis.memtable({"id": [2], "score": [0.5]}), "id")
        found = compat.ibis_backend(expression)
        assert found is backend and found.name == "duckdb", _where(_named("_find_backend"))
        compat.run_ibis_pre_execute_hooks(found, expression)
        rows = found.con.sql(found.compile(expression.as_table())).fetchall()
        assert rows == [(2, 0.5)], _where(_named("_run_pre_execute_hooks"))
    finally:
        backend.disconnect()


def test_offline_store_helpers(tmp_path: Path) -> None:
    import ibis
    import pandas as pd
    import pyarrow.parquet as pq
    from feast import FileSource

    frame = pd.DataFrame({"ts": pd.to_datetime(["2026-01-02", "2026-01-01"], utc=True)})
    low, high = compat.get_entity_df_event_timestamp_range(frame, "ts")
    assert (low, high) == (datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)), _where(
        _named("_get_entity_df_event_timestamp_range")
    )
    target = tmp_path / "saved.parquet"
    source = FileSource(name="saved", path=str(target), timestamp_field="ts")
    compat.write_data_source(ibis.memtable({"a": [1, 2]}), source, str(tmp_path), "overwrite", False)
    assert pq.read_table(target).column("a").to_pylist() == [1, 2], _where(_named("_write_data_source"))


# ---------------------------------------------------------------------------------------------
# Nobody but compat touches them
# ---------------------------------------------------------------------------------------------

_LIBRARIES = {"feast", "redis", "hiredis", "ibis"}
_PRIVATE_ATTRIBUTES = {"_sock", "_find_backend", "_run_pre_execute_hooks", "_get_client", "_parse_connection_string"}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(source: str) -> list[tuple[int, str, str]]:
    """(line, private name, what) for every private library name a module's source uses."""
    tree = ast.parse(source)
    library_names: set[str] = set()  # local names bound to a library module or one of its objects
    found: list[tuple[int, str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] not in _LIBRARIES:
                continue
            found += [
                (node.lineno, part, f"from {node.module}") for part in node.module.split(".") if _is_private(part)
            ]
            for alias in node.names:
                if _is_private(alias.name):
                    found.append((node.lineno, alias.name, f"from {node.module} import {alias.name}"))
                else:
                    library_names.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in _LIBRARIES:
                    found += [(node.lineno, part, f"import {alias.name}") for part in parts if _is_private(part)]
                    library_names.add(alias.asname or parts[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            root: ast.expr = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if node.attr in _PRIVATE_ATTRIBUTES:
                found.append((node.lineno, node.attr, f".{node.attr}"))
            elif _is_private(node.attr) and isinstance(root, ast.Name) and root.id in library_names:
                found.append((node.lineno, node.attr, f"{ast.unparse(node)}"))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"getattr", "hasattr", "setattr"}
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in _PRIVATE_ATTRIBUTES
        ):
            found.append((node.lineno, node.args[1].value, f"{node.func.id}(..., {node.args[1].value!r})"))
    return sorted(found)


def _modules() -> dict[str, Path]:
    """Every source file of the installed derm.feast_plugins and derm.serving, by package-relative name."""
    files = {}
    for package in (derm.feast_plugins, derm.serving):
        for root in map(Path, package.__path__):
            for path in sorted(root.rglob("*.py")):
                files[f"{package.__name__}/{path.relative_to(root).as_posix()}"] = path
    return files


def test_only_compat_touches_private_library_names() -> None:
    modules = _modules()
    assert {"derm.feast_plugins/compat.py", "derm.feast_plugins/redis_online_store.py"} <= set(modules)
    assert "derm.serving/embedding_reader.py" in modules
    offenders = []
    for name, path in modules.items():
        if name == "derm.feast_plugins/compat.py":
            continue
        offenders += [f"{name}:{line}: {what}" for line, _, what in private_uses(path.read_text())]
    assert not offenders, (
        "private Feast/redis-py/Ibis names used outside derm.feast_plugins.compat (add a public wrapper there "
        "and a check here):\n  " + "\n  ".join(offenders)
    )


def test_compat_touches_every_listed_name() -> None:
    """The list above and compat agree: each private name compat wraps is used there."""
    used = {private for _, private, _ in private_uses(Path(compat.__file__).read_text())}
    listed = {private.name for private in PRIVATE_NAMES if private.compat_name}
    assert used == listed


def test_the_checks_can_fail() -> None:
    removed = Private(
        "feast", "feast.utils", "_no_such_helper", "function", ("table",), "validate_vector_field_lengths"
    )
    feast_version = importlib.metadata.version("feast")
    with pytest.raises(AssertionError, match=rf"feast\.utils\._no_such_helper \(feast {feast_version} installed"):
        _resolve(removed)
    changed = Private("feast", "feast.utils", "_get_column_names", "function", ("view",), "get_column_names")
    with pytest.raises(AssertionError, match="parameters changed"):
        _resolve(changed)
    gone = Private("redis", "redis.connection", "Connection._socket", "attribute", (), "connection_socket")
    with pytest.raises(AssertionError, match="instances no longer have _socket"):
        _resolve(gone)
    offending = (
        "from feast.infra.online_stores.helpers import _mmh3\n"
        "import feast.utils\n"
        "from ibis.expr import types\n"
        "feast.utils._get_column_names(view, [])\n"
        "types.core._private_helper()\n"
        "sock = connection._sock\n"
        "backend = getattr(expression, '_find_backend')()\n"
        "self._get_client(config)\n"
        "self._own_cache = {}\n"
    )
    assert [private for _, private, _ in private_uses(offending)] == [
        "_mmh3",
        "_get_column_names",
        "_private_helper",
        "_sock",
        "_find_backend",
        "_get_client",
    ]
