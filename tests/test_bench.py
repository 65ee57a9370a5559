"""The benchmark runner writes its report; each workload's own smoke run lives beside the code it measures."""

from __future__ import annotations

import json
from pathlib import Path

from bench.__main__ import WORKLOADS, main, sizes_for


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
