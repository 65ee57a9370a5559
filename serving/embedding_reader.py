"""Vectorized reads of Feast's Redis online store: embeddings straight into NumPy matrices.

Stock ``get_online_features`` parses every stored ``Value`` into a protobuf object
and every float into a Python ``float``; for 500 candidate Pins x 64-d that is the
whole cost of a ranking request. This reader reads the very same Redis data,
with the codec the writer uses (``derm.feast_plugins.redis_format``, Feast's
format) and the same RESP pieces and reply loop (``derm.feast_plugins.resp``):

* the Redis key of an entity is Feast's ``serialize_entity_key(...) + project``
  (``redis_format.int64_key_layout``: an int64 id's 8 bytes filled into a layout
  cut once from the writer's key encoder and checked against Feast's);
* each feature lives in the hash field ``mmh3("<view>:<feature>")`` and the
  view's event time in ``_ts:<view>`` (``redis_format.feature_field``/``ts_field``);
* one pipelined ``HMGET`` per entity fetches every requested field of every
  view of that entity (all of a Pin's views share one hash), and the replies of
  a whole request are sent and parsed in one round trip with hiredis;
* a fixed-dimension ``Value{float_list_val}`` always starts with the same bytes
  (``redis_format.vector_value_prefix``), so the replies are joined and viewed as
  a ``(B, D)`` float32 matrix after one vectorized check of that prefix; anything
  else (another encoding, a null value, another dimension) falls back to protobuf
  parsing, row by row.

Semantics, matched against ``get_online_features`` by ``tests/test_serving.py``:
an entity (or a field) absent from Redis or holding an empty ``Value`` is *not
found*: its row is zeros and its ``found`` flag is False, where Feast returns
``None``. Feast 0.67 does **not** apply a feature view's TTL when reading Redis
(``_get_features_for_entity`` returns stale values as PRESENT; only
``key_ttl_seconds`` makes Redis itself drop keys). ``enforce_ttl=False`` (the
default) reproduces that exactly; ``enforce_ttl=True`` treats a value older than
its view's TTL at ``now`` as not found, which is what ``get_historical_features``
does offline, so a ranker trained on historical features sees the same
"missing" at serving time. The serving service uses ``enforce_ttl=True``.

Example::

    store = FeatureStore(repo_path="feature_repo")
    reader = EmbeddingReader.for_features(store, ["ctr_pin_emb_v1:ctr_pin_emb", "pin_daily_stats:pin_clicks_7d"])
    features = reader.read({"pin_id": np.array([1, 2, 3])})
    features.columns["ctr_pin_emb_v1:ctr_pin_emb"]   # (3, D) float32, zero rows where not found
    features.found["ctr_pin_emb_v1:ctr_pin_emb"]     # (3,) bool
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import redis
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.value_type import ValueType
from redis.backoff import NoBackoff
from redis.retry import Retry

from derm.feast_plugins import compat, redis_format, resp
from derm.feast_plugins.redis_format import RaggedBytes


class RedisUnavailable(RuntimeError):
    """Redis cannot answer now: down, unreachable, too slow, or answering an error reply.

    ``kind``: ``connection``, ``timeout``, ``error_reply`` (``LOADING``, ``OOM``, ``READONLY``,
    ``NOPERM``... ; the reply's first word is in the message) or ``cooldown`` (failing fast
    after a recent failure). Serving answers all of them 503.
    """

    def __init__(self, message: str, kind: str = "connection"):
        super().__init__(message)
        self.kind = kind


class _Dropped(Exception):
    """A connection reset, closed or broken after the request was written: the request may be sent again."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


# ---------------------------------------------------------------------------------------------
# What to read
# ---------------------------------------------------------------------------------------------

# The Value field and element dtype per type, as the codec defines them (kept under the reader's old names).
_LIST_ELEMENT = redis_format.VECTOR_VALUE_FIELDS
_SCALAR_FIXED = redis_format.FIXED_SCALAR_FIELDS
_SCALAR_VARINT = redis_format.VARINT_SCALAR_FIELDS


@dataclass(frozen=True)
class FeatureSpec:
    """One feature of a view; ``dim`` is the fixed length of a vector feature."""

    name: str
    value_type: ValueType
    dim: int | None = None

    def __post_init__(self) -> None:
        if self.value_type in _LIST_ELEMENT and not self.dim:
            raise ValueError(f"feature {self.name}: a vector feature needs its fixed dimension")


@dataclass(frozen=True)
class ViewSpec:
    """A feature view as stored in Redis: the name its fields are hashed with, its entity and its features."""

    name: str  # the registered name, as in "view:feature" references
    join_key: str
    join_key_type: ValueType
    features: tuple[FeatureSpec, ...]
    ttl: timedelta | None = None
    stored_name: str = ""  # the name fields are hashed with (Feast adds a version when versioning is on)

    @property
    def redis_name(self) -> str:
        return self.stored_name or self.name

    @property
    def ts_field(self) -> bytes:
        return redis_format.ts_field(self.redis_name)

    def field(self, feature: FeatureSpec) -> bytes:
        return redis_format.feature_field(self.redis_name, feature.name)

    def ref(self, feature: FeatureSpec) -> str:
        return f"{self.name}:{feature.name}"

    @classmethod
    def from_feature_view(cls, feature_view: Any, config: Any, features: Sequence[str] | None = None) -> ViewSpec:
        """The spec of a registered view; a vector feature's dimension comes from the view's ``dim`` tag."""
        entity_columns = feature_view.entity_columns
        if len(entity_columns) != 1:
            raise ValueError(f"{feature_view.name}: only single-entity views are supported")
        wanted = list(features) if features else [f.name for f in feature_view.features]
        by_name = {f.name: f for f in feature_view.features}
        unknown = [name for name in wanted if name not in by_name]
        if unknown:
            raise ValueError(f"{feature_view.name} has no feature(s) {unknown}; it has {sorted(by_name)}")
        specs = []
        for name in wanted:
            value_type = by_name[name].dtype.to_value_type()
            dim = int(feature_view.tags["dim"]) if value_type in _LIST_ELEMENT and "dim" in feature_view.tags else None
            specs.append(FeatureSpec(name, value_type, dim))
        ttl = feature_view.ttl if feature_view.ttl and feature_view.ttl.total_seconds() > 0 else None
        return cls(
            name=feature_view.name,
            stored_name=redis_format.stored_view_name(feature_view, config),
            join_key=entity_columns[0].name,
            join_key_type=entity_columns[0].dtype.to_value_type(),
            features=tuple(specs),
            ttl=ttl,
        )


def parse_feature_refs(feature_refs: Sequence[str]) -> dict[str, list[str]]:
    """``["view:feature", ...]`` grouped by view, in first-seen order."""
    grouped: dict[str, list[str]] = {}
    for ref in feature_refs:
        view, sep, feature = ref.partition(":")
        if not sep or not view or not feature:
            raise ValueError(f"feature reference {ref!r}: expected '<feature view>:<feature>'")
        names = grouped.setdefault(view, [])
        if feature not in names:
            names.append(feature)
    return grouped


# ---------------------------------------------------------------------------------------------
# Redis transport: one round trip per request, bounded timeouts, one reconnect on a dropped connection
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisTimeouts:
    """Bounds on one request's Redis work: a dead Redis costs at most ``connect`` (+ ``read``) seconds."""

    connect: float = 0.5
    read: float = 1.0
    # After a failure, fail fast for this long instead of letting every queued request try
    # to connect again (no reconnect storm against a Redis that is restarting).
    cooldown: float = 0.25


class RedisHashReader:
    """Sends prebuilt ``HMGET`` pipelines to a Redis in Feast's connection-string format.

    Plain Redis goes over a pooled redis-py connection with the replies parsed by
    hiredis; Redis Cluster (keys in many slots) goes through redis-py's cluster pipeline.
    Connection failures and timeouts become :class:`RedisUnavailable`.

    A pooled connection can be dead in a way the pool's check on checkout (a non-blocking
    read for a pending close) cannot see: the server died with our request in flight, or a
    forked child of it (``BGSAVE``, AOF rewrite) still holds its sockets after it was killed and
    closes them only later. Such a connection fails only once written to, with a reset, a broken
    pipe or a close. The reads are idempotent (``HMGET`` only), so a request whose connection is
    dropped that way is sent once more on a new connection: a Redis back on its port answers
    it; a Redis really down refuses the connect at once (within ``connect``), so the 503 is as
    quick as before. Timeouts are never retried (they would double the bound). After any
    connection failure the idle pooled connections are dropped too: they reach the same
    server, dead or replaced.
    """

    def __init__(
        self,
        connection_string: str,
        redis_type: str = "redis",
        timeouts: RedisTimeouts | None = None,
        max_connections: int = 64,
    ):
        self.connection_string = connection_string
        self.redis_type = str(getattr(redis_type, "value", redis_type))
        self.timeouts = timeouts or RedisTimeouts()
        nodes, params = compat.parse_redis_connection_string(connection_string)
        if not nodes:
            raise ValueError(f"Redis connection string {connection_string!r} names no host:port")
        params.update(
            socket_timeout=self.timeouts.read,
            socket_connect_timeout=self.timeouts.connect,
            retry=Retry(NoBackoff(), 0),
        )
        # The plain client (PING, the pipeline path) retries a dropped connection once, as execute_packed
        # does; redis-py's TimeoutError is not a ConnectionError, so timeouts are not retried.
        plain_params = {**params, "retry": Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))}
        self._failed_at = 0.0
        self._last_error = ""
        self._lock = threading.Lock()
        if self.redis_type == "redis_cluster":
            from redis.cluster import ClusterNode, RedisCluster

            self.client: Any = RedisCluster(
                startup_nodes=[ClusterNode(n["host"], int(n["port"])) for n in nodes], **params
            )
            self._pool = None
        elif self.redis_type == "redis":
            self.client = redis.Redis(
                host=nodes[0]["host"], port=int(nodes[0]["port"]), max_connections=max_connections, **plain_params
            )
            self._pool = self.client.connection_pool
        else:
            raise ValueError(f"redis_type {self.redis_type!r} is not supported by the serving reader")

    @property
    def raw_socket(self) -> bool:
        return self._pool is not None and resp.HIREDIS

    def _unavailable(self, error: BaseException) -> RedisUnavailable:
        with self._lock:
            self._failed_at = time.monotonic()
            self._last_error = f"{type(error).__name__}: {error}"
        if isinstance(error, redis.TimeoutError | TimeoutError):
            kind = "timeout"
        elif isinstance(error, redis.ResponseError) or type(error) is redis.exceptions.BusyLoadingError:
            kind = "error_reply"
        else:
            kind = "connection"
        return RedisUnavailable(f"Redis at {self._where()} is unavailable ({self._last_error})", kind)

    def _where(self) -> str:
        return self.connection_string.split(",", 1)[0]

    def _check_cooldown(self) -> None:
        with self._lock:
            failed_at, last_error = self._failed_at, self._last_error
        if failed_at and time.monotonic() - failed_at < self.timeouts.cooldown:
            raise RedisUnavailable(
                f"Redis at {self._where()} is unavailable ({last_error}; retrying shortly)", "cooldown"
            )

    def execute_packed(self, payload: bytes, replies: int) -> list[Any]:
        """Send RESP ``payload`` (``replies`` commands) and return their replies in order.

        Raises:
            RedisUnavailable: no connection, a timeout, a connection dropped twice, or an error reply.
        """
        self._check_cooldown()
        assert self._pool is not None and resp.HIREDIS
        try:
            try:
                received, reply_error = self._round_trip(payload, replies)
            except _Dropped:
                # Dropped after we wrote to it (see the class docstring): reconnect once and resend.
                self._pool.disconnect(inuse_connections=False)
                received, reply_error = self._round_trip(payload, replies)
        except _Dropped as dropped:
            self._pool.disconnect(inuse_connections=False)
            raise self._unavailable(dropped.error) from dropped.error
        except (redis.ConnectionError, redis.TimeoutError, OSError) as error:
            self._pool.disconnect(inuse_connections=False)
            raise self._unavailable(error) from error
        if reply_error is not None:
            # Every reply was read, so the connection is in step and went back to the pool. An error
            # reply (LOADING after a restart, OOM, READONLY after a failover, NOPERM, ...) says this
            # Redis cannot answer now: a 503 with the reply, not a server error.
            raise self._unavailable(reply_error) from reply_error
        return received

    def _round_trip(self, payload: bytes, replies: int) -> tuple[list[Any], Exception | None]:
        """One pooled connection: send, read every reply, give the connection back (disconnected on failure).

        Raises:
            _Dropped: the connection was reset, closed or broken once written to (worth one retry).
            redis.ConnectionError, redis.TimeoutError, OSError: no connection, or a timeout.
        """
        assert self._pool is not None
        connection = self._pool.get_connection()  # connect errors propagate: nothing to retry on a down server
        try:
            channel = resp.RespConnection(connection)
            channel.send(payload)
            received, reply_error = channel.read(replies)
        except BaseException as error:
            # Replies may be left unread: never reuse this connection.
            connection.disconnect()
            self._pool.release(connection)
            # socket.timeout is an OSError (and a TimeoutError): a Redis that accepts but never answers.
            timed_out = isinstance(error, redis.TimeoutError | TimeoutError)
            if not timed_out and isinstance(error, redis.ConnectionError | ConnectionError | BrokenPipeError):
                raise _Dropped(error) from error
            raise
        self._pool.release(connection)
        return received, reply_error

    def hmget_pipeline(self, commands: Sequence[tuple[bytes, Sequence[bytes]]]) -> list[list[bytes | None]]:
        """The redis-py path (Redis Cluster, or no hiredis): one HMGET per key in one pipeline."""
        self._check_cooldown()
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for key, fields in commands:
                    pipe.hmget(key, list(fields))
                return pipe.execute()
        except (redis.RedisError, OSError) as error:  # error replies included, as in execute_packed
            raise self._unavailable(error) from error

    def ping(self) -> bool:
        try:
            self._check_cooldown()
            return bool(self.client.ping())
        except (RedisUnavailable, redis.RedisError, OSError):
            return False

    def close(self) -> None:
        self.client.close()


# ---------------------------------------------------------------------------------------------
# Decoding Value bytes into NumPy
# ---------------------------------------------------------------------------------------------


def _as_bytes_list(values: Sequence[bytes | None]) -> tuple[Sequence[bytes], np.ndarray]:
    raw = values if None not in values else [value or b"" for value in values]  # the scan runs in C
    return raw, np.fromiter(map(len, raw), dtype=np.int64, count=len(raw))  # type: ignore[arg-type]


def _fixed_width_rows(raw: list[bytes], lengths: np.ndarray, prefix: bytes, payload: int) -> tuple[np.ndarray, Any]:
    """Rows that are exactly ``prefix + payload bytes``: (their indices, their payloads as a uint8 matrix)."""
    width = len(prefix) + payload
    candidates = lengths == width
    if not candidates.any():
        return np.empty(0, np.int64), np.empty((0, payload), np.uint8)
    rows = np.flatnonzero(candidates)
    joined = b"".join(raw) if len(rows) == len(raw) else b"".join([raw[i] for i in rows.tolist()])
    block = np.frombuffer(joined, dtype=np.uint8).reshape(len(rows), width)
    if prefix:
        matches = (block[:, : len(prefix)] == np.frombuffer(prefix, np.uint8)).all(axis=1)
        rows, block = rows[matches], block[matches]
    return rows, block[:, len(prefix) :]


def _proto_value(raw: bytes) -> tuple[str | None, Any]:
    value = ValueProto.FromString(raw)
    kind = value.WhichOneof("val")
    return kind, getattr(value, kind) if kind else None


@dataclass
class DecodeStats:
    """How many values took the protobuf fallback, and how many could not be used at all."""

    fallback: int = 0
    unusable: int = 0


vector_prefix = redis_format.vector_value_prefix  # the bytes every stored Value of a dim-long vector starts with


def decode_vectors(
    values: Sequence[bytes | None], value_type: ValueType, dim: int, stats: DecodeStats | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Stored ``Value`` bytes of a vector feature -> ((n, dim) matrix, found mask); missing rows are zeros."""
    kind, dtype = _LIST_ELEMENT[value_type]
    prefix = vector_prefix(value_type, dim)
    if values and None not in values:
        # Common case, every entity stored with the same encoding: one join, one check, one copy.
        joined = b"".join(values)  # type: ignore[arg-type]
        width = len(prefix) + dim * np.dtype(dtype).itemsize
        if len(joined) == width * len(values):
            block = np.frombuffer(joined, dtype=np.uint8).reshape(len(values), width)
            if (block[:, : len(prefix)] == np.frombuffer(prefix, np.uint8)).all():
                matrix = block[:, len(prefix) :].copy().view(dtype)
                native = matrix.astype(np.dtype(dtype).newbyteorder("="), copy=False)  # no-op on little-endian
                return native, np.ones(len(values), dtype=bool)
    raw, lengths = _as_bytes_list(values)
    out = np.zeros((len(raw), dim), dtype=np.dtype(dtype).newbyteorder("="))
    found = np.zeros(len(raw), dtype=bool)
    rows, payload = _fixed_width_rows(raw, lengths, prefix, dim * np.dtype(dtype).itemsize)
    if len(rows):
        out[rows] = np.ascontiguousarray(payload).view(dtype).reshape(len(rows), dim)
        found[rows] = True
    leftover = np.flatnonzero((lengths > 0) & ~found)
    for i in leftover.tolist():
        value_kind, value = _proto_value(raw[i])
        if stats is not None:
            stats.fallback += 1
        if value_kind == kind and len(value.val) == dim:
            out[i] = value.val
            found[i] = True
        elif value_kind is not None and stats is not None:
            stats.unusable += 1  # another type or dimension: the model cannot use it, so "missing"
    return out, found


def decode_scalars(
    values: Sequence[bytes | None], value_type: ValueType, stats: DecodeStats | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Stored ``Value`` bytes of a scalar feature -> (int64 or float64 column, found mask); missing rows are 0."""
    raw, lengths = _as_bytes_list(values)
    n = len(raw)
    found = np.zeros(n, dtype=bool)
    if value_type in _SCALAR_FIXED:
        kind, dtype = _SCALAR_FIXED[value_type]
        out: np.ndarray = np.zeros(n, dtype=np.float64)
        prefix = redis_format.value_tag(value_type)
        rows, payload = _fixed_width_rows(raw, lengths, prefix, np.dtype(dtype).itemsize)
        if len(rows):
            out[rows] = np.ascontiguousarray(payload).view(dtype).reshape(-1)
            found[rows] = True
    elif value_type in _SCALAR_VARINT:
        kind = _SCALAR_VARINT[value_type]
        out = np.zeros(n, dtype=np.int64)
        tag = redis_format.value_tag(value_type)
        candidates = (lengths >= len(tag) + 1) & (lengths <= len(tag) + 10)
        if candidates.any():
            rows = np.flatnonzero(candidates)
            decoded, ok = _decode_varints(raw if len(rows) == n else [raw[i] for i in rows.tolist()], tag)
            out[rows[ok]] = decoded[ok]
            found[rows[ok]] = True
    else:
        kind, out = None, np.empty(n, dtype=object)
    leftover = np.flatnonzero((lengths > 0) & ~found)
    for i in leftover.tolist():
        value_kind, value = _proto_value(raw[i])
        if stats is not None:
            stats.fallback += 1
        if value_kind is not None and (kind is None or value_kind == kind):
            out[i] = value
            found[i] = True
        elif value_kind is not None and stats is not None:
            stats.unusable += 1
    return out, found


def _decode_varints(raw: list[bytes], tag: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``tag + varint`` byte strings -> (int64 values, well-formed mask), all rows at once."""
    lengths = np.fromiter(map(len, raw), dtype=np.int64, count=len(raw))
    data = np.frombuffer(b"".join(raw), dtype=np.uint8)
    width = 11 + len(tag)
    padded = np.zeros((len(raw), width), dtype=np.uint8)
    starts = np.zeros(len(raw), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    row = np.repeat(np.arange(len(raw)), lengths)
    padded[row, np.arange(len(data)) - starts[row]] = data
    body_len = lengths - len(tag)
    groups = padded[:, len(tag) : len(tag) + 10].astype(np.uint64)
    position = np.arange(10)
    inside = position[None, :] < body_len[:, None]
    last = padded[np.arange(len(raw)), len(tag) + body_len - 1]
    continuation = (groups & np.uint64(0x80)) != 0
    ok = (
        (padded[:, : len(tag)] == np.frombuffer(tag, np.uint8)).all(axis=1)
        & (last < 0x80)  # the final byte ends the varint ...
        & (continuation | ~inside | (position[None, :] == (body_len - 1)[:, None])).all(axis=1)  # ... and only it
    )
    shifts = (position * 7).astype(np.uint64)
    values = (((groups & np.uint64(0x7F)) << shifts) * inside).sum(axis=1, dtype=np.uint64)
    return values.view(np.int64), ok


class _TimestampCache:
    """``_ts`` bytes -> epoch seconds; a day's snapshot shares one event time, so parsing is rare."""

    def __init__(self, limit: int = 4096):
        self._seconds: dict[bytes, float] = {}
        self._limit = limit

    def seconds(self, values: Sequence[bytes | None]) -> np.ndarray:
        if values and values[0] and values.count(values[0]) == len(values):  # one snapshot's time: C-level scan
            first = self._seconds.get(values[0])
            if first is not None:
                return np.full(len(values), first)
        cache = self._seconds
        local = {}
        for value in set(values):
            if value:
                seconds = cache.get(value)
                if seconds is None:
                    whole, nanos = redis_format.timestamp_parts(value)
                    seconds = whole + nanos / 1e9
                local[value] = seconds
        if len(cache) + len(local) > self._limit:
            cache.clear()  # bounded memory; entries are cheap to parse again
        cache.update(local)
        out = np.full(len(values), np.nan)
        if len(local) <= 16:
            # Usually one distinct event time per view: compare in C instead of a lookup per row.
            as_objects = np.array(values, dtype=object)
            for value, seconds in local.items():
                out[as_objects == value] = seconds
            return out
        lookup = local.get
        nan = float("nan")
        return np.array([lookup(value, nan) if value else nan for value in values], dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# The reader
# ---------------------------------------------------------------------------------------------


@dataclass
class OnlineFeatures:
    """What one read returned, column-wise; row ``i`` of an entity's columns is its ``i``-th id.

    Keyed by ``"view:feature"`` reference (two versions of a family share a feature name):
    ``columns``: values (vectors ``(n, D)`` float32, integers int64, floats float64; zeros
    where not found). ``found``: bool masks. ``event_seconds``: view name -> event time of
    the stored row (NaN when absent). ``expired``: view name -> rows treated as not found
    because they were older than the view's TTL (``enforce_ttl``).
    """

    columns: dict[str, np.ndarray] = field(default_factory=dict)
    found: dict[str, np.ndarray] = field(default_factory=dict)
    event_seconds: dict[str, np.ndarray] = field(default_factory=dict)
    expired: dict[str, np.ndarray] = field(default_factory=dict)
    stats: DecodeStats = field(default_factory=DecodeStats)

    def by_feature_name(self, refs: Sequence[str] | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(columns, found) keyed by bare feature name, as ``get_online_features(...).to_dict()`` names them."""
        refs = list(self.columns) if refs is None else refs
        names = [ref.partition(":")[2] for ref in refs]
        if len(set(names)) != len(names):
            raise ValueError(f"feature names collide between {refs}: pick one version per family")
        return (
            {name: self.columns[ref] for name, ref in zip(names, refs, strict=True)},
            {name: self.found[ref] for name, ref in zip(names, refs, strict=True)},
        )


@dataclass(frozen=True)
class _EntityPlan:
    join_key: str
    join_key_type: ValueType
    views: tuple[ViewSpec, ...]
    fields: tuple[bytes, ...]  # every view's feature fields then its _ts field, views in order
    fields_resp: bytes  # the same fields as RESP bulk strings, appended to every HMGET
    hmget_head: bytes  # ``*<n>\r\n$5\r\nHMGET\r\n``: what every HMGET starts with, before its key


class EmbeddingReader:
    """Reads the given views (embedding or scalar features) of many entities in one Redis round trip.

    Args:
        views: what to read; views of the same entity are read with one HMGET per entity.
        redis_reader: the transport (connection string, timeouts).
        project: Feast project (the Redis key suffix).
        entity_key_serialization_version: as in ``feature_store.yaml``.
        enforce_ttl: treat values older than their view's TTL as not found (see module docstring).
    """

    def __init__(
        self,
        views: Sequence[ViewSpec],
        redis_reader: RedisHashReader,
        project: str,
        entity_key_serialization_version: int = 3,
        enforce_ttl: bool = False,
    ):
        self.views = tuple(views)
        self.redis = redis_reader
        self.project = project
        self.serialization_version = entity_key_serialization_version
        self.enforce_ttl = enforce_ttl
        self._timestamps = _TimestampCache()
        grouped: dict[str, list[ViewSpec]] = {}
        for view in self.views:
            grouped.setdefault(view.join_key, []).append(view)
        self.plans: dict[str, _EntityPlan] = {}
        for join_key, views_of_entity in grouped.items():
            fields = tuple(f for view in views_of_entity for f in (*map(view.field, view.features), view.ts_field))
            self.plans[join_key] = _EntityPlan(
                join_key=join_key,
                join_key_type=views_of_entity[0].join_key_type,
                views=tuple(views_of_entity),
                fields=fields,
                fields_resp=b"".join(map(resp.bulk, fields)),
                hmget_head=resp.command_head(b"HMGET", 1 + len(fields)),
            )
        self._key_layouts = {
            join_key: redis_format.int64_key_layout(join_key, self.project, self.serialization_version)
            for join_key, plan in self.plans.items()
            if plan.join_key_type == ValueType.INT64
        }

    @classmethod
    def for_features(
        cls,
        store: Any,
        feature_refs: Sequence[str],
        redis_reader: RedisHashReader | None = None,
        enforce_ttl: bool = False,
    ) -> EmbeddingReader:
        """A reader of ``"view:feature"`` references, with views and Redis settings from a ``FeatureStore``."""
        views = [
            ViewSpec.from_feature_view(store.get_feature_view(view), store.config, features)
            for view, features in parse_feature_refs(feature_refs).items()
        ]
        return cls(
            views,
            redis_reader or redis_reader_for(store),
            project=store.config.project,
            entity_key_serialization_version=store.config.entity_key_serialization_version,
            enforce_ttl=enforce_ttl,
        )

    @property
    def join_keys(self) -> list[str]:
        return list(self.plans)

    def redis_keys(self, join_key: str, ids: np.ndarray | Sequence[Any]) -> RaggedBytes:
        """Feast's Redis keys of these entity ids.

        An int64 key is ``<constant head> + <8 little-endian bytes> + <project>``; the head and
        tail are cut once from a key the codec's encoder built (``redis_format.int64_key_layout``,
        checked against Feast's ``serialize_entity_key``), then every request fills in ids
        with one NumPy assignment. Other key types go through the codec's encoder.
        """
        plan = self.plans[join_key]
        layout = self._key_layouts.get(join_key) if plan.join_key_type == ValueType.INT64 else None
        if layout is None:
            arrow_type = pa.int64() if plan.join_key_type == ValueType.INT64 else None
            batch = pa.record_batch({join_key: pa.array(ids, type=arrow_type)})
            return redis_format.encode_entity_keys(
                batch, {join_key: plan.join_key_type}, self.project, self.serialization_version
            )
        return redis_format.int64_redis_keys(layout, ids)

    def hmget_payload(self, join_key: str, keys: RaggedBytes) -> bytes:
        """RESP for ``HMGET <key> <fields...>`` of every key, built with NumPy in one piece."""
        plan = self.plans[join_key]
        return resp.keyed_commands(plan.hmget_head, keys, plan.fields_resp)

    def read(
        self,
        entities: Mapping[str, np.ndarray | Sequence[Any]],
        now: datetime | float | None = None,
    ) -> OnlineFeatures:
        """Read every view for the given ids of each entity (``{"user_id": [...], "pin_id": [...]}``).

        Raises:
            RedisUnavailable: Redis did not answer within the configured timeouts.
            KeyError: an entity the reader has no view of.
        """
        order = [join_key for join_key in self.plans if join_key in entities]
        unknown = set(entities) - set(self.plans)
        if unknown:
            raise KeyError(f"no view of entity {sorted(unknown)} is read by this reader (has {self.join_keys})")
        keys = {join_key: self.redis_keys(join_key, entities[join_key]) for join_key in order}
        replies = self._fetch(order, keys)
        now_seconds = _epoch_seconds(now)
        result = OnlineFeatures()
        offset = 0
        for join_key in order:
            plan = self.plans[join_key]
            count = len(keys[join_key])
            rows = replies[offset : offset + count]
            offset += count
            columns = list(zip(*rows, strict=True)) if rows else [()] * len(plan.fields)
            self._decode_entity(plan, columns, count, now_seconds, result)
        return result

    def _fetch(self, order: list[str], keys: dict[str, RaggedBytes]) -> list[list[bytes | None]]:
        total = sum(len(keys[join_key]) for join_key in order)
        if total == 0:
            return []
        if self.redis.raw_socket:
            payload = b"".join(self.hmget_payload(join_key, keys[join_key]) for join_key in order)
            return self.redis.execute_packed(payload, total)
        commands = [(key, self.plans[join_key].fields) for join_key in order for key in keys[join_key].to_list()]
        return self.redis.hmget_pipeline(commands)

    def _decode_entity(
        self, plan: _EntityPlan, columns: list[Sequence[bytes | None]], count: int, now: float, result: OnlineFeatures
    ) -> None:
        position = 0
        # Scalars of one type are decoded together, every view of the entity in one call: a ranker reads
        # ~16 counting/attribute columns, and NumPy's per-call overhead, not the bytes, was their cost.
        scalars: dict[ValueType, list[tuple[ViewSpec, FeatureSpec, Sequence[bytes | None]]]] = {}
        expired_of: dict[str, np.ndarray] = {}
        for view in plan.views:
            ts_column = columns[position + len(view.features)]
            seconds = self._timestamps.seconds(ts_column) if count else np.empty(0)
            expired = np.zeros(count, dtype=bool)
            if self.enforce_ttl and view.ttl is not None:
                # Offline retrieval keeps a row while entity_time - event_time <= ttl; so does this.
                expired = ~np.isnan(seconds) & (now - seconds > view.ttl.total_seconds())
            result.event_seconds[view.name] = seconds
            result.expired[view.name] = expired_of[view.name] = expired
            for feature in view.features:
                stored = columns[position]
                position += 1
                if feature.value_type in _LIST_ELEMENT:
                    assert feature.dim is not None
                    values, found = decode_vectors(stored, feature.value_type, feature.dim, result.stats)
                    self._store(result, view, feature, values, found, expired)
                else:
                    scalars.setdefault(feature.value_type, []).append((view, feature, stored))
            position += 1  # the _ts field
        for value_type, stored_columns in scalars.items():
            joined = [value for _, _, stored in stored_columns for value in stored]
            values, found = decode_scalars(joined, value_type, result.stats)
            for i, (view, feature, _) in enumerate(stored_columns):
                rows = slice(i * count, (i + 1) * count)
                self._store(result, view, feature, values[rows], found[rows], expired_of[view.name])

    @staticmethod
    def _store(
        result: OnlineFeatures,
        view: ViewSpec,
        feature: FeatureSpec,
        values: np.ndarray,
        found: np.ndarray,
        expired: np.ndarray,
    ) -> None:
        if expired.any():
            found &= ~expired
            values[expired] = 0 if values.dtype != object else None
        result.columns[view.ref(feature)] = values
        result.found[view.ref(feature)] = found


def _epoch_seconds(now: datetime | float | None) -> float:
    if now is None:
        return time.time()
    if isinstance(now, datetime):
        return now.timestamp()
    return float(now)


def redis_reader_for(store: Any, timeouts: RedisTimeouts | None = None) -> RedisHashReader:
    """A transport to the online store configured in a ``FeatureStore``'s ``feature_store.yaml``."""
    online = store.config.online_store
    return RedisHashReader(online.connection_string, online.redis_type, timeouts)
