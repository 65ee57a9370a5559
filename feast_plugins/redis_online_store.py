"""Feast's Redis online store with a vectorized, pipelined writer for Arrow data.

Stock materialization turns every row into ``EntityKey``/``Value`` protobuf
objects in Python (``_convert_arrow_to_proto``) before ``online_write_batch``
serializes them again; for embedding tables that is the whole cost. This store
writes the very same bytes (Feast's Redis format: one hash per entity key,
``_ts:<view>`` plus one mmh3-named field per feature) straight from Arrow
columns with NumPy, builds the Redis commands (RESP) for a whole chunk at once,
and overlaps encoding chunk i+1 with writing chunk i on one writer thread.

Configured in ``feature_store.yaml``::

    online_store:
      type: derm.feast_plugins.redis_online_store.FastRedisOnlineStore
      connection_string: localhost:6379
      write_batch_rows: 5000      # rows per pipelined round trip
      max_pending_batches: 2      # encoded chunks waiting for the writer (bounds memory)

Reads, ``update`` and ``teardown`` are inherited unchanged, so everything
stock Feast can read, it reads from here. The format itself (keys, field names,
``Value``/``Timestamp`` bytes) is :mod:`derm.feast_plugins.redis_format`, shared with
the serving reader; the RESP pieces and the hiredis reply loop are
:mod:`derm.feast_plugins.resp`. Format notes (checked against Feast 0.67): a null
or NaN scalar is written as an empty ``Value`` (zero bytes), the field is still
set; an empty vector is ``float_list_val`` with no elements; a null element inside
a vector becomes NaN; when no value of a Bytes column in the batch Feast converts
is a non-empty ``bytes``, every row of it is written as null (Feast's type
inference finds no sample). The stored ``_ts`` has microsecond precision (Feast
goes through ``datetime``). Dedup is stock ``online_write_batch``'s: a row is
skipped when its event time is not newer than the stored ``_ts``.

Known differences: an Int64 column that contains nulls goes through float64 in
stock Feast, so integers beyond 2**53 lose precision there; here they are written
exactly. Feast applies the Bytes rule above per write batch (the whole window, or
``online_write_batch_size`` rows); a streamed write applies it per record batch.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from feast import FeatureView, RepoConfig
from feast.infra.online_stores.redis import RedisOnlineStore, RedisOnlineStoreConfig
from feast.value_type import ValueType
from pydantic import NonNegativeInt, PositiveFloat, PositiveInt
from redis import Redis
from redis.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from derm.feast_plugins import compat, resp
from derm.feast_plugins.redis_format import (
    RaggedBytes,
    concat_rows,
    encode_entity_keys,
    encode_timestamps,
    encode_values,
    event_time_micros,
    feature_field,
    key_slots,
    stored_view_name,
    timestamp_parts,
    ts_field,
)


class FastRedisOnlineStoreConfig(RedisOnlineStoreConfig):
    """Stock Redis settings plus the knobs of the Arrow writer."""

    type: Literal[
        "derm.feast_plugins.redis_online_store.FastRedisOnlineStore",
        "materialization.fast_redis.FastRedisOnlineStore",  # 0.1 path, kept by a shim until 0.3
    ] = (  # type: ignore[assignment]
        "derm.feast_plugins.redis_online_store.FastRedisOnlineStore"
    )
    write_batch_rows: PositiveInt = 5000
    """Rows per pipelined round trip (one HMGET pass for dedup, one HSET pass)."""
    max_pending_batches: PositiveInt = 2
    """Encoded chunks queued for the writer thread; bounds memory to a few chunks."""
    replica_acks: NonNegativeInt = 0
    """Redis Cluster: replicas that must acknowledge each master's writes (``WAIT``) before a chunk counts as
    written (at most the replicas the master has). 1 makes a written row survive its master's crash: the writer
    sends the chunk again when fewer replicas answer. 0 is stock Feast's asynchronous replication."""
    cluster_retry_seconds: PositiveFloat = 30.0
    """Redis Cluster: how long the writer keeps retrying a chunk (node down, failover, slots moved) before it
    raises; a failover takes about ``cluster-node-timeout`` plus an election."""


# ---------------------------------------------------------------------------------------------
# Encoded chunks and the RESP commands that write them.
# ---------------------------------------------------------------------------------------------


def _bulk_constant(value: bytes, rows: int) -> RaggedBytes:
    return RaggedBytes.constant(resp.bulk(value), rows)


# Reads every key's stored _ts in one command: one reply to parse instead of one per row.
_READ_TIMESTAMPS_SCRIPT = (
    b"local stored = {} for i, key in ipairs(KEYS) do stored[i] = redis.call('HGET', key, ARGV[1]) end return stored"
)


def _read_timestamps_command(keys: RaggedBytes, timestamp_field: bytes) -> bytes:
    """RESP of ``EVAL <script> n key_1 .. key_n _ts:<view>`` (an HGET per key, run server side)."""
    rows = len(keys)
    head = resp.command_head(b"EVAL", rows + 3) + resp.bulk(_READ_TIMESTAMPS_SCRIPT) + resp.bulk(b"%d" % rows)
    return head + resp.keyed_commands(b"", keys, b"") + resp.bulk(timestamp_field)


@dataclass
class EncodedRows:
    """One chunk of a feature view's rows in Feast's Redis format, ready to write.

    ``fields[0]`` is the ``_ts:<view>`` field; the others are the mmh3 feature fields,
    in the feature view's order (the order stock Feast puts them in its HSET).
    """

    keys: RaggedBytes
    fields: list[bytes]
    values: list[RaggedBytes]
    event_nanos: np.ndarray
    has_duplicate_keys: bool
    hset_commands: RaggedBytes | None = None  # HSET (+ EXPIRE) per row, when writing over a raw socket
    read_timestamps_command: bytes | None = None  # one EVAL reading every row's _ts, when dedup needs them

    def __len__(self) -> int:
        return len(self.keys)

    def rows(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """(redis key, {field: value}) per row: what a stock HSET of this row sets."""
        columns = [values.to_list() for values in self.values]
        return [
            (key, dict(zip(self.fields, row, strict=True)))
            for key, row in zip(self.keys.to_list(), zip(*columns, strict=True), strict=True)
        ]


def _has_duplicates(keys: RaggedBytes) -> bool:
    if len(keys) < 2:
        return False
    if keys.width is not None and keys.width > 0:
        as_void = keys.matrix().view(np.dtype((np.void, keys.width))).reshape(-1)
        return len(np.unique(as_void)) < len(keys)
    return len(set(keys.to_list())) < len(keys)


def encode_rows(
    config: RepoConfig,
    feature_view: FeatureView,
    batch: pa.RecordBatch | pa.Table,
    *,
    with_commands: bool = False,
    empty_bytes_features: frozenset[str] | None = None,
    keys_are_unique: bool = False,
) -> EncodedRows:
    """Encode a batch of (renamed, i.e. feature-view-named) offline rows the way stock materialization does.

    Args:
        config: the repo config (project, entity key serialization version, online store settings).
        feature_view: the view the rows belong to; its features and entity columns pick the columns.
        batch: rows with the join keys, every feature and the batch source's timestamp column.
        with_commands: also build the RESP HSET/HMGET commands for the raw-socket writer.
        empty_bytes_features: when this batch is a chunk of a larger one, the Bytes features
            with no non-empty value in the larger batch (see :func:`encode_values`).
        keys_are_unique: the caller guarantees one row per entity (skips the duplicate check).
    """
    if isinstance(batch, pa.Table):
        batch = (
            batch.combine_chunks().to_batches()[0]
            if batch.num_rows
            else pa.RecordBatch.from_pylist([], schema=batch.schema)
        )
    compat.validate_vector_field_lengths(batch, feature_view)
    if feature_view.batch_source is None:
        raise ValueError(f"Feature view '{feature_view.name}' has no batch_source and cannot be converted to proto.")
    join_keys = {field.name: field.dtype.to_value_type() for field in feature_view.entity_columns}
    for name in [field.name for field in feature_view.features] + list(join_keys):
        if name not in batch.schema.names:
            raise ValueError(f"Column {name} not found in table")

    view_name = stored_view_name(feature_view, config)
    keys = encode_entity_keys(batch, join_keys, config.project, config.entity_key_serialization_version)
    micros = event_time_micros(batch.column(feature_view.batch_source.timestamp_field))
    fields = [ts_field(view_name)] + [feature_field(view_name, field.name) for field in feature_view.features]
    values = [encode_timestamps(micros)] + [
        encode_values(
            batch.column(field.name),
            field.dtype.to_value_type(),
            None if empty_bytes_features is None else field.name in empty_bytes_features,
        )
        for field in feature_view.features
    ]
    encoded = EncodedRows(keys, fields, values, micros * 1000, not keys_are_unique and _has_duplicates(keys))
    if with_commands:
        store_config = config.online_store
        rows = len(keys)
        hset = [RaggedBytes.constant(resp.command_head(b"HSET", 1 + 2 * len(fields)), rows), *resp.bulk_rows(keys)]
        for field, column in zip(fields, values, strict=True):
            hset += [_bulk_constant(field, rows), *resp.bulk_rows(column)]
        if store_config.key_ttl_seconds:
            hset += [
                RaggedBytes.constant(resp.command_head(b"EXPIRE", 2), rows),
                *resp.bulk_rows(keys),
                _bulk_constant(str(store_config.key_ttl_seconds).encode(), rows),
            ]
        encoded.hset_commands = concat_rows(hset)
        if not store_config.skip_dedup:
            encoded.read_timestamps_command = _read_timestamps_command(keys, fields[0])
    return encoded


# ---------------------------------------------------------------------------------------------
# Dedup (stock online_write_batch semantics) and the two writers.
# ---------------------------------------------------------------------------------------------


def _stored_nanos(stored: Sequence[bytes | None]) -> np.ndarray:
    out = np.zeros(len(stored), dtype=np.int64)
    if not any(stored):
        return out  # nothing stored yet (a first load): no per-row work
    cache: dict[bytes, int] = {}
    for i, value in enumerate(stored):
        if not value:
            continue
        nanos = cache.get(value)
        if nanos is None:
            seconds, nanos_part = timestamp_parts(value)
            nanos = cache[value] = seconds * 1_000_000_000 + nanos_part
        out[i] = nanos
    return out


def rows_to_write(encoded: EncodedRows, stored: Sequence[bytes | None]) -> np.ndarray:
    """Indices of the rows stock ``online_write_batch`` would write, given the stored ``_ts`` values.

    A row is skipped when its event time is not newer than the stored one or than an
    earlier row of the same key in this batch (``max(stored, batch latest, 0)`` as in Feast).
    """
    previous = _stored_nanos(stored)
    new = encoded.event_nanos
    if not encoded.has_duplicate_keys:
        latest = np.maximum(previous, 0)
        return np.flatnonzero((latest == 0) | (new > latest))
    # Same key more than once in the chunk: replay Feast's loop exactly (rare; never from the engine).
    batch_latest: dict[bytes, int] = {}
    keep = []
    for i, (key, stored_nanos, new_nanos) in enumerate(
        zip(encoded.keys.to_list(), previous.tolist(), new.tolist(), strict=True)
    ):
        latest = max(stored_nanos, batch_latest.get(key, 0))
        if latest and new_nanos <= latest:
            continue
        batch_latest[key] = new_nanos
        keep.append(i)
    return np.asarray(keep, dtype=np.int64)


class _SocketWriter:
    """Sends whole chunks of prebuilt RESP over one pooled connection (:class:`resp.RespConnection`).

    The HSET replies of a chunk are only read once the next chunk's commands are on their
    way, so Redis always has queued work instead of idling while Python encodes and parses.
    Commands on one connection run in order, so the next chunk's _ts read still sees this
    chunk's writes.
    """

    def __init__(self, client: Redis, store_config: RedisOnlineStoreConfig):
        self.pool = client.connection_pool
        self.store_config = store_config
        self.connection = self.pool.get_connection()
        self.channel = resp.RespConnection(self.connection)
        self.unread_replies = 0  # replies of commands already sent, not read yet
        self.error: ResponseError | None = None

    def _send(self, payload: bytes, replies: int) -> None:
        self.channel.send(payload)
        self.unread_replies += replies

    def _read(self, replies: int) -> list[Any]:
        """Read the next ``replies`` replies; error replies are kept and raised once all are read."""
        received, error = self.channel.read(replies)
        self.unread_replies -= replies
        if error is not None and self.error is None:
            self.error = error
        return received

    def _raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def write(self, encoded: EncodedRows) -> int:
        assert encoded.hset_commands is not None
        commands = encoded.hset_commands
        if self.store_config.skip_dedup:
            self._send(commands.data.tobytes(), len(commands) * self._replies_per_row())
            # Previous chunk's HSET replies, read while Redis works on this chunk (all but this chunk's).
            self._read(self.unread_replies - len(commands) * self._replies_per_row())
            self._raise_error()
            return len(commands)
        assert encoded.read_timestamps_command is not None
        self._send(encoded.read_timestamps_command, 1)
        stored = self._read(self.unread_replies)[-1]  # previous chunk's HSET replies come first
        self._raise_error()
        selected = rows_to_write(encoded, stored)
        if len(selected) < len(encoded):
            commands = commands.take(selected)
        if len(commands):
            self._send(commands.data.tobytes(), len(commands) * self._replies_per_row())
        return len(commands)

    def _replies_per_row(self) -> int:
        return 2 if self.store_config.key_ttl_seconds else 1

    def finish(self) -> None:
        """Read the replies still outstanding and raise the first error reply, if any."""
        self._read(self.unread_replies)
        self._raise_error()

    def close(self) -> None:
        if self.unread_replies:
            # Replies left unread (an error on the way): never hand this connection back in that state.
            self.connection.disconnect()
        self.pool.release(self.connection)


# A node down, a failover under way, a slot table that cannot be loaded for a moment: worth another try.
_RETRYABLE = (RedisConnectionError, RedisTimeoutError, RedisClusterException, OSError)


class _Redirected(Exception):
    """A reply said a slot lives elsewhere (``MOVED``), is migrating (``ASK``) or is unserved for now."""

    def __init__(self, message: str):
        super().__init__(message)
        self.asking = message.startswith("ASK")


class _ClusterSocketWriter:
    """Redis Cluster: the chunk's keys grouped by hash slot owner, one pipelined RESP stream per master.

    Per chunk, every master gets its rows' ``HGET _ts`` (dedup) and then their ``HSET`` (+ ``EXPIRE``)
    commands in one send; all masters work at once and their replies are read afterwards. Keys
    are hashed to slots with NumPy (:func:`key_slots`) and slots mapped to masters through
    redis-py's slot table. A write is all-or-retry per chunk: when a node is unreachable, a
    reply says ``MOVED``/``CLUSTERDOWN``/``TRYAGAIN``, or fewer than ``replica_acks`` replicas
    acknowledge (``WAIT``), the slot table is reloaded and the rows the dedup read selected are
    sent again (the same bytes: idempotent), for up to ``cluster_retry_seconds``. A slot
    that is migrating (``ASK``) is written through redis-py's cluster client, which follows
    the redirection row by row. Example (``feature_store.yaml``)::

        online_store:
          type: derm.feast_plugins.redis_online_store.FastRedisOnlineStore
          redis_type: redis_cluster
          connection_string: node-1:6379,node-2:6379,node-3:6379
          replica_acks: 1            # a written row survives its master's crash
          cluster_retry_seconds: 30  # rides out a failover
    """

    def __init__(self, client: RedisCluster, store_config: RedisOnlineStoreConfig):
        self.client = client
        self.store_config = store_config
        self.replica_acks = getattr(store_config, "replica_acks", 0)
        self.retry_seconds = getattr(store_config, "cluster_retry_seconds", 30.0)
        self.channels: dict[str, resp.RespConnection] = {}
        self.pools: dict[str, Any] = {}
        self.owner = np.zeros(0, dtype=np.int64)  # slot -> index into self.nodes
        self.nodes: list[Any] = []
        self.replicas: list[int] = []
        self.slots_loaded = False

    def _load_slots(self) -> None:
        manager = self.client.nodes_manager
        owners = [manager.get_node_from_slot(slot) for slot in range(16384)]
        names = sorted({node.name for node in owners})
        index = {name: i for i, name in enumerate(names)}
        by_name = {node.name: node for node in owners}
        self.nodes = [by_name[name] for name in names]
        self.owner = np.array([index[node.name] for node in owners], dtype=np.int64)
        # Replicas each master has now: a master promoted by a failover has none until the old one rejoins,
        # and is then waited on for none (there is no copy to wait for).
        self.replicas = (
            [int(node.redis_connection.info("replication")["connected_slaves"]) for node in self.nodes]
            if self.replica_acks
            else [0] * len(self.nodes)
        )
        self.slots_loaded = True

    def _reload_slots(self) -> None:
        self.slots_loaded = False
        self._drop_connections()
        self.client.nodes_manager.initialize()
        self._load_slots()

    def _channel(self, node: Any) -> resp.RespConnection:
        channel = self.channels.get(node.name)
        if channel is None:
            pool = node.redis_connection.connection_pool
            connection = pool.get_connection()
            connection.connect()
            self.pools[node.name] = pool
            channel = self.channels[node.name] = resp.RespConnection(connection)
        return channel

    def _drop_connections(self) -> None:
        for name, channel in self.channels.items():
            channel.connection.disconnect()  # replies may be unread: never hand it back in that state
            self.pools[name].release(channel.connection)
        self.channels.clear()
        self.pools.clear()

    def _exchange(self, payloads: dict[int, tuple[bytes, int]]) -> dict[int, list[Any]]:
        """Send every node its payload, then read each node's replies; raises on any error reply."""
        for node_index, (payload, _) in payloads.items():
            self._channel(self.nodes[node_index]).send(payload)
        replies = {}
        redirected: _Redirected | None = None
        for node_index, (_, count) in payloads.items():
            received, error = self._channel(self.nodes[node_index]).read(count)
            if error is not None:
                if not str(error).startswith(("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")):
                    raise error
                if redirected is None or not redirected.asking:
                    redirected = _Redirected(str(error))
            replies[node_index] = received
        if redirected is not None:
            raise redirected
        return replies

    def _by_node(self, encoded: EncodedRows, rows: np.ndarray) -> dict[int, np.ndarray]:
        owners = self.owner[key_slots(encoded.keys.take(rows))] if len(rows) else np.zeros(0, np.int64)
        return {int(node): rows[owners == node] for node in np.unique(owners)}

    def _select(self, encoded: EncodedRows) -> np.ndarray:
        """The rows stock Feast would write: one ``HGET _ts`` per key on its master, then :func:`rows_to_write`."""
        every_row = np.arange(len(encoded))
        if self.store_config.skip_dedup:
            return every_row
        tail = resp.bulk(encoded.fields[0])
        groups = self._by_node(encoded, every_row)
        head = resp.command_head(b"HGET", 2)
        payloads = {
            node: (resp.keyed_commands(head, encoded.keys.take(rows), tail), len(rows)) for node, rows in groups.items()
        }
        replies = self._exchange(payloads)
        stored: list[bytes | None] = [None] * len(encoded)
        for node, rows in groups.items():
            for row, value in zip(rows.tolist(), replies[node], strict=True):
                stored[row] = value
        return rows_to_write(encoded, stored)

    def _write_rows(self, encoded: EncodedRows, selected: np.ndarray) -> None:
        """HSET (+ EXPIRE) of the selected rows on their masters, then ``WAIT`` for the replicas each one has."""
        assert encoded.hset_commands is not None
        per_row = 2 if self.store_config.key_ttl_seconds else 1
        payloads = {}
        waits = {}
        for node, rows in self._by_node(encoded, selected).items():
            payload = encoded.hset_commands.take(rows).data.tobytes()
            replies_count = len(rows) * per_row
            waits[node] = min(self.replica_acks, self.replicas[node])
            if waits[node]:
                # WAIT covers every write sent before it on this connection: the whole chunk.
                payload += resp.command_head(b"WAIT", 2) + resp.bulk(b"%d" % waits[node]) + resp.bulk(b"1000")
                replies_count += 1
            payloads[node] = (payload, replies_count)
        replies = self._exchange(payloads)
        for node, received in replies.items():
            if waits[node] and received[-1] < waits[node]:
                name = self.nodes[node].name
                raise RedisTimeoutError(f"{name}: {received[-1]} of {waits[node]} replicas acknowledged")

    def write(self, encoded: EncodedRows) -> int:
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.05
        selected: np.ndarray | None = None
        while True:
            try:
                if not self.slots_loaded:
                    self._load_slots()
                if selected is None:
                    selected = self._select(encoded)
                # A retry sends the same rows again (same bytes: idempotent) rather than reading _ts anew, which
                # would skip rows a failed attempt wrote but no replica acknowledged.
                self._write_rows(encoded, selected)
                return len(selected)
            except _Redirected as redirected:
                if redirected.asking:
                    # A slot is migrating: only redis-py's cluster client follows ASK (row by row).
                    self._reload_slots()
                    return _PipelineWriter(self.client, self.store_config).write(encoded)
                failure: Exception = redirected
            except _RETRYABLE as error:
                failure = error
            if time.monotonic() > deadline:
                raise failure
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
            try:
                self._reload_slots()
            except _RETRYABLE:
                self.slots_loaded = False  # every startup node may be down for a moment: the next attempt reloads

    def finish(self) -> None:
        pass

    def close(self) -> None:
        for name, channel in self.channels.items():
            self.pools[name].release(channel.connection)
        self.channels.clear()
        self.pools.clear()


class _PipelineWriter:
    """redis-py pipelines (Redis Cluster, or no hiredis): same commands, built per row."""

    def __init__(self, client: Any, store_config: RedisOnlineStoreConfig):
        self.client = client
        self.store_config = store_config

    def write(self, encoded: EncodedRows) -> int:
        keys = encoded.keys.to_list()
        selected = np.arange(len(keys))
        if not self.store_config.skip_dedup:
            with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(key, encoded.fields[0])
                stored = [reply[0] for reply in pipe.execute()]
            selected = rows_to_write(encoded, stored)
        rows = encoded.rows()
        with self.client.pipeline(transaction=False) as pipe:
            for i in selected.tolist():
                key, mapping = rows[i]
                pipe.hset(key, mapping=mapping)
                if self.store_config.key_ttl_seconds:
                    pipe.expire(name=key, time=self.store_config.key_ttl_seconds)
            pipe.execute()
        return len(selected)

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Pipelining: encode on the calling thread, write on one writer thread, bounded queue between.
# ---------------------------------------------------------------------------------------------

T = TypeVar("T")
_DONE = object()


def run_pipelined(items: Iterable[T], consume: Callable[[T], None], max_pending: int) -> None:
    """Consume ``items`` on a writer thread while the caller produces the next ones.

    At most ``max_pending`` produced items wait in the queue, so memory stays bounded.
    The first error on either side stops both and is raised here.
    """
    pending: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
    failures: list[BaseException] = []
    cancelled = threading.Event()

    def drain() -> None:
        while True:
            item = pending.get()
            if item is _DONE:
                return
            if cancelled.is_set():
                continue  # keep taking items so the producer never blocks on a dead writer
            try:
                consume(item)
            except BaseException as error:
                failures.append(error)
                cancelled.set()

    writer = threading.Thread(target=drain, name="fast-redis-writer", daemon=True)
    writer.start()
    try:
        for item in items:
            if cancelled.is_set():
                break
            pending.put(item)
    except BaseException:
        cancelled.set()
        raise
    finally:
        pending.put(_DONE)
        writer.join()
    if failures:
        raise failures[0]


def _empty_bytes_features(feature_view: FeatureView, batch: pa.RecordBatch | pa.Table) -> frozenset[str]:
    names = set()
    for field in feature_view.features:
        if field.dtype.to_value_type() == ValueType.BYTES and field.name in batch.schema.names:
            column = batch.column(field.name)
            if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
                if not pc.max(pc.binary_length(column)).as_py():
                    names.add(field.name)
    return frozenset(names)


def _row_chunks(
    feature_view: FeatureView, batches: Iterable[pa.RecordBatch | pa.Table], rows: int
) -> Iterator[tuple[pa.RecordBatch, frozenset[str]]]:
    """Chunks of at most ``rows`` rows, each with the Bytes features that are empty in its whole batch."""
    for batch in batches:
        empty_bytes = _empty_bytes_features(feature_view, batch)
        parts = batch.to_batches(max_chunksize=rows) if isinstance(batch, pa.Table) else [batch]
        for part in parts:
            for start in range(0, part.num_rows, rows):
                yield part.slice(start, rows), empty_bytes


class FastRedisOnlineStore(RedisOnlineStore):
    """Redis online store (Feast format) that also writes Arrow data without per-row protobuf objects."""

    def _writer(self, config: RepoConfig) -> _SocketWriter | _ClusterSocketWriter | _PipelineWriter:
        client = compat.redis_client(self, config.online_store)
        if resp.HIREDIS and isinstance(client, Redis):
            return _SocketWriter(client, config.online_store)
        if resp.HIREDIS and isinstance(client, RedisCluster):
            return _ClusterSocketWriter(client, config.online_store)
        return _PipelineWriter(client, config.online_store)

    def write_arrow(
        self,
        config: RepoConfig,
        table: FeatureView,
        data: pa.Table | pa.RecordBatch | Iterable[pa.RecordBatch | pa.Table],
        progress: Callable[[int], Any] | None = None,
        unique_keys: bool = False,
    ) -> int:
        """Write rows of ``table`` (columns named as in the feature view) to Redis; returns rows written.

        Same result as stock ``online_write_batch`` on the same rows in the same order:
        identical keys, fields and bytes, rows no newer than the stored ``_ts`` skipped
        unless ``skip_dedup``, the latest of a key's rows kept, EXPIRE when ``key_ttl_seconds``.
        An iterable of record batches is streamed: encoding of the next chunk overlaps the
        write of the current one and at most ``max_pending_batches`` chunks wait in memory.
        ``unique_keys`` promises at most one row per entity (e.g. the output of
        ``pull_latest_from_table_or_query``), which skips the duplicate-key check.
        """
        store_config = config.online_store
        assert isinstance(store_config, RedisOnlineStoreConfig)
        chunk_rows = getattr(store_config, "write_batch_rows", 5000)
        max_pending = getattr(store_config, "max_pending_batches", 2)
        batches = [data] if isinstance(data, (pa.Table, pa.RecordBatch)) else data
        writer = self._writer(config)
        raw_socket = isinstance(writer, (_SocketWriter, _ClusterSocketWriter))
        written = 0

        def write(encoded: EncodedRows) -> None:
            nonlocal written
            written += writer.write(encoded)
            if progress:
                progress(len(encoded))

        encoded_chunks = (
            encode_rows(
                config,
                table,
                chunk,
                with_commands=raw_socket,
                empty_bytes_features=empty_bytes,
                keys_are_unique=unique_keys,
            )
            for chunk, empty_bytes in _row_chunks(table, batches, chunk_rows)
        )
        try:
            run_pipelined(encoded_chunks, write, max_pending)
            writer.finish()
        finally:
            writer.close()
        return written
