"""The timestamp index of a folder source only skips files, never rows (issue 11: publish cost vs history).

With an index, the ASOF store reads only the files whose timestamps can meet the entity rows, and
``pull_latest_from_table_or_query`` only those in its window: the results must stay exactly the
stock DuckDB store's, which reads every file.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from derm.feast_plugins.asof_offline_store import AsofDuckDBOfflineStore
from derm.feast_plugins.source_index import INDEX_FILE, files_in_window, record_file_timestamps
from tests.test_asof_offline_store import (
    BASE,
    HOURS,
    FeastKit,
    assert_same,
    build_case,
    kit,  # noqa: F401  (the session's Feast objects)
    retrieval_cases,
    retrieve_both,
)


def index_folder(folder: Path, *, leave_out: int | None = None) -> list[str]:
    """Record every non-empty file's true timestamp range; ``leave_out``: one file the index does not list."""
    recorded = []
    for number, file in enumerate(sorted(folder.glob("date=*/data.parquet"))):
        stamps = pq.read_table(file, columns=["event_timestamp"]).column("event_timestamp")
        if len(stamps) == 0 or number == leave_out:
            continue
        low, high = (value.as_py() for value in pc.min_max(stamps).values())
        record_file_timestamps(folder, str(file.relative_to(folder)), low.astimezone(UTC), high.astimezone(UTC))
        recorded.append(str(file))
    return recorded


def test_files_in_window_keeps_overlapping_and_unlisted_files(tmp_path: Path) -> None:
    import pyarrow as pa

    for day in range(4):
        (tmp_path / f"date=2026-01-0{day + 1}").mkdir()
        pq.write_table(pa.table({"x": [day]}), tmp_path / f"date=2026-01-0{day + 1}" / "data.parquet")
    assert files_in_window(str(tmp_path), None, None) is None, "no index: read the folder as stock does"
    for day in range(3):  # the fourth file is not indexed
        stamp = datetime(2026, 1, day + 2, 1, tzinfo=UTC)
        record_file_timestamps(tmp_path, f"date=2026-01-0{day + 1}/data.parquet", stamp, stamp)
    assert (tmp_path / INDEX_FILE).exists()

    def names(files: list[str] | None) -> list[str]:
        return [Path(f).parent.name for f in files or []]

    start, end = datetime(2026, 1, 3, tzinfo=UTC), datetime(2026, 1, 3, 2, tzinfo=UTC)
    window = names(files_in_window(str(tmp_path), start, end))
    assert window == ["date=2026-01-02", "date=2026-01-04"], "the file stamped in the window and the unlisted one"
    assert names(files_in_window(str(tmp_path), datetime(2026, 1, 2, 1, tzinfo=UTC), None)) == [
        "date=2026-01-01", "date=2026-01-02", "date=2026-01-03", "date=2026-01-04"
    ]  # fmt: skip
    # Bounds are inclusive: a file stamped exactly at the end of the window is read.
    assert "date=2026-01-01" in names(files_in_window(str(tmp_path), None, datetime(2026, 1, 2, 1, tzinfo=UTC)))


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=retrieval_cases(), leave_out=st.one_of(st.none(), st.integers(0, 3)))
def test_indexed_sources_give_the_stock_result(kit: FeastKit, case: dict, leave_out: int | None) -> None:  # noqa: F811
    views, refs, entity_df = build_case(kit, case)
    for view in views:
        index_folder(Path(view.batch_source.path), leave_out=leave_out)
    assert_same(*retrieve_both(kit, views, refs, entity_df, case["full_feature_names"]))


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    case=retrieval_cases(),
    start_hour=st.integers(-2, HOURS + 2),
    length_hours=st.integers(0, 12),
    leave_out=st.one_of(st.none(), st.integers(0, 3)),
)
def test_pull_latest_over_an_indexed_source_gives_the_stock_rows(
    kit: FeastKit,  # noqa: F811
    case: dict,
    start_hour: int,
    length_hours: int,
    leave_out: int | None,
) -> None:
    views, _, _ = build_case(kit, case)
    start = BASE + timedelta(hours=start_hour)
    end = start + timedelta(hours=length_hours)
    for view in views:
        source = view.batch_source
        index_folder(Path(source.path), leave_out=leave_out)
        keys = [column.name for column in view.entity_columns]
        keys = [next((k for k, v in source.field_mapping.items() if v == key), key) for key in keys]
        features = [field.name for field in view.features]
        features = [next((k for k, v in source.field_mapping.items() if v == f), f) for f in features]
        args = (kit.config, source, keys, features, "event_timestamp", source.created_timestamp_column or None,
                start, end)  # fmt: skip
        ours = AsofDuckDBOfflineStore.pull_latest_from_table_or_query(*args).to_arrow()
        stock = kit.stock.pull_latest_from_table_or_query(*args).to_arrow()
        order = [(key, "ascending") for key in keys]
        assert ours.sort_by(order).to_pylist() == stock.sort_by(order).to_pylist()


def test_parquet_files_are_the_files_duckdb_reads_for_the_folder(tmp_path: Path) -> None:
    """The index lists with os.walk; the files must be exactly DuckDB's ``<folder>/**/*.parquet``."""
    from derm.feast_plugins.duckdb_sql import connect, glob_escape
    from derm.feast_plugins.source_index import parquet_files

    folder = tmp_path / "odd [name]?"
    for relative in (
        "top.parquet",
        "date=2026-01-01/data.parquet",
        "date=2026-01-01/.hidden.parquet",
        ".staging/date=2026-01-02/data.parquet",
        "a/b/c/deep.parquet",
        "date=2026-01-03/data.PARQUET",
        "date=2026-01-03/notes.parquet.json",
        INDEX_FILE,
    ):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(b"")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "linked.parquet").write_bytes(b"")
    (folder / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (folder / "file_link.parquet").symlink_to(folder / "top.parquet")
    with connect() as con:
        pattern = str(Path(glob_escape(str(folder))) / "**" / "*.parquet")
        duckdb_files = [
            row[0] for row in con.execute("SELECT file FROM glob($p) ORDER BY file", {"p": pattern}).fetchall()
        ]
    assert parquet_files(folder) == duckdb_files
    assert len(duckdb_files) == 6  # the case above really has hidden files and folders, and skips the others
