"""Feast's Redis online-store format, in one codec shared by the writer and the serving reader.

What stock Feast (checked against 0.67) stores for one row of a feature view:

* the Redis key is the entity key, ``serialize_entity_key(...)`` followed by the
  project name in UTF-8 (:func:`redis_key`; :func:`encode_entity_keys` for whole columns);
  all views of an entity share that one hash;
* the view's event time lives in the field ``_ts:<view>`` (:func:`ts_field`) as a
  serialized ``google.protobuf.Timestamp`` with microsecond precision (Feast goes
  through ``datetime``) (:func:`encode_timestamps`, :func:`timestamp_parts`);
* each feature lives in the field ``mmh3("<view>:<feature>")``, four little-endian
  bytes of unsigned murmur3_32 (:func:`feature_field`), as a serialized ``feast.types.Value``
  (:func:`encode_values`);
* ``<view>`` is the stored view name (:func:`stored_view_name`): the registered name,
  with a version suffix when online feature-view versioning is enabled.

Value quirks reproduced by :func:`encode_values`: a null or NaN scalar is an empty
``Value`` (zero bytes; the field is still set); an empty vector is ``float_list_val``
with no elements; a null element inside a vector becomes NaN; when no value of a
Bytes column in the batch Feast converts is a non-empty ``bytes``, every row of it is
null (Feast's type inference finds no sample).

Everything here encodes whole Arrow columns at once with NumPy into :class:`RaggedBytes`
(``n`` byte strings back to back), byte-identical to Feast's per-row protobuf path;
``tests/test_fast_materialization.py`` checks that against stock Feast. The reader
builds its keys and HMGET field names and checks its decoding prefixes with the same
functions (:func:`int64_key_layout`, :func:`vector_value_prefix`, :func:`value_tag`).

Example::

    view_name = stored_view_name(feature_view, repo_config)
    fields = [ts_field(view_name)] + [feature_field(view_name, f.name) for f in feature_view.features]
    keys = encode_entity_keys(batch, {"pin_id": ValueType.INT64}, "derm", 3)      # RaggedBytes
    vectors = encode_values(batch.column("ctr_pin_emb"), ValueType.FLOAT_LIST)   # RaggedBytes
    assert vectors.to_list()[0].startswith(vector_value_prefix(ValueType.FLOAT_LIST, 64))
"""

from __future__ import annotations

import binascii
import functools
import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import python_values_to_proto_values
from feast.value_type import ValueType
from google.protobuf.timestamp_pb2 import Timestamp
from redis.crc import key_slot

from derm.feast_plugins import compat

# ---------------------------------------------------------------------------------------------
# Where things live: the Redis key, the stored view name and the field names.
# ---------------------------------------------------------------------------------------------


def stored_view_name(feature_view: Any, config: Any) -> str:
    """The view name Feast names a view's fields with: the registered name, versioned when versioning is on."""
    return compat.versioned_fv_name(feature_view, config)


def ts_field(view_name: str) -> bytes:
    """The field holding a view's event time: ``_ts:<stored view name>``."""
    return f"_ts:{view_name}".encode()


def feature_field(view_name: str, feature: str) -> bytes:
    """The field holding a feature: ``mmh3("<stored view name>:<feature>")`` (4 bytes)."""
    return compat.mmh3_hash(f"{view_name}:{feature}")


def redis_key(entity_key: EntityKeyProto, project: str, serialization_version: int) -> bytes:
    """The Redis key (the hash) of one entity: ``serialize_entity_key(...) + project``, row by row."""
    return serialize_entity_key(entity_key, entity_key_serialization_version=serialization_version) + project.encode(
        "utf-8"
    )


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

# The ``Value`` oneof field (and little-endian element dtype) of the types encoded and decoded with NumPy.
VECTOR_VALUE_FIELDS: dict[ValueType, tuple[str, str]] = {
    ValueType.FLOAT_LIST: ("float_list_val", "<f4"),
    ValueType.DOUBLE_LIST: ("double_list_val", "<f8"),
}
FIXED_SCALAR_FIELDS: dict[ValueType, tuple[str, str]] = {
    ValueType.DOUBLE: ("double_val", "<f8"),
    ValueType.FLOAT: ("float_val", "<f4"),
}
VARINT_SCALAR_FIELDS: dict[ValueType, str] = {ValueType.INT64: "int64_val", ValueType.INT32: "int32_val"}


@functools.cache
def value_tag(value_type: ValueType) -> bytes:
    """The bytes a non-null stored ``Value`` of a numeric scalar type starts with (its field's tag)."""
    if value_type in FIXED_SCALAR_FIELDS:
        field, dtype = FIXED_SCALAR_FIELDS[value_type]
        return _tag(field, _FIXED64 if np.dtype(dtype).itemsize == 8 else _FIXED32)
    if value_type in VARINT_SCALAR_FIELDS:
        return _tag(VARINT_SCALAR_FIELDS[value_type], _VARINT)
    raise ValueError(f"{value_type} is not a fixed-width or varint scalar")


def _vector_prefix(field: str, count: int, item_size: int) -> bytes:
    """``Value{<field>: {val: [count packed items]}}`` up to its first item: it depends on the count only."""
    if count == 0:
        return _tag(field, _LENGTH_DELIMITED) + b"\x00"
    packed = b"\x0a" + _varint(count * item_size)
    return _tag(field, _LENGTH_DELIMITED) + _varint(len(packed) + count * item_size) + packed


@functools.lru_cache(maxsize=256)
def vector_value_prefix(value_type: ValueType, dim: int) -> bytes:
    """The bytes every stored ``Value`` of a ``dim``-long vector starts with (tag, lengths, packed tag)."""
    field, dtype = VECTOR_VALUE_FIELDS[value_type]
    return _vector_prefix(field, dim, np.dtype(dtype).itemsize)


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


def _encode_float_list(column: pa.Array, value_type: ValueType) -> RaggedBytes | None:
    if not (
        pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or pa.types.is_fixed_size_list(column.type)
    ):
        return None
    field, dtype = VECTOR_VALUE_FIELDS[value_type]
    item = np.dtype(dtype)
    if column.type.value_type != pa.from_numpy_dtype(item):
        return None
    valid = _valid_mask(column)
    lists = column.filter(pa.array(valid)) if not valid.all() else column
    offsets = _list_offsets(lists)
    flat = lists.values.slice(offsets[0], offsets[-1] - offsets[0])
    if flat.null_count:
        flat = flat.fill_null(np.nan)  # a null element inside a vector is NaN in stock Feast (via NumPy)
    items = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=item)
    counts = np.diff(offsets)
    item_size = item.itemsize
    # Value{<field>: List{val: [packed]}}: the prefix only depends on the element count.
    distinct, codes = np.unique(counts, return_inverse=True)
    prefixes = [_vector_prefix(field, count, item_size) for count in distinct.tolist()]
    raw_bytes = items.view(np.uint8)
    if len(distinct) == 1:
        raw = RaggedBytes.fixed(raw_bytes.reshape(len(counts), int(distinct[0]) * item_size))
    else:
        raw = RaggedBytes.from_lengths(raw_bytes, counts * item_size)
    return concat_rows([lookup(prefixes, codes), raw]).spread(valid)


def _encode_natively(column: pa.Array, value_type: ValueType, empty_bytes_are_null: bool | None) -> RaggedBytes | None:
    """Vectorized Value bytes for the common type pairs; None when Feast's own converter must run."""
    arrow_type = column.type
    if value_type in VECTOR_VALUE_FIELDS:
        return _encode_float_list(column, value_type)
    valid = _valid_mask(column)
    if value_type in (ValueType.INT64, ValueType.INT32):
        expected = {
            ValueType.INT64: (pa.int64(), pa.int32(), pa.int16(), pa.int8()),
            ValueType.INT32: (pa.int32(), pa.int16(), pa.int8()),
        }[value_type]
        if arrow_type not in expected:
            return None
        return _scalar_value(value_tag(value_type), varints(_numbers(column, "int64")[valid]), valid)
    if value_type in FIXED_SCALAR_FIELDS:
        _, dtype = FIXED_SCALAR_FIELDS[value_type]
        if arrow_type != pa.from_numpy_dtype(np.dtype(dtype)):
            return None
        numbers = _numbers(column, dtype)
        valid &= ~np.isnan(numbers)  # stock Feast writes NaN as null (pd.isnull)
        payload = RaggedBytes.fixed(numbers[valid].view(np.uint8).reshape(-1, np.dtype(dtype).itemsize))
        return _scalar_value(value_tag(value_type), payload, valid)
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


# ---------------------------------------------------------------------------------------------
# Entity keys and event times.
# ---------------------------------------------------------------------------------------------


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
    """Redis keys (:func:`redis_key`: ``serialize_entity_key(...) + project``) of every row, encoded with NumPy."""
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
            redis_key(
                EntityKeyProto(join_keys=list(join_keys), entity_values=[protos[name][i] for name in join_keys]),
                project,
                serialization_version,
            )
            for i in range(rows)
        ]
        return RaggedBytes.from_list(keys)
    return concat_rows([*parts, RaggedBytes.constant(project.encode("utf-8"), rows)])


def int64_key_layout(join_key: str, project: str, serialization_version: int) -> tuple[bytes, bytes] | None:
    """(head, tail) around the 8 little-endian id bytes of a single int64 join key's Redis key.

    None when the keys are not laid out that way (then use :func:`encode_entity_keys`).
    Cut once from keys :func:`encode_entity_keys` built and checked against Feast's own
    :func:`redis_key` for a few ids, so :func:`int64_redis_keys` can fill in ids with NumPy.
    """
    probes = np.array([0, -2, 2**62 + 12345], dtype=np.int64)
    batch = pa.record_batch({join_key: pa.array(probes, type=pa.int64())})
    keys = encode_entity_keys(batch, {join_key: ValueType.INT64}, project, serialization_version).to_list()
    head_length = len(keys[0]) - 8 - len(project.encode("utf-8"))
    head, tail = keys[0][:head_length], keys[0][head_length + 8 :]
    for value, key in zip(probes.tolist(), keys, strict=True):
        feast_key = redis_key(
            EntityKeyProto(join_keys=[join_key], entity_values=[ValueProto(int64_val=value)]),
            project,
            serialization_version,
        )
        if key != feast_key or key != head + struct.pack("<q", value) + tail:
            return None
    return head, tail


def int64_redis_keys(layout: tuple[bytes, bytes], ids: Any) -> RaggedBytes:
    """Redis keys of int64 ids with an :func:`int64_key_layout`: one NumPy assignment per part."""
    head, tail = layout
    values = np.asarray(ids, dtype="<i8")
    keys = np.empty((len(values), len(head) + 8 + len(tail)), dtype=np.uint8)
    keys[:, : len(head)] = np.frombuffer(head, np.uint8)
    keys[:, len(head) : len(head) + 8] = values.view(np.uint8).reshape(-1, 8)
    keys[:, len(head) + 8 :] = np.frombuffer(tail, np.uint8)
    return RaggedBytes.fixed(keys)


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


def timestamp_parts(raw: bytes) -> tuple[int, int]:
    """(seconds, nanos) of a stored ``_ts`` value (a serialized ``google.protobuf.Timestamp``)."""
    parsed = Timestamp.FromString(raw)
    return parsed.seconds, parsed.nanos


# ---------------------------------------------------------------------------------------------
# Redis Cluster hash slots.
# ---------------------------------------------------------------------------------------------

CLUSTER_SLOTS = 16384
# CRC16-CCITT (XModem), Redis Cluster's key hash: table[i] is the CRC of the single byte i.
_CRC16_TABLE = np.array([binascii.crc_hqx(bytes([i]), 0) for i in range(256)], dtype=np.int32)
_HASH_TAG_OPEN = ord("{")
_HASH_TAG_CLOSE = ord("}")


def key_slots(keys: RaggedBytes) -> np.ndarray:
    """Redis Cluster hash slot of every key (``CRC16(key) mod 16384``, hash tags honoured), shape ``(rows,)``.

    Fixed-width keys are hashed column by column with NumPy; a key holding a ``{`` (an
    entity id byte can be 0x7B) may carry a hash tag and goes through redis-py's
    ``key_slot``, as does every key of a ragged batch.

    Example::

        slots = key_slots(encode_entity_keys(batch, {"user_id": ValueType.INT64}, "derm", 3))
    """
    rows = len(keys)
    if keys.width is None or rows == 0:
        return np.fromiter((key_slot(key) for key in keys.to_list()), dtype=np.int64, count=rows)
    matrix = keys.matrix()
    crc = np.zeros(rows, dtype=np.int32)
    for column in range(keys.width):
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16_TABLE[((crc >> 8) ^ matrix[:, column]) & 0xFF]
    slots = crc.astype(np.int64) % CLUSTER_SLOTS
    # A hash tag is a non-empty run between the first "{" and the first "}" after it: only those keys differ.
    opens = matrix == _HASH_TAG_OPEN
    candidates = np.flatnonzero(opens.any(axis=1))
    if len(candidates):
        first_open = opens[candidates].argmax(axis=1)
        after_open = np.arange(keys.width) > (first_open + 1)[:, None]  # "{}" (empty tag) does not count
        closes = (matrix[candidates] == _HASH_TAG_CLOSE) & (np.arange(keys.width) > first_open[:, None])
        first_close = np.where(closes.any(axis=1), closes.argmax(axis=1), -1)
        tagged = candidates[(first_close >= 0) & after_open[np.arange(len(candidates)), np.maximum(first_close, 0)]]
        for row in tagged.tolist():
            slots[row] = key_slot(matrix[row].tobytes())
    return slots
