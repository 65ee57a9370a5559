"""A timestamp index of a Parquet folder source, so that reads skip files outside their time window.

A Feast ``FileSource`` whose path is a folder is read by DuckDB as ``<folder>/**/*.parquet``: every
read opens every file's footer, so materializing one new day of a view with 2,000 published days
cost as much as reading them all. A writer that knows what it wrote records each file's event
timestamp range in ``<folder>/_event_timestamps.json``; the offline store reads only the files whose
range meets the window of the query.

The index is a hint, never the truth: a file it does not list is always read (a writer that died
between landing a file and recording it costs speed, not rows), and a listed file must be immutable
(the platform never rewrites a published day). DuckDB ignores the JSON file, as it ignores every
file that is not ``*.parquet``.

Example::

    record_file_timestamps(folder, "date=2026-01-05/data.parquet", first, last)
    files = files_in_window(folder, start, end)   # None: read the folder as usual
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime
from pathlib import Path

INDEX_FILE = "_event_timestamps.json"


def _read_index(folder: Path) -> dict[str, tuple[datetime, datetime]]:
    try:
        raw = json.loads((folder / INDEX_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}  # no index, or an unreadable one: read every file
    return {name: (datetime.fromisoformat(low), datetime.fromisoformat(high)) for name, (low, high) in raw.items()}


def record_file_timestamps(folder: Path, relative_file: str, first: datetime, last: datetime) -> None:
    """Record that ``folder/relative_file`` holds event timestamps within ``[first, last]`` (tz-aware).

    The caller serializes writers of one folder (the platform holds its catalog lock); the file is
    replaced atomically, so readers see the old or the new index.
    """
    record_files_timestamps(folder, {relative_file: (first, last)})


def record_files_timestamps(folder: Path, ranges: dict[str, tuple[datetime, datetime]]) -> None:
    """:func:`record_file_timestamps` for many files at once."""
    index = {name: (low.isoformat(), high.isoformat()) for name, (low, high) in _read_index(folder).items()}
    for relative_file, (first, last) in ranges.items():
        if first.tzinfo is None or last.tzinfo is None:
            raise ValueError(f"{folder / INDEX_FILE}: timestamps of {relative_file} must carry a time zone")
        index[relative_file] = (first.isoformat(), last.isoformat())
    with tempfile.NamedTemporaryFile("w", dir=folder, prefix=f".{INDEX_FILE}.", delete=False) as handle:
        # One json.dumps without indent: the C encoder (an indented dump is pure Python, 10 ms at 2,000 days).
        handle.write(json.dumps(index, sort_keys=True))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, folder / INDEX_FILE)


def parquet_files(folder: Path) -> list[str]:
    """The files DuckDB itself reads for a folder path, ``<folder>/**/*.parquet``, sorted.

    Listed with ``os.walk`` rather than DuckDB's ``glob``, which took 58 ms for 2,000 day folders against
    ~10 ms: the same files (hidden files and folders included, symlinked folders not followed, the suffix
    case-sensitive; ``tests/test_source_index.py`` compares the two on such a folder).
    """
    return sorted(
        os.path.join(root, name) for root, _, names in os.walk(folder) for name in names if name.endswith(".parquet")
    )


def files_in_window(path: str, start: datetime | None, end: datetime | None) -> list[str] | None:
    """The Parquet files of folder ``path`` that may hold timestamps in ``[start, end]``.

    None when ``path`` is not a folder with an index (read it whole, as stock Feast does). Files the
    index does not list are always kept. When no file can match, one file is still returned, so that
    the query keeps the source's schema and finds no row by its own time filter.
    """
    folder = Path(path)
    if not folder.is_dir():
        return None
    index = _read_index(folder)
    if not index:
        return None
    files = parquet_files(folder)
    if not files:
        return None
    prefix = len(os.path.join(str(folder), ""))
    kept = []
    for file in files:
        bounds = index.get(file[prefix:])
        if bounds is None or ((start is None or bounds[1] >= start) and (end is None or bounds[0] <= end)):
            kept.append(file)
    return kept or files[-1:]
