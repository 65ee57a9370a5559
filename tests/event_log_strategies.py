"""Hypothesis strategies for the event-log contract's optional columns (issue 17), for any test to import.

``is_ad`` and ``conversion_timestamp`` (see :mod:`derm.events.schema`) in every encoding the contract
accepts, each possibly absent, drawn for a table that already holds the required columns::

    from tests.event_log_strategies import with_optional_columns

    @given(data=st.data())
    def test_x(data):
        table = data.draw(with_optional_columns(valid_required_table))   # still a valid log file
        truth = optional_truth(table)     # is_ad as bools, conversion times in UTC microseconds

What the drawn values are, in canonical form, is :func:`optional_truth`'s answer, so a test can
compare whatever a stage reads with it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from hypothesis import strategies as st

# How a flag may be written: bool, integers 0/1, or the source's name as a plain, large or dictionary string.
IS_AD_ENCODINGS = ("bool", "int8", "int64", "uint8", "string", "large_string", "dictionary")
TIMESTAMP_UNITS = ("s", "ms", "us", "ns")
TIME_ZONES = ("UTC", "Europe/Paris", "America/Los_Angeles", "Asia/Kolkata")
_NS = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}
MAX_DELAY_NS = 3 * 86_400 * 10**9  # conversions hours to days after the event


def is_ad_array(values: list[bool], encoding: str) -> pa.Array:
    """The flags ``values`` written in ``encoding`` (one of :data:`IS_AD_ENCODINGS`)."""
    if encoding == "bool":
        return pa.array(values, pa.bool_())
    if encoding in ("int8", "int64", "uint8"):
        return pa.array([int(v) for v in values], getattr(pa, encoding)())
    names = ["ads" if v else "organic" for v in values]
    if encoding == "large_string":
        return pa.array(names, pa.large_string())
    array = pa.array(names, pa.string())
    return array.dictionary_encode() if encoding == "dictionary" else array


def _epoch_ns(timestamps: pa.Array) -> np.ndarray:
    unit = timestamps.type.unit
    return pc.cast(timestamps, pa.int64()).to_numpy(zero_copy_only=False).astype(np.int64) * _NS[unit]


@st.composite
def is_ad_columns(draw: st.DrawFn, n: int) -> pa.Array | None:
    """An ``is_ad`` column of ``n`` rows in any accepted encoding, or ``None`` (column absent)."""
    encoding = draw(st.sampled_from((None, *IS_AD_ENCODINGS)))
    if encoding is None:
        return None
    values = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return is_ad_array(values, encoding)


@st.composite
def conversion_timestamp_columns(draw: st.DrawFn, event_timestamp: pa.Array, converted: pa.Array) -> pa.Array | None:
    """A valid ``conversion_timestamp`` column, or ``None`` (column absent).

    Null on rows that did not convert; on converted rows either null (time unknown) or a time
    0 to :data:`MAX_DELAY_NS` after the event, in any unit (rounded *up* to it, so never before
    the event) and any time zone.
    """
    if not draw(st.booleans()):
        return None
    unit, zone = draw(st.sampled_from(TIMESTAMP_UNITS)), draw(st.sampled_from(TIME_ZONES))
    events_ns = _epoch_ns(event_timestamp)
    flags = converted.to_pylist()
    values: list[int | None] = []
    for event_ns, flag in zip(events_ns.tolist(), flags, strict=True):
        if not flag or draw(st.booleans()):  # no conversion, or its time unknown
            values.append(None)
            continue
        delay = draw(st.one_of(st.just(0), st.integers(0, MAX_DELAY_NS)))
        values.append(-(-(event_ns + delay) // _NS[unit]))  # ceil to the unit
    return pa.array(values, pa.int64()).cast(pa.timestamp(unit, tz=zone))


@st.composite
def with_optional_columns(draw: st.DrawFn, table: pa.Table) -> pa.Table:
    """``table`` (a valid file of required columns) with optional columns drawn; still valid."""
    is_ad = draw(is_ad_columns(table.num_rows))
    if is_ad is not None:
        table = table.append_column("is_ad", is_ad)
    conversion = draw(conversion_timestamp_columns(table.column("event_timestamp"), table.column("converted")))
    if conversion is not None:
        table = table.append_column("conversion_timestamp", conversion)
    return table


def optional_truth(table: pa.Table) -> dict[str, list]:
    """The canonical values of a table's optional columns: ``is_ad`` bools (true when absent) and
    ``conversion_us`` (UTC microseconds, truncated, ``None`` when null or absent) per row."""
    n = table.num_rows
    if "is_ad" in table.column_names:
        column = table.column("is_ad").combine_chunks()
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        raw = column.to_pylist()
        is_ad = [v in (True, 1, "ads") for v in raw]
    else:
        is_ad = [True] * n
    conversion: list[int | None] = [None] * n
    if "conversion_timestamp" in table.column_names:
        column = table.column("conversion_timestamp").combine_chunks()
        valid = column.is_valid().to_pylist()
        ns = _epoch_ns(column.fill_null(0))
        conversion = [int(v) // 1000 if ok else None for v, ok in zip(ns.tolist(), valid, strict=True)]
    return {"is_ad": is_ad, "conversion_us": conversion}


__all__ = [
    "IS_AD_ENCODINGS",
    "MAX_DELAY_NS",
    "TIMESTAMP_UNITS",
    "TIME_ZONES",
    "conversion_timestamp_columns",
    "is_ad_array",
    "is_ad_columns",
    "optional_truth",
    "with_optional_columns",
]
