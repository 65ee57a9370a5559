"""The fast materialization path writes exactly what stock Feast writes.

Every comparison is against stock Feast itself on a real redis-server: the local
engine + ``redis`` online store into db 0, the vector engine + fast store into
db 1 (or per-row ``_convert_arrow_to_proto`` + ``online_write_batch`` against
``FastRedisOnlineStore.write_arrow`` for the many random cases). The codec the
writer and the serving reader share (``redis_format``: keys, field names, ``Value``
prefixes; ``resp``: commands and the reply loop) is checked piece by piece against
Feast's own functions and redis-py's command packer.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from feast import Entity, FeatureView, Field, FileSource, RepoConfig, ValueType
from feast.infra.online_stores.helpers import _mmh3, _redis_key
from feast.infra.online_stores.redis import RedisOnlineStore
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.types import Array, Bool, Bytes, Float32, Float64, Int32, Int64, String
from feast.utils import _convert_arrow_to_proto, make_tzaware
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from derm.feast_plugins import compat, redis_format, resp
from derm.feast_plugins.redis_online_store import (
    _READ_TIMESTAMPS_SCRIPT,
    FastRedisOnlineStore,
    _PipelineWriter,
    _read_timestamps_command,
    encode_rows,
)
from derm.infra.redis_server import LocalRedisServer
from tests.stock_comparison import (
    FAST_STORE,
    VECTOR_ENGINE,
    WINDOW_END,
    WINDOW_START,
    feature_store_in,
    stock_and_fast_stores,
    user_embedding_view,
)


class _PipelineFastRedisOnlineStore(FastRedisOnlineStore):
    """The writer used for Redis Cluster (redis-py pipelines), forced on a plain Redis."""

    def _writer(self, config: RepoConfig) -> _PipelineWriter:
        return _PipelineWriter(compat.redis_client(self, config.online_store), config.online_store)


PROJECT = "fastmat"
DIM = 16


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _dump(client: redis.Redis) -> dict[bytes, dict[bytes, bytes]]:
    return {key: client.hgetall(key) for key in client.scan_iter(count=1000)}


def _entity_key(user_id: int) -> EntityKeyProto:
    return EntityKeyProto(join_keys=["user_id"], entity_values=[ValueProto(int64_val=user_id)])


def _client(server: LocalRedisServer, db: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, db=db)


def _offline_rows(seed: int, entities: int) -> pa.Table:
    """Several rows per entity: shared timestamps (ties across entities), same event time with
    different created times, rows before and after the window, nulls in every feature."""
    rng = np.random.default_rng(seed)
    in_window = [WINDOW_START + timedelta(hours=12 * i) for i in range(5)]  # start and end are inclusive
    outside = [WINDOW_START - timedelta(days=2), WINDOW_END + timedelta(hours=1)]
    records = []
    for user_id in range(1, entities + 1):
        times = list(rng.choice(in_window, size=int(rng.integers(1, 5))))
        if user_id % 5 == 0:
            times.append(times[0])  # same event time twice: created time decides
        if user_id % 7 == 0:
            times = []  # only rows outside the window: never written
        times += list(rng.choice(outside, size=int(rng.integers(0, 3))))
        for event_time in times:
            records.append((user_id, event_time))
    rows = len(records)
    vectors = rng.standard_normal((rows, DIM)).astype(np.float32)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM).cast(pa.list_(pa.float32()))
    embedding_mask = rng.random(rows) < 0.1
    clicks = rng.integers(-5, 1 << 40, size=rows)
    score = rng.standard_normal(rows)
    score[rng.random(rows) < 0.05] = np.nan
    labels = [f"label-{i}-é" if i % 3 else "" for i in range(rows)]
    return pa.table(
        {
            "user_id": pa.array([r[0] for r in records], pa.int64()),
            "embedding": pa.array(
                [None if m else v for v, m in zip(embedding.to_pylist(), embedding_mask, strict=True)],
                pa.list_(pa.float32()),
            ),
            "clicks": pa.array(clicks, mask=rng.random(rows) < 0.2),
            "score": pa.array(score, mask=rng.random(rows) < 0.2),
            "label": pa.array(labels, mask=rng.random(rows) < 0.2),
            "event_timestamp": pa.array([r[1] for r in records], pa.timestamp("us", tz="UTC")),
            # Unique created times, shuffled so they do not follow the row order.
            "created": pa.array(
                [datetime(2026, 2, 1, tzinfo=UTC) + timedelta(seconds=int(s)) for s in rng.permutation(rows)],
                pa.timestamp("us", tz="UTC"),
            ),
        }
    )


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, redis_server: LocalRedisServer):
    """The same repository twice: stock Feast into db 0, the fast path into db 1."""
    tmp_path = tmp_path_factory.mktemp("fastmat")
    data = tmp_path / "embeddings.parquet"
    pq.write_table(_offline_rows(seed=7, entities=60), data)
    user, view = user_embedding_view(data, source_name="emb_source", score=True)
    stock, fast = stock_and_fast_stores(
        tmp_path,
        [user, view],
        (PROJECT, PROJECT),
        stock_online={"connection_string": f"{redis_server.connection_string},db=0"},
        # Small batches so chunking, the queue and the streaming reader are all exercised.
        fast_online={"connection_string": f"{redis_server.connection_string},db=1", "write_batch_rows": 7},
        fast_engine={"type": VECTOR_ENGINE, "read_batch_rows": 11},
    )
    return stock, fast, view, data


@pytest.fixture
def empty_stores(stores, redis_server: LocalRedisServer):
    """The two repositories with empty online stores: no test sees what another one materialized."""
    for db in (0, 1):
        _client(redis_server, db).flushdb()
    return stores


@pytest.fixture
def materialized(empty_stores):
    """The whole window materialized by both paths."""
    stock, fast, _, _ = empty_stores
    stock.materialize(start_date=WINDOW_START, end_date=WINDOW_END)
    fast.materialize(start_date=WINDOW_START, end_date=WINDOW_END)
    return empty_stores


# --------------------------------------------------------------------------------------------
# full materialization, stock vs fast
# --------------------------------------------------------------------------------------------


def test_materialize_writes_byte_identical_hashes(empty_stores, redis_server: LocalRedisServer) -> None:
    stock, fast, _, data = empty_stores
    assert type(fast._get_provider().batch_engine).__name__ == "VectorMaterializationEngine"
    assert isinstance(fast._get_provider().online_store, FastRedisOnlineStore)
    stock.materialize(start_date=WINDOW_START, end_date=WINDOW_END)
    fast.materialize(start_date=WINDOW_START, end_date=WINDOW_END)

    expected, got = _dump(_client(redis_server, 0)), _dump(_client(redis_server, 1))
    in_window_users = {
        row["user_id"]
        for row in pq.read_table(data).to_pylist()
        if WINDOW_START <= row["event_timestamp"] <= WINDOW_END
    }
    assert len(expected) == len(in_window_users) > 40
    assert got == expected
    # Null scalars are written as an empty Value (the field exists, zero bytes), as stock does.
    assert any(b"" in fields.values() for fields in got.values())


def test_online_reads_from_fast_store_match_stock(materialized) -> None:
    stock, fast, _, _ = materialized
    features = ["user_emb:embedding", "user_emb:clicks", "user_emb:score", "user_emb:label"]
    rows = [{"user_id": user_id} for user_id in range(1, 62)]  # 61 never exists
    expected = stock.get_online_features(features=features, entity_rows=rows).to_dict()
    got = fast.get_online_features(features=features, entity_rows=rows).to_dict()
    assert got == expected
    assert got["embedding"][-1] is None
    assert sum(vector is not None for vector in got["embedding"]) > 30


def test_older_window_does_not_overwrite_newer_values(materialized, redis_server: LocalRedisServer) -> None:
    """A second run over an older, overlapping window: rows not newer than the stored _ts are skipped."""
    stock, fast, _, _ = materialized
    before = _dump(_client(redis_server, 1))
    older_start, older_end = WINDOW_START - timedelta(days=3), WINDOW_START + timedelta(hours=12)
    stock.materialize(start_date=older_start, end_date=older_end)
    fast.materialize(start_date=older_start, end_date=older_end)

    after = _dump(_client(redis_server, 1))
    assert after == _dump(_client(redis_server, 0))
    assert len(after) > len(before), "entities seen only in the older window are added"
    assert all(after[key] == fields for key, fields in before.items()), "newer values are kept"


def test_fast_path_errors_propagate_like_stock(stores, tmp_path: Path, redis_server: LocalRedisServer) -> None:
    """A Redis error on the writer thread fails FeatureStore.materialize, as an error does in stock Feast."""
    _, _, view, _ = stores
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
    broken = feature_store_in(
        tmp_path,
        PROJECT,
        {"type": FAST_STORE, "connection_string": f"{redis_server.connection_string},db=6"},
        {"type": VECTOR_ENGINE},
        registry="broken",
    )
    broken.apply([user, view])
    client = _client(redis_server, 6)
    client.flushdb()
    # A plain string where user 1's hash should be: Redis answers WRONGTYPE.
    client.set(_redis_key(PROJECT, _entity_key(1), 3), b"not a hash")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE") as failure:
        broken.materialize(start_date=WINDOW_START, end_date=WINDOW_END)
    assert not [thread for thread in threading.enumerate() if thread.name == "fast-redis-writer"]
    # While the traceback is still alive, Ibis' shared DuckDB connection (which the stream read from) must
    # be free for the next Feast query: a dangling result would break every later materialize or retrieval.
    assert failure.traceback
    client.delete(_redis_key(PROJECT, _entity_key(1), 3))
    broken.materialize(start_date=WINDOW_START, end_date=WINDOW_END)
    assert client.dbsize() > 0


# --------------------------------------------------------------------------------------------
# many random tables: encoder and writer against Feast's per-row functions
# --------------------------------------------------------------------------------------------

_ALL_TYPES_SOURCE = FileSource(name="all_types", path="unused.parquet", timestamp_field="ts")
_USER = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
_COUNTRY = Entity(name="country", join_keys=["country"], value_type=ValueType.STRING)
_ALL_TYPES_VIEW = FeatureView(
    name="all_types",
    entities=[_USER, _COUNTRY],
    ttl=timedelta(days=1),
    schema=[
        Field(name="user_id", dtype=Int64),
        Field(name="country", dtype=String),
        Field(name="vec", dtype=Array(Float32)),
        Field(name="dvec", dtype=Array(Float64)),
        Field(name="i64", dtype=Int64),
        Field(name="i32", dtype=Int32),
        Field(name="f64", dtype=Float64),
        Field(name="f32", dtype=Float32),
        Field(name="flag", dtype=Bool),
        Field(name="text", dtype=String),
        Field(name="blob", dtype=Bytes),
        Field(name="tags", dtype=Array(String)),  # not vectorized: Feast's own converter
    ],
    source=_ALL_TYPES_SOURCE,
)


@st.composite
def random_tables(draw: st.DrawFn, max_rows: int = 12) -> pa.Table:
    rows = draw(st.integers(0, max_rows))
    maybe = lambda strategy: st.one_of(st.none(), strategy)  # noqa: E731
    floats32 = st.floats(width=32, allow_nan=False)
    dim = draw(st.integers(0, 4))

    def column(strategy):
        return draw(st.lists(strategy, min_size=rows, max_size=rows))

    # Dense small ids (duplicates: dedup and ties) or sparse ids anywhere in the 64-bit range.
    ids = draw(st.sampled_from([st.integers(-3, 3), st.integers(-(2**63), 2**63 - 1)]))
    # Any timestamp unit an offline source may hold; distinct times up to a day apart in that unit.
    unit = draw(st.sampled_from(["s", "ms", "us", "ns"]))
    per_second = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[unit]
    base = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp()) * per_second
    times = st.one_of(st.sampled_from([0, 1, 86_400 * per_second + 1]), st.integers(0, 86_400 * per_second))
    return pa.table(
        {
            "user_id": pa.array(column(ids), pa.int64()),
            "country": pa.array(column(st.sampled_from(["", "fr", "日本"])), pa.string()),
            "vec": pa.array(
                column(maybe(st.lists(maybe(floats32), min_size=dim, max_size=dim))), pa.list_(pa.float32())
            ),
            "dvec": pa.array(column(maybe(st.lists(st.floats(allow_nan=False), max_size=3))), pa.list_(pa.float64())),
            # Int64 with nulls goes through float64 in stock Feast: keep within 2**53 (see derm.feast_plugins).
            "i64": pa.array(column(maybe(st.integers(-(2**53), 2**53))), pa.int64()),
            "i32": pa.array(column(maybe(st.integers(-(2**31), 2**31 - 1))), pa.int32()),
            "f64": pa.array(column(maybe(st.floats())), pa.float64()),
            "f32": pa.array(column(maybe(st.floats(width=32))), pa.float32()),
            "flag": pa.array(column(maybe(st.booleans())), pa.bool_()),
            "text": pa.array(column(maybe(st.text(max_size=5))), pa.string()),
            "blob": pa.array(column(maybe(st.binary(max_size=5))), pa.binary()),
            "tags": pa.array(column(maybe(st.lists(st.text(max_size=3), max_size=2))), pa.list_(pa.string())),
            "ts": pa.array([base + t for t in column(times)], pa.timestamp(unit, tz="UTC")),
        }
    )


def _config(online_store: dict, project: str = PROJECT) -> RepoConfig:
    return RepoConfig(
        project=project,
        provider="local",
        registry="unused-registry.db",
        online_store=online_store,
        entity_key_serialization_version=3,
    )


def _stock_rows(table: pa.Table, view: FeatureView) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """What stock online_write_batch would HSET for each row (without dedup)."""
    join_keys = {column.name: column.dtype.to_value_type() for column in view.entity_columns}
    rows = []
    for entity_key, values, event_time, _ in _convert_arrow_to_proto(table, view, join_keys):
        ts = Timestamp()
        ts.FromDatetime(make_tzaware(event_time))
        fields = {f"_ts:{view.name}".encode(): ts.SerializeToString()}
        fields.update({_mmh3(f"{view.name}:{name}"): value.SerializeToString() for name, value in values.items()})
        rows.append((_redis_key(PROJECT, entity_key, 3), fields))
    return rows


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=random_tables())
def test_encoder_matches_feast_per_row_conversion(table: pa.Table) -> None:
    if table.num_rows == 0:
        return
    encoded = encode_rows(_config({"type": FAST_STORE}), _ALL_TYPES_VIEW, table, with_commands=True)
    assert encoded.rows() == _stock_rows(table, _ALL_TYPES_VIEW)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    first=random_tables(),
    second=random_tables(),
    skip_dedup=st.booleans(),
    ttl=st.sampled_from([None, 3600]),
    chunk_rows=st.sampled_from([1, 3, 5000]),
    redis_py_pipelines=st.booleans(),
)
def test_writer_matches_stock_online_write_batch(
    redis_server: LocalRedisServer,
    first: pa.Table,
    second: pa.Table,
    skip_dedup: bool,
    ttl: int | None,
    chunk_rows: int,
    redis_py_pipelines: bool,
) -> None:
    """Two writes in a row (the second one over stored values), duplicates and ties included."""
    connection = redis_server.connection_string
    common = {"skip_dedup": skip_dedup, "key_ttl_seconds": ttl}
    stock_config = _config({"type": "redis", "connection_string": f"{connection},db=2", **common})
    fast_config = _config(
        {"type": FAST_STORE, "connection_string": f"{connection},db=3", "write_batch_rows": chunk_rows, **common}
    )
    stock_client, fast_client = _client(redis_server, 2), _client(redis_server, 3)
    stock_client.flushdb()
    fast_client.flushdb()
    stock = RedisOnlineStore()
    fast = _PipelineFastRedisOnlineStore() if redis_py_pipelines else FastRedisOnlineStore()
    join_keys = {column.name: column.dtype.to_value_type() for column in _ALL_TYPES_VIEW.entity_columns}
    for table in (first, second):
        if table.num_rows:
            rows = _convert_arrow_to_proto(table, _ALL_TYPES_VIEW, join_keys)
            stock.online_write_batch(stock_config, _ALL_TYPES_VIEW, rows, progress=None)
        fast.write_arrow(fast_config, _ALL_TYPES_VIEW, table)
    assert _dump(fast_client) == _dump(stock_client)
    if ttl:
        assert all(0 < fast_client.ttl(key) <= ttl for key in fast_client.scan_iter())


def test_versioned_view_names_are_respected(redis_server: LocalRedisServer) -> None:
    """With online versioning on, fields and _ts use the versioned name, as stock does."""
    view = _ALL_TYPES_VIEW.__copy__()
    view.current_version_number = 3
    base = datetime(2026, 1, 1, tzinfo=UTC)
    table = pa.table(
        {
            "user_id": pa.array([1, 2], pa.int64()),
            "country": ["fr", "fr"],
            "vec": pa.array([[1.0], [2.0]], pa.list_(pa.float32())),
            "dvec": pa.array([[1.0], None], pa.list_(pa.float64())),
            "i64": [1, 2],
            "i32": pa.array([1, 2], pa.int32()),
            "f64": [1.0, 2.0],
            "f32": pa.array([1.0, 2.0], pa.float32()),
            "flag": [True, False],
            "text": ["a", "b"],
            "blob": [b"a", b"b"],
            "tags": [["x"], []],
            "ts": pa.array([base, base], pa.timestamp("us", tz="UTC")),
        }
    )
    registry = {"path": "unused-registry.db", "enable_online_feature_view_versioning": True}
    stock_config = RepoConfig(
        project=PROJECT, provider="local", registry=registry, entity_key_serialization_version=3,
        online_store={"type": "redis", "connection_string": f"{redis_server.connection_string},db=4"},
    )  # fmt: skip
    fast_config = RepoConfig(
        project=PROJECT, provider="local", registry=registry, entity_key_serialization_version=3,
        online_store={"type": FAST_STORE, "connection_string": f"{redis_server.connection_string},db=5"},
    )  # fmt: skip
    for db in (4, 5):
        _client(redis_server, db).flushdb()
    join_keys = {column.name: column.dtype.to_value_type() for column in view.entity_columns}
    RedisOnlineStore().online_write_batch(stock_config, view, _convert_arrow_to_proto(table, view, join_keys), None)
    FastRedisOnlineStore().write_arrow(fast_config, view, table)
    written = _dump(_client(redis_server, 5))
    assert written == _dump(_client(redis_server, 4))
    assert all(b"_ts:all_types_v3" in fields for fields in written.values())


# --------------------------------------------------------------------------------------------
# the shared codec (redis_format, resp) against Feast and redis-py
# --------------------------------------------------------------------------------------------

_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)
_int64s = st.integers(-(2**63), 2**63 - 1)


@settings(max_examples=100, deadline=None)
@given(view=_names, feature=_names, project=_names, ids=st.lists(_int64s, min_size=1, max_size=20))
def test_field_names_and_keys_match_feast(view: str, feature: str, project: str, ids: list[int]) -> None:
    assert redis_format.feature_field(view, feature) == _mmh3(f"{view}:{feature}")
    assert redis_format.ts_field(view) == f"_ts:{view}".encode()
    feast_keys = [_redis_key(project, _entity_key_of("user_id", i), 3) for i in ids]
    assert [redis_format.redis_key(_entity_key_of("user_id", i), project, 3) for i in ids] == feast_keys
    layout = redis_format.int64_key_layout("user_id", project, 3)
    assert layout is not None
    assert redis_format.int64_redis_keys(layout, np.array(ids, dtype=np.int64)).to_list() == feast_keys


def _entity_key_of(join_key: str, value: int) -> EntityKeyProto:
    return EntityKeyProto(join_keys=[join_key], entity_values=[ValueProto(int64_val=value)])


def test_stored_view_name_is_feasts() -> None:
    view = _ALL_TYPES_VIEW.__copy__()
    view.current_version_number = 3
    for versioning in (False, True):
        config = RepoConfig(
            project=PROJECT, provider="local", entity_key_serialization_version=3,
            registry={"path": "unused-registry.db", "enable_online_feature_view_versioning": versioning},
        )  # fmt: skip
        expected = "all_types_v3" if versioning else "all_types"
        assert redis_format.stored_view_name(view, config) == expected


@pytest.mark.parametrize("value_type", [ValueType.FLOAT_LIST, ValueType.DOUBLE_LIST])
@pytest.mark.parametrize("dim", [1, 2, 15, 16, 64, 127, 128, 300, 2049, 100_000])
def test_vector_prefix_is_protobufs(value_type: ValueType, dim: int) -> None:
    field, dtype = redis_format.VECTOR_VALUE_FIELDS[value_type]
    serialized = ValueProto(**{field: {"val": [0.5] * dim}}).SerializeToString()
    prefix = redis_format.vector_value_prefix(value_type, dim)
    assert serialized == prefix + np.full(dim, 0.5, dtype=dtype).tobytes()


@pytest.mark.parametrize(
    ("value_type", "value", "payload"),
    [
        (ValueType.DOUBLE, 1.5, np.array([1.5], "<f8").tobytes()),
        (ValueType.FLOAT, 1.5, np.array([1.5], "<f4").tobytes()),
        (ValueType.INT64, 5, b"\x05"),
        (ValueType.INT32, 5, b"\x05"),
    ],
)
def test_scalar_tags_are_protobufs(value_type: ValueType, value: float, payload: bytes) -> None:
    field = {**redis_format.FIXED_SCALAR_FIELDS, **redis_format.VARINT_SCALAR_FIELDS}[value_type]
    field = field if isinstance(field, str) else field[0]
    assert ValueProto(**{field: value}).SerializeToString() == redis_format.value_tag(value_type) + payload


def test_timestamp_parts_read_what_encode_timestamps_writes() -> None:
    micros = np.array([0, 1_767_225_600_123_456, 1_767_225_600_123_456, 1], dtype=np.int64)
    stored = redis_format.encode_timestamps(micros).to_list()
    assert [redis_format.timestamp_parts(value) for value in stored] == [
        (us // 1_000_000, us % 1_000_000 * 1000) for us in micros.tolist()
    ]


def _packed(*args: bytes) -> bytes:
    return b"".join(redis.connection.Connection().pack_command(*args))


@pytest.mark.parametrize("fixed_width", [True, False])
def test_resp_commands_are_redis_pys(fixed_width: bool) -> None:
    keys = [b"k%03d" % i for i in range(40)] if fixed_width else [b"k" * (i % 7) + b"\r\n$" for i in range(40)]
    ragged = redis_format.RaggedBytes.from_list(keys)
    assert (ragged.width is not None) == fixed_width
    fields = [b"_ts:view", b"\x00\x01\x02\x03", b""]
    hmget = resp.keyed_commands(resp.command_head(b"HMGET", 1 + len(fields)), ragged, b"".join(map(resp.bulk, fields)))
    assert hmget == b"".join(_packed(b"HMGET", key, *fields) for key in keys)
    assert resp.keyed_commands(b"", ragged, b"") == b"".join(resp.bulk(key) for key in keys)
    assert resp.keyed_commands(b"HEAD", redis_format.RaggedBytes.from_list([]), b"TAIL") == b""
    assert _read_timestamps_command(ragged, b"_ts:view") == _packed(
        b"EVAL", _READ_TIMESTAMPS_SCRIPT, b"%d" % len(keys), *keys, b"_ts:view"
    )


@settings(max_examples=30, deadline=None)
@given(table=random_tables(), ttl=st.sampled_from([None, 3600]))
def test_hset_commands_are_redis_pys(table: pa.Table, ttl: int | None) -> None:
    config = _config({"type": FAST_STORE, "key_ttl_seconds": ttl})
    encoded = encode_rows(config, _ALL_TYPES_VIEW, table, with_commands=True)
    assert encoded.hset_commands is not None
    expected = []
    for key, mapping in encoded.rows():
        command = _packed(b"HSET", key, *[part for item in mapping.items() for part in item])
        if ttl:
            command += _packed(b"EXPIRE", key, str(ttl).encode())
        expected.append(command)
    assert encoded.hset_commands.to_list() == expected


def test_reply_loop_reads_every_reply_and_returns_the_first_error(redis_server: LocalRedisServer) -> None:
    client = _client(redis_server, 6)
    client.flushdb()
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        channel = resp.RespConnection(connection)
        channel.send(_packed(b"SET", b"s", b"1") + _packed(b"HGET", b"s", b"f") + _packed(b"LPUSH", b"s", b"x"))
        channel.send(_packed(b"PING"))
        first, error = channel.read(2)
        assert first[0] == b"OK" and isinstance(error, redis.ResponseError) and "WRONGTYPE" in str(error)
        rest, second_error = channel.read(2)  # the replies left over from the same socket reads
        assert rest[1] == b"PONG" and "WRONGTYPE" in str(second_error)
        assert channel.read(0) == ([], None)
    finally:
        pool.release(connection)
        client.close()


# --------------------------------------------------------------------------------------------
# benchmark smoke test
# --------------------------------------------------------------------------------------------


def test_benchmark_runs_on_a_tiny_table() -> None:
    from bench.materialize_redis import run

    result = run(rows=2000, stock_rows=500, repeats=1)
    for name in ("fast_rows_per_s", "raw_rows_per_s", "stock_rows_per_s", "fast_over_raw", "fast_over_stock"):
        assert result[name] > 0, name
