"""The benchmark runner writes its report; each workload's own smoke run lives beside the code it measures."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench.__main__ import WORKLOADS, main, sizes_for, write_chart, write_markdown


def test_runner_writes_json_markdown_and_chart(tmp_path: Path) -> None:
    results = main(["--smoke", "--only", "export", "--only", "P4", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["workload"] for r in saved] == ["export", "P4"] == [r["workload"] for r in results]
    p4 = saved[1]
    assert p4["cores"] >= 1 and p4["sizes"] == {"rows": 5_000, "repeats": 1} and p4["date"]
    [ratio] = p4["ratios"]
    assert ratio["value"] == p4["result"]["ratio"] > 0 and ratio["target"] == 0.8
    report = (tmp_path / "RESULTS.md").read_text()
    assert "DataLoader / in-memory" in report and "ratios.png" in report
    assert (tmp_path / "ratios.png").read_bytes().startswith(b"\x89PNG")


def test_scale_multiplies_only_data_sizes() -> None:
    p3 = next(w for w in WORKLOADS if w.name == "P3")
    scaled = sizes_for(p3, scale=10, smoke=False)
    assert scaled["events"] == 10 * p3.sizes["events"] and scaled["repeats"] == p3.sizes["repeats"]
    assert scaled["days"] == p3.sizes["days"]


def test_a_store_left_out_renders_as_a_dash_not_none(tmp_path: Path) -> None:
    # P3-scale with stores=ray_store: no single-node figures, no ratio, nothing to chart.
    result = {
        "workload": "P3-scale", "title": "t", "sizes": {"stores": ["ray_store"]}, "cores": 2, "date": "d",
        "figures": {"Ray store s": 1.5, "single-node store s": None},
        "ratios": [{"name": "Ray / single-node seconds", "key": "k", "value": None, "target": 1.5,
                    "higher_is_better": False, "met": None}],
        "result": {},
    }  # fmt: skip
    assert write_chart([result], tmp_path / "ratios.png") is None
    write_markdown([result], tmp_path / "RESULTS.md", None)
    report = (tmp_path / "RESULTS.md").read_text()
    assert "| single-node store s | — |" in report and "| Ray / single-node seconds | — | <= 1.5 | n/a |" in report
    assert "None" not in report


def test_p3_scale_fingerprint_covers_every_family(tmp_path: Path) -> None:
    """The DuckDB fingerprint of the Ray store's files equals the in-memory one, per family, nulls included."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.historical_retrieval_ray import FAMILY_SETS, _parquet_summary, _table_summary

    families = FAMILY_SETS[4]
    vectors = pa.array([[1.0, 2.0], None, [0.5, -4.0]], pa.list_(pa.float32()))
    table = pa.table({f"{family}_emb": vectors if i % 2 else vectors[::-1] for i, family in enumerate(families)})
    table = table.set_column(2, "cvr_user_emb", pa.array([None, None, [3.0, 3.0]], pa.list_(pa.float32())))
    pq.write_table(table.slice(0, 2), tmp_path / "a.parquet")
    pq.write_table(table.slice(2), tmp_path / "b.parquet")
    from_files = _parquet_summary([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], families)
    in_memory = _table_summary(table, families)
    assert from_files == in_memory
    assert in_memory["rows"] == 3 and in_memory["cvr_user_emb_nulls"] == 2 and in_memory["cvr_user_emb_sum"] == 6.0
    assert in_memory["vector_bytes"] == (2 + 2 + 1 + 2) * 2 * 4


def test_set_overrides_a_size_after_scale() -> None:
    from bench.__main__ import _size_override

    assert _size_override("repeats=3") == ("repeats", 3)
    assert _size_override("stores=ray_store") == ("stores", "ray_store")
    assert _size_override("stores=asof_store,ray_store") == ("stores", "asof_store,ray_store")
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        _size_override("repeats")
