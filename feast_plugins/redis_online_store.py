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
stock Feast can read, it reads from here. Format notes (checked against Feast
0.67): a null or NaN scalar is written as an empty ``Value`` (zero bytes), the
field is still set; an empty vector is ``float_list_val`` with no elements; a
null element inside a vector becomes NaN; when no value of a Bytes column in
the batch Feast converts is a non-empty ``bytes``, every row of it is written as
null (Feast's type inference finds no sample). The stored ``_ts`` has microsecond
precision (Feast goes through ``datetime``). Dedup is stock ``online_write_batch``'s:
a row is skipped when its event time is not newer than the stored ``_ts``.

Known differences: an Int64 column that contains nulls goes through float64 in
stock Feast, so integers beyond 2**53 lose precision there; here they are written
exactly. Feast applies the Bytes rule above per write batch (the whole window, or
``online_write_batch_size`` rows); a streamed write applies it per record batch.
"""

from __future__ import annotations

import itertools
import queue
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from feast import FeatureView, RepoConfig
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import _mmh3
from feast.infra.online_stores.redis import (
    RedisOnlineStore,
    RedisOnlineStoreConfig,
    _versioned_fv_name,
)
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import python_values_to_proto_values
from feast.utils import _validate_vector_field_lengths
from feast.value_type import ValueType
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import PositiveInt
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

try:  # hiredis parses replies in C; without it the writer uses redis-py pipelines.
    import hiredis
except ImportError:  # pragma: no cover - feast[redis] installs it
    hiredis = None


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


# ---------------------------------------------------------------------------------------------
# Ragged byte arrays: n byte strings back to back, so whole columns are encoded with NumPy.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RaggedBytes:
    """``n`` byte strings stored back to back: row ``i`` is ``data[offsets[i]:offsets[i + 1]]``.

    ``width`` is set when every row has the same length, which keeps the common case
    (fixed-width keys, vectors, one timestamp) on plain 2-D array operations.
    """

    data: np.ndarray  # uint8, exactly offsets[-1] bytes
    offsets: np.ndarray  # int64, n + 1, offsets[0] == 0
    width: int | None

    @classmethod
    def fixed(cls, matrix: np.ndarray) -> RaggedBytes:
        rows, width = matrix.shape
        data = np.ascontiguousarray(matrix, dtype=np.uint8).reshape(-1)
        return cls(data, np.arange(rows + 1, dtype=np.int64) * width, width)

    @classmethod
    def constant(cls, value: bytes, rows: int) -> RaggedBytes:
        return cls.fixed(np.tile(np.frombuffer(value, dtype=np.uint8), (rows, 1)))

    @classmethod
    def from_lengths(cls, data: np.ndarray, lengths: np.ndarray) -> RaggedBytes:
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        width = None
        if len(lengths) == 0:
            width = 0
        elif (lengths == lengths[0]).all():
            width = int(lengths[0])
        return cls(np.ascontiguousarray(data, dtype=np.uint8), offsets, width)

    @classmethod
    def from_list(cls, rows: Sequence[bytes]) -> RaggedBytes:
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        return cls.from_lengths(np.frombuffer(b"".join(rows), dtype=np.uint8), lengths)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def matrix(self) -> np.ndarray:
        assert self.width is not None
        return self.data.reshape(len(self), self.width)

    def take(self, rows: np.ndarray) -> RaggedBytes:
        if self.width is not None:
            return RaggedBytes.fixed(self.matrix()[rows])
        lengths = self.lengths[rows]
        out = RaggedBytes.from_lengths(np.empty(0, np.uint8), lengths)
        source = np.repeat(self.offsets[:-1][rows] - out.offsets[:-1], lengths) + np.arange(out.offsets[-1])
        return RaggedBytes(self.data[source], out.offsets, out.width)

    def spread(self, valid: np.ndarray) -> RaggedBytes:
        """These rows placed at the True positions of ``valid``; the other rows are empty."""
        if valid.all():
            return self
        lengths = np.zeros(len(valid), dtype=np.int64)
        lengths[valid] = self.lengths
        return RaggedBytes.from_lengths(self.data, lengths)

    def to_list(self) -> list[bytes]:
        buffer = self.data.tobytes()
        offsets = self.offsets.tolist()
        return [buffer[start:end] for start, end in itertools.pairwise(offsets)]


def concat_rows(parts: Sequence[RaggedBytes]) -> RaggedBytes:
    """Row-wise concatenation: row ``i`` of the result is row ``i`` of every part, in order."""
    rows = len(parts[0])
    if all(part.width is not None for part in parts):
        return RaggedBytes.fixed(np.hstack([part.matrix() for part in parts]))
    lengths = np.zeros(rows, dtype=np.int64)
    for part in parts:
        lengths += part.lengths
    result = RaggedBytes.from_lengths(np.empty(0, np.uint8), lengths)
    out = np.empty(int(result.offsets[-1]), dtype=np.uint8)
    cursor = result.offsets[:-1].copy()
    for part in parts:
        if part.width == 0:
            continue
        if part.width is not None:
            out[cursor[:, None] + np.arange(part.width)] = part.matrix()
            cursor += part.width
        else:
            part_lengths = part.lengths
            out[np.repeat(cursor - part.offsets[:-1], part_lengths) + np.arange(len(part.data))] = part.data
            cursor += part_lengths
    return RaggedBytes(out, result.offsets, result.width)


def lookup(table: Sequence[bytes], codes: np.ndarray) -> RaggedBytes:
    """Row ``i`` is ``table[codes[i]]``: how per-distinct-value encodings are broadcast."""
    return RaggedBytes.from_list(table).take(codes)


def varints(values: np.ndarray) -> RaggedBytes:
    """Protobuf base-128 varints of int64 values (negative ones take 10 bytes, as protobuf does)."""
    unsigned = np.asarray(values, dtype=np.int64).view(np.uint64)
    sizes = np.ones(len(unsigned), dtype=np.int64)
    for k in range(1, 10):
        sizes += unsigned >= np.uint64(1 << (7 * k))
    shifts = np.arange(10, dtype=np.uint64) * np.uint64(7)
    groups = ((unsigned[:, None] >> shifts) & np.uint64(0x7F)).astype(np.uint8)
    position = np.arange(10)
    groups[position[None, :] < (sizes - 1)[:, None]] |= 0x80
    return RaggedBytes.from_lengths(groups[position[None, :] < sizes[:, None]], sizes)


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(field_name: str, wire_type: int) -> bytes:
    return _varint(ValueProto.DESCRIPTOR.fields_by_name[field_name].number << 3 | wire_type)


_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


# ---------------------------------------------------------------------------------------------
# Column encoders: Arrow column -> serialized feast Value per row, byte-identical to Feast.
# ---------------------------------------------------------------------------------------------


def _valid_mask(column: pa.Array) -> np.ndarray:
    if column.null_count == 0:
        return np.ones(len(column), dtype=bool)
    return np.asarray(column.is_valid().to_numpy(zero_copy_only=False), dtype=bool)


def _numbers(column: pa.Array, dtype: str) -> np.ndarray:
    return np.asarray(column.fill_null(0).to_numpy(zero_copy_only=False)).astype(dtype, copy=False)


def _binary_rows(column: pa.Array) -> RaggedBytes:
    """The raw bytes of every row of a string/binary column (null rows empty)."""
    column = column.cast(pa.large_binary())
    _, offsets_buffer, data_buffer = column.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[column.offset : column.offset + len(column) + 1]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.empty(0, np.uint8)
    return RaggedBytes.from_lengths(data[offsets[0] : offsets[-1]], np.diff(offsets))


def _scalar_value(tag: bytes, payload: RaggedBytes, valid: np.ndarray) -> RaggedBytes:
    return concat_rows([RaggedBytes.constant(tag, len(payload)), payload]).spread(valid)


def _list_offsets(lists: pa.Array) -> np.ndarray:
    """Element offsets (into ``lists.values``) of every row of a list, large list or fixed-size list array."""
    rows = len(lists)
    if pa.types.is_fixed_size_list(lists.type):
        return (np.arange(rows + 1, dtype=np.int64) + lists.offset) * lists.type.list_size
    if rows == 0:
        return np.zeros(1, dtype=np.int64)
    width = np.int64 if pa.types.is_large_list(lists.type) else np.int32
    raw = np.frombuffer(lists.buffers()[1], dtype=width)[lists.offset : lists.offset + rows + 1]
    return raw.astype(np.int64)


def _encode_float_list(column: pa.Array, element: str, field: str) -> RaggedBytes | None:
    if not (
        pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or pa.types.is_fixed_size_list(column.type)
    ):
        return None
    item = np.float32 if element == "float32" else np.float64
    if column.type.value_type != pa.from_numpy_dtype(item):
        return None
    valid = _valid_mask(column)
    lists = column.filter(pa.array(valid)) if not valid.all() else column
    offsets = _list_offsets(lists)
    flat = lists.values.slice(offsets[0], offsets[-1] - offsets[0])
    if flat.null_count:
        flat = flat.fill_null(np.nan)  # a null element inside a vector is NaN in stock Feast (via NumPy)
    items = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=f"<{np.dtype(item).str[1:]}")
    counts = np.diff(offsets)
    item_size = np.dtype(item).itemsize
    # Value{<field>: List{val: [packed]}}: the prefix only depends on the element count.
    distinct, codes = np.unique(counts, return_inverse=True)
    prefixes = []
    for count in distinct.tolist():
        if count == 0:
            prefixes.append(_tag(field, _LENGTH_DELIMITED) + b"\x00")
            continue
        packed = b"\x0a" + _varint(count * item_size)
        prefixes.append(_tag(field, _LENGTH_DELIMITED) + _varint(len(packed) + count * item_size) + packed)
    raw_bytes = items.view(np.uint8)
    if len(distinct) == 1:
        raw = RaggedBytes.fixed(raw_bytes.reshape(len(counts), int(distinct[0]) * item_size))
    else:
        raw = RaggedBytes.from_lengths(raw_bytes, counts * item_size)
    return concat_rows([lookup(prefixes, codes), raw]).spread(valid)


def _encode_natively(column: pa.Array, value_type: ValueType, empty_bytes_are_null: bool | None) -> RaggedBytes | None:
    """Vectorized Value bytes for the common type pairs; None when Feast's own converter must run."""
    arrow_type = column.type
    if value_type == ValueType.FLOAT_LIST:
        return _encode_float_list(column, "float32", "float_list_val")
    if value_type == ValueType.DOUBLE_LIST:
        return _encode_float_list(column, "float64", "double_list_val")
    valid = _valid_mask(column)
    if value_type in (ValueType.INT64, ValueType.INT32):
        expected = {
            ValueType.INT64: (pa.int64(), pa.int32(), pa.int16(), pa.int8()),
            ValueType.INT32: (pa.int32(), pa.int16(), pa.int8()),
        }[value_type]
        if arrow_type not in expected:
            return None
        field = "int64_val" if value_type == ValueType.INT64 else "int32_val"
        return _scalar_value(_tag(field, _VARINT), varints(_numbers(column, "int64")[valid]), valid)
    if value_type in (ValueType.DOUBLE, ValueType.FLOAT):
        expected_type, dtype, field, wire = {
            ValueType.DOUBLE: (pa.float64(), "<f8", "double_val", _FIXED64),
            ValueType.FLOAT: (pa.float32(), "<f4", "float_val", _FIXED32),
        }[value_type]
        if arrow_type != expected_type:
            return None
        numbers = _numbers(column, dtype)
        valid &= ~np.isnan(numbers)  # stock Feast writes NaN as null (pd.isnull)
        payload = RaggedBytes.fixed(numbers[valid].view(np.uint8).reshape(-1, np.dtype(dtype).itemsize))
        return _scalar_value(_tag(field, wire), payload, valid)
    if value_type == ValueType.BOOL:
        if arrow_type != pa.bool_():
            return None
        flags = np.asarray(column.fill_null(False).to_numpy(zero_copy_only=False), dtype=np.uint8)
        return _scalar_value(_tag("bool_val", _VARINT), RaggedBytes.fixed(flags[valid][:, None]), valid)
    if value_type in (ValueType.STRING, ValueType.BYTES):
        accepted = (
            (pa.string(), pa.large_string()) if value_type == ValueType.STRING else (pa.binary(), pa.large_binary())
        )
        if arrow_type not in accepted:
            return None
        field = "string_val" if value_type == ValueType.STRING else "bytes_val"
        payload = _binary_rows(column).take(np.flatnonzero(valid))
        if value_type == ValueType.BYTES and (
            not payload.lengths.any() if empty_bytes_are_null is None else empty_bytes_are_null
        ):
            return RaggedBytes.from_lengths(np.empty(0, np.uint8), np.zeros(len(column), dtype=np.int64))
        return _scalar_value(_tag(field, _LENGTH_DELIMITED), concat_rows([varints(payload.lengths), payload]), valid)
    return None


def encode_values(
    column: pa.Array | pa.ChunkedArray, value_type: ValueType, empty_bytes_are_null: bool | None = None
) -> RaggedBytes:
    """Serialized ``feast.types.Value`` of every row, exactly as stock materialization writes it.

    ``empty_bytes_are_null`` reproduces a quirk of Feast's converter for Bytes columns: when
    no value of the whole batch it converts is a non-empty ``bytes`` (b"" counts as empty
    there, "" does not), it writes every row as null. None decides from this column alone;
    callers that encode one stock batch in several chunks decide once for the batch.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    encoded = _encode_natively(column, value_type, empty_bytes_are_null)
    if encoded is not None:
        return encoded
    protos = python_values_to_proto_values(column.to_numpy(zero_copy_only=False), value_type)
    return RaggedBytes.from_list([proto.SerializeToString() for proto in protos])


def _entity_value_bytes(column: pa.Array, value_type: ValueType) -> RaggedBytes | None:
    """``_serialize_val`` of every row (type, length, value), or None when not vectorizable."""
    if column.null_count:
        return None
    rows = len(column)
    if value_type == ValueType.INT64 and column.type in (pa.int64(), pa.int32(), pa.int16(), pa.int8()):
        values = _numbers(column, "<i8").view(np.uint8).reshape(rows, 8)
        return concat_rows(
            [RaggedBytes.constant(struct.pack("<II", ValueType.INT64.value, 8), rows), RaggedBytes.fixed(values)]
        )
    if value_type == ValueType.INT32 and column.type in (pa.int32(), pa.int16(), pa.int8()):
        values = _numbers(column, "<i4").view(np.uint8).reshape(rows, 4)
        return concat_rows(
            [RaggedBytes.constant(struct.pack("<II", ValueType.INT32.value, 4), rows), RaggedBytes.fixed(values)]
        )
    if value_type == ValueType.STRING and column.type in (pa.string(), pa.large_string()):
        text = _binary_rows(column)
        lengths = text.lengths.astype("<u4").view(np.uint8).reshape(rows, 4)
        return concat_rows(
            [RaggedBytes.constant(struct.pack("<I", ValueType.STRING.value), rows), RaggedBytes.fixed(lengths), text]
        )
    return None


def encode_entity_keys(
    batch: pa.RecordBatch, join_keys: dict[str, ValueType], project: str, serialization_version: int
) -> RaggedBytes:
    """Redis keys (``serialize_entity_key(...) + project``) of every row."""
    rows = batch.num_rows
    names = sorted(join_keys)
    columns = {name: batch.column(name) for name in names}
    parts: list[RaggedBytes] | None = None
    if serialization_version == 3:
        values = [_entity_value_bytes(columns[name], join_keys[name]) for name in names]
        if all(value is not None for value in values):
            header = [struct.pack("<I", len(names))]
            for name in names:
                encoded_name = name.encode("utf8")
                header.append(struct.pack("<II", ValueType.STRING.value, len(encoded_name)) + encoded_name)
            parts = [RaggedBytes.constant(b"".join(header), rows), *values]  # type: ignore[list-item]
    if parts is None:
        # Anything else (other key types, nulls, older versions) goes through Feast's own code, row by row.
        protos = {
            name: python_values_to_proto_values(batch.column(name).to_numpy(zero_copy_only=False), value_type)
            for name, value_type in join_keys.items()
        }
        keys = [
            serialize_entity_key(
                EntityKeyProto(join_keys=list(join_keys), entity_values=[protos[name][i] for name in join_keys]),
                entity_key_serialization_version=serialization_version,
            )
            for i in range(rows)
        ]
        parts = [RaggedBytes.from_list(keys)]
    return concat_rows([*parts, RaggedBytes.constant(project.encode("utf-8"), rows)])


def event_time_micros(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Event times as int64 microseconds since the epoch, truncated like ``pd.Timestamp.to_pydatetime``."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_timestamp(column.type) and column.null_count == 0:
        per_unit = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": None}[column.type.unit]
        raw = np.asarray(column.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)
        return raw // 1000 if per_unit is None else raw * per_unit
    nanos = pd.to_datetime(column.to_numpy(zero_copy_only=False)).asi8
    return nanos // 1000


def encode_timestamps(micros: np.ndarray) -> RaggedBytes:
    """Serialized ``google.protobuf.Timestamp`` per row, encoded once per distinct event time."""
    distinct, codes = np.unique(micros, return_inverse=True)
    table = [
        Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000).SerializeToString()
        for us in distinct.tolist()
    ]
    return lookup(table, codes)


# ---------------------------------------------------------------------------------------------
# Encoded chunks and the RESP commands that write them.
# ---------------------------------------------------------------------------------------------


def _bulk(strings: RaggedBytes) -> list[RaggedBytes]:
    """RESP bulk strings (``$<len>\\r\\n<bytes>\\r\\n``) of every row."""
    rows = len(strings)
    distinct, codes = np.unique(strings.lengths, return_inverse=True)
    headers = lookup([b"$%d\r\n" % length for length in distinct.tolist()], codes)
    return [headers, strings, RaggedBytes.constant(b"\r\n", rows)]


def _bulk_constant(value: bytes, rows: int) -> RaggedBytes:
    return RaggedBytes.constant(b"$%d\r\n%s\r\n" % (len(value), value), rows)


# Reads every key's stored _ts in one command: one reply to parse instead of one per row.
_READ_TIMESTAMPS_SCRIPT = (
    b"local stored = {} for i, key in ipairs(KEYS) do stored[i] = redis.call('HGET', key, ARGV[1]) end return stored"
)


def _read_timestamps_command(keys: RaggedBytes, ts_field: bytes) -> bytes:
    """RESP of ``EVAL <script> n key_1 .. key_n _ts:<view>`` (an HGET per key, run server side)."""
    rows = len(keys)
    head = b"*%d\r\n$4\r\nEVAL\r\n$%d\r\n%s\r\n$%d\r\n%d\r\n" % (
        rows + 4,
        len(_READ_TIMESTAMPS_SCRIPT),
        _READ_TIMESTAMPS_SCRIPT,
        len(str(rows)),
        rows,
    )
    keys_part = concat_rows(_bulk(keys)).data.tobytes() if rows else b""
    return head + keys_part + b"$%d\r\n%s\r\n" % (len(ts_field), ts_field)


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
    _validate_vector_field_lengths(batch, feature_view)
    if feature_view.batch_source is None:
        raise ValueError(f"Feature view '{feature_view.name}' has no batch_source and cannot be converted to proto.")
    join_keys = {field.name: field.dtype.to_value_type() for field in feature_view.entity_columns}
    for name in [field.name for field in feature_view.features] + list(join_keys):
        if name not in batch.schema.names:
            raise ValueError(f"Column {name} not found in table")

    view_name = _versioned_fv_name(feature_view, config)
    keys = encode_entity_keys(batch, join_keys, config.project, config.entity_key_serialization_version)
    micros = event_time_micros(batch.column(feature_view.batch_source.timestamp_field))
    fields = [f"_ts:{view_name}".encode()] + [_mmh3(f"{view_name}:{field.name}") for field in feature_view.features]
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
        hset = [RaggedBytes.constant(b"*%d\r\n$4\r\nHSET\r\n" % (2 + 2 * len(fields)), rows), *_bulk(keys)]
        for field, column in zip(fields, values, strict=True):
            hset += [_bulk_constant(field, rows), *_bulk(column)]
        if store_config.key_ttl_seconds:
            hset += [
                RaggedBytes.constant(b"*3\r\n$6\r\nEXPIRE\r\n", rows),
                *_bulk(keys),
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
            parsed = Timestamp()
            parsed.ParseFromString(value)
            nanos = cache[value] = parsed.seconds * 1_000_000_000 + parsed.nanos
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
    """Sends whole chunks of prebuilt RESP over one pooled connection and parses replies with hiredis.

    The HSET replies of a chunk are only read once the next chunk's commands are on their
    way, so Redis always has queued work instead of idling while Python encodes and parses.
    Commands on one connection run in order, so the next chunk's _ts read still sees this
    chunk's writes.
    """

    def __init__(self, client: Redis, store_config: RedisOnlineStoreConfig):
        self.pool = client.connection_pool
        self.store_config = store_config
        self.connection = self.pool.get_connection()
        self.reader = hiredis.Reader()
        self.unread_replies = 0  # replies of commands already sent, not read yet
        self.error: Exception | None = None

    def _send(self, payload: bytes, replies: int) -> None:
        self.connection.send_packed_command([payload], check_health=False)
        self.unread_replies += replies

    def _read(self, replies: int) -> list[Any]:
        """Read the next ``replies`` replies; error replies are kept and raised once all are read."""
        sock = self.connection._sock
        received: list[Any] = []
        while len(received) < replies:
            reply = self.reader.gets()
            if reply is False:
                data = sock.recv(1 << 20)
                if not data:
                    raise RedisConnectionError("Connection closed by server.")
                self.reader.feed(data)
                continue
            self.unread_replies -= 1
            if isinstance(reply, hiredis.ReplyError) and self.error is None:
                self.error = ResponseError(str(reply))
            received.append(reply)
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

    def _writer(self, config: RepoConfig) -> _SocketWriter | _PipelineWriter:
        client = self._get_client(config.online_store)
        if hiredis is not None and isinstance(client, Redis):
            return _SocketWriter(client, config.online_store)
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
        raw_socket = isinstance(writer, _SocketWriter)
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
