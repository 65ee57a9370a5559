"""Run every benchmark workload side by side with its baselines and write the performance report.

Each workload runs the project and its baselines in the same run, repeated, and
reports medians and ratios (the machine is shared and noisy: absolute times are
not comparable between runs, ratios within one run are). Output:

* ``bench/results.json``: one object per workload (figures, ratios and their
  targets, sizes, date, core count, the workload's full result);
* ``bench/RESULTS.md``: a table a person reads, and ``bench/ratios.png``.

Usage::

    python -m bench                       # defaults sized for a 2-core, 24 GB machine
    python -m bench --scale 10            # 10x the data on a bigger box
    python -m bench --only P1 --only P4   # a subset
    python -m bench --smoke               # tiny sizes: checks the workloads still run (used by the tests)
    python -m bench --only P3-scale --set repeats=3 --set stores=ray_store   # override sizes (after --scale)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Ratio:
    """A ratio the workload reports, and the issue's target for it."""

    key: str  # path in the result, dotted
    label: str
    target: float
    higher_is_better: bool = True


@dataclass(frozen=True)
class Workload:
    name: str  # P1..P4 or a short id
    title: str
    module: str  # bench.<module> with run(**sizes) -> dict
    sizes: dict[str, Any]  # defaults for a 2-core, 24 GB machine
    smoke: dict[str, Any]  # seconds-long sizes, for the tests
    scaled: tuple[str, ...]  # size parameters that grow with --scale
    figures: tuple[tuple[str, str], ...]  # (dotted key, label) shown in the table
    ratios: tuple[Ratio, ...] = field(default_factory=tuple)


WORKLOADS: tuple[Workload, ...] = (
    Workload(
        name="export",
        title="Upstream daily inference export, single process vs Ray Data (embeddings/s)",
        module="bench.export_throughput",
        sizes=dict(entities=1_000_000, repeats=3, ray_workers=2, num_cpus=2),
        smoke=dict(entities=2_000, repeats=1, ray_workers=None),  # the Ray path: tests/test_ray_export.py
        scaled=("entities",),
        figures=(
            ("user_embeddings_per_s", "user embeddings/s, single process"),
            ("pin_embeddings_per_s", "Pin embeddings/s, single process"),
            ("ray_user_embeddings_per_s", "user embeddings/s, Ray Data (2 tasks)"),
            ("ray_pin_embeddings_per_s", "Pin embeddings/s, Ray Data (2 tasks)"),
            ("ray_over_local_user", "Ray / single process, users"),
            ("ray_over_local_pin", "Ray / single process, Pins"),
        ),
    ),
    Workload(
        name="P1",
        title="Materialize 64-d embeddings into Redis (rows/s)",
        module="bench.materialize_redis",
        sizes=dict(rows=1_000_000, stock_rows=100_000, repeats=3),
        smoke=dict(rows=2_000, stock_rows=500, repeats=1),
        scaled=("rows", "stock_rows"),
        figures=(
            ("fast_rows_per_s", "fast path rows/s"),
            ("raw_rows_per_s", "raw redis-py HSET rows/s"),
            ("stock_rows_per_s", "stock feast materialize rows/s"),
        ),
        ratios=(
            Ratio("fast_over_raw", "fast / raw HSET", 0.7),
            Ratio("fast_over_stock", "fast / stock Feast", 10.0),
        ),
    ),
    Workload(
        name="P1-cluster",
        title="Materialize 64-d embeddings into a 3-master Redis Cluster (rows/s)",
        module="bench.materialize_cluster",
        sizes=dict(rows=1_000_000, stock_rows=50_000, repeats=3),
        smoke=dict(rows=2_000, stock_rows=300, repeats=1),
        scaled=("rows", "stock_rows"),
        figures=(
            ("fast_rows_per_s", "fast path (slot-grouped RESP per master) rows/s"),
            ("ray_engine_rows_per_s", "Ray engine (slot-range slices in Ray tasks, 2 CPUs) rows/s"),
            ("ray_over_fast", "Ray engine / fast path"),
            ("ray_over_stock", "Ray engine / stock Feast"),
            ("redis_py_cluster_rows_per_s", "redis-py cluster pipelines rows/s"),
            ("stock_rows_per_s", "stock feast materialize rows/s (at stock_rows)"),
        ),
        ratios=(Ratio("fast_over_redis_py_cluster", "fast / redis-py cluster pipelines", 1.0),),
    ),
    Workload(
        name="P2",
        title="Online read: 1 user + 500 Pins x 64-d (latency)",
        module="bench.online_read",
        sizes=dict(pins=500, requests=300),
        smoke=dict(pins=20, requests=5),
        scaled=("requests",),
        figures=(
            ("reader.p50_ms", "vectorized reader p50 ms"),
            ("reader.p99_ms", "vectorized reader p99 ms"),
            ("raw.p99_ms", "raw HMGET + decode p99 ms"),
            ("stock.p99_ms", "stock get_online_features p99 ms"),
            ("rank.p99_ms", "/rank p99 ms"),
        ),
        ratios=(
            Ratio("reader_p99_over_raw_p99", "reader p99 / raw p99", 1.5, higher_is_better=False),
            Ratio("stock_p50_over_reader_p50", "stock p50 / reader p50", 10.0),
        ),
    ),
    Workload(
        name="P2-load",
        title="External load (wrk, loopback): derm serve /rank vs feast serve, same workers, Redis, registry",
        module="bench.p2_load",
        sizes=dict(duration=5.0, rate_duration=20.0, max_requests=20_000, workers=2),
        smoke=dict(duration=1.0, rate_duration=1.0, max_requests=200, workers=1, chart=None),
        scaled=("max_requests",),
        figures=(
            ("rank100.max_rps_at_p99_50ms", "/rank 100 Pins: max req/s at p99 <= 50 ms"),
            ("rank500.max_rps_at_p99_50ms", "/rank 500 Pins: max req/s at p99 <= 50 ms"),
            ("feast100.max_rps_at_p99_50ms", "feast serve 100 Pins: max req/s at p99 <= 50 ms"),
            ("rank100.at_rate.50.p99_ms", "/rank 100 Pins p99 ms at 50 req/s offered"),
            ("rank100.at_rate.100.p99_ms", "/rank 100 Pins p99 ms at 100 req/s offered"),
            ("rank100.at_rate.200.p99_ms", "/rank 100 Pins p99 ms at 200 req/s offered"),
            ("rank100.at_rate.400.p99_ms", "/rank 100 Pins p99 ms at 400 req/s offered"),
            ("rank500.at_rate.100.p99_ms", "/rank 500 Pins p99 ms at 100 req/s offered"),
            ("feast100.at_rate.50.p99_ms", "feast serve 100 Pins p99 ms at 50 req/s offered"),
            ("feast100.at_rate.100.p99_ms", "feast serve 100 Pins p99 ms at 100 req/s offered"),
            ("p99_budget_ms", "same-p99 budget ms (50, or feast's best p99 if above)"),
            ("rank100_rps_at_budget", "/rank 100 Pins req/s within the budget"),
            ("feast100_rps_at_budget", "feast serve 100 Pins req/s within the budget"),
            ("peak_throughput_ratio_100", "peak req/s ratio /rank / feast serve (any p99)"),
            ("rank100.server_cpu_ms_per_request", "/rank 100 Pins: server CPU ms per request"),
            ("feast100.server_cpu_ms_per_request", "feast serve 100 Pins: server CPU ms per request"),
        ),
        ratios=(
            Ratio("throughput_ratio_100", "/rank / feast serve req/s at the same p99 (100 Pins)", 5.0),
            Ratio("rank100_p99_ms_at_100rps", "/rank 100 Pins p99 ms at 100 req/s", 20.0, higher_is_better=False),
        ),
    ),
    Workload(
        name="P3",
        title="Point-in-time historical retrieval (seconds, peak RSS)",
        module="bench.historical_retrieval",
        sizes=dict(events=1_000_000, entities=20_000, days=30, repeats=2, stock_events=1_000_000),
        smoke=dict(events=2_000, entities=50, days=3, repeats=1, stock_events=2_000),
        scaled=("events", "entities", "stock_events"),
        figures=(
            ("asof_store.seconds", "ASOF offline store s"),
            ("handwritten_asof.seconds", "hand-written DuckDB ASOF s"),
            ("stock_store.seconds", "stock Feast DuckDB store s (at stock_events)"),
            ("asof_store.peak_rss_mb", "ASOF store peak RSS MB"),
            ("stock_store.peak_rss_mb", "stock store peak RSS MB"),
        ),
        ratios=(
            Ratio("asof_vs_handwritten", "ASOF store / hand-written", 1.3, higher_is_better=False),
            Ratio("stock_vs_asof", "stock / ASOF store (same size)", 5.0),
        ),
    ),
    Workload(
        name="P3-scale",
        title="Point-in-time retrieval on Ray (local, 2 workers) vs the single-node ASOF store (s, driver peak RSS)",
        module="bench.historical_retrieval_ray",
        sizes=dict(events=1_000_000, entities=20_000, days=30, repeats=1, num_cpus=2, buckets=8, families=4),
        smoke=dict(events=2_000, entities=50, days=3, repeats=1, num_cpus=2, buckets=2, families=4),
        scaled=("events", "entities"),
        figures=(
            ("ray_store.seconds", "Ray ASOF store s (result to Parquet)"),
            ("asof_store.seconds", "single-node ASOF store s (result in memory)"),
            ("ray_store.peak_rss_mb", "Ray store driver peak RSS MB"),
            ("ray_store.baseline_rss_mb", "Ray store driver RSS MB before the call"),
            ("asof_store.peak_rss_mb", "single-node store peak RSS MB"),
            ("result_vector_mb", "result vectors MB"),
        ),
        ratios=(Ratio("ray_over_asof_seconds", "Ray / single-node seconds", 1.5, higher_is_better=False),),
    ),
    Workload(
        name="P4",
        title="Downstream training input (samples/s)",
        module="bench.dataloader",
        sizes=dict(rows=1_000_000, repeats=5),
        smoke=dict(rows=5_000, repeats=1),
        scaled=("rows",),
        figures=(("loader_samples_per_s", "DataLoader samples/s"), ("in_memory_samples_per_s", "in-memory samples/s")),
        ratios=(Ratio("ratio", "DataLoader / in-memory", 0.8),),
    ),
    Workload(
        name="publish-history",
        title="Publish one small snapshot after 10 vs 2,000 earlier published days (seconds)",
        module="bench.publish_history",
        sizes=dict(short_history=10, long_history=2_000, publishes=5),
        smoke=dict(short_history=2, long_history=4, publishes=2, entities=50),
        scaled=("long_history",),
        figures=(
            ("short_publish_s", "publish s, 10 earlier days"),
            ("long_publish_s", "publish s, 2,000 earlier days"),
            ("first_publish_s.long", "first publish s after 2,000 results (prunes to the retention)"),
        ),
        ratios=(Ratio("long_over_short", "publish s, 2,000 / 10 earlier days", 1.2, higher_is_better=False),),
    ),
)


def _get(result: dict, dotted: str) -> Any:
    value: Any = result
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def run_workload(workload: Workload, sizes: dict[str, Any]) -> dict[str, Any]:
    run: Callable[..., dict] = importlib.import_module(workload.module).run
    started = time.perf_counter()
    result = run(**sizes)
    ratios = []
    for ratio in workload.ratios:
        value = _get(result, ratio.key)
        met = None if value is None else (value >= ratio.target if ratio.higher_is_better else value <= ratio.target)
        ratios.append(
            {"name": ratio.label, "key": ratio.key, "value": value, "target": ratio.target,
             "higher_is_better": ratio.higher_is_better, "met": met}
        )  # fmt: skip
    return {
        "workload": workload.name,
        "title": workload.title,
        "sizes": sizes,
        "figures": {label: _get(result, key) for key, label in workload.figures},
        "ratios": ratios,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "result": result,
    }


def sizes_for(workload: Workload, scale: float, smoke: bool) -> dict[str, Any]:
    if smoke:
        return dict(workload.smoke)
    return {k: (type(v)(v * scale) if k in workload.scaled else v) for k, v in workload.sizes.items()}


def _size_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--set``; the value as JSON when it parses (``3``, ``0.5``, ``null``), else as text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _fmt(value: Any) -> str:
    if value is None:  # a figure or ratio of a store the run left out (e.g. P3-scale with stores=ray_store)
        return "—"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


NOTES_DIR = BENCH_DIR / "notes"


def _notes(workload: str) -> list[str]:
    """The hand-written conditions of a workload's last run (``bench/notes/<name>.md``), kept across runs."""
    note = NOTES_DIR / f"{workload}.md"
    return [note.read_text().strip(), ""] if note.exists() else []


def write_markdown(results: list[dict[str, Any]], path: Path, chart: Path | None) -> None:
    lines = [
        "# Performance report",
        "",
        "Written by `python -m bench`. Each workload runs the project and its baselines in the same run; "
        "figures are medians of repeats, and only the ratios are comparable between runs (shared, noisy machine).",
        "",
    ]
    for r in results:
        sizes = ", ".join(f"{k}={_fmt(v)}" for k, v in r["sizes"].items())
        lines += [f"## {r['workload']}: {r['title']}", "", f"{sizes}; {r['cores']} cores; {r['date']}", ""]
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {label} | {_fmt(value)} |" for label, value in r["figures"].items()]
        if r["ratios"]:
            lines += ["", "| ratio | value | target | met |", "|---|---|---|---|"]
            for q in r["ratios"]:
                bound = ">=" if q["higher_is_better"] else "<="
                met = {True: "yes", False: "**no**", None: "n/a"}[q["met"]]
                lines.append(f"| {q['name']} | {_fmt(q['value'])} | {bound} {q['target']} | {met} |")
        if isinstance(r["result"], dict) and r["result"].get("chart"):  # a workload's own chart
            lines += ["", f"![{r['workload']}]({r['result']['chart']})"]
        lines += ["", *_notes(r["workload"])]
    measured = {r["workload"] for r in results}
    for workload in WORKLOADS:  # notes of workloads measured outside this results.json (by their module)
        if workload.name not in measured and _notes(workload.name):
            lines += [f"## {workload.name}: {workload.title}", "", *_notes(workload.name)]
    if chart is not None:
        lines += [f"![ratios against their targets]({chart.name})", ""]
    path.write_text("\n".join(lines))


def write_chart(results: list[dict[str, Any]], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [
        (
            f"{r['workload']}: {q['name']}",
            q["value"] / q["target"] if q["higher_is_better"] else q["target"] / q["value"],
        )
        for r in results
        for q in r["ratios"]
        if q["value"]
    ]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(bars) + 1.5))
    labels, values = zip(*bars, strict=True)
    ax.barh(labels, values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("ratio / target (>= 1: target met)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description="Run the benchmark workloads and write bench/RESULTS.md")
    parser.add_argument("--only", action="append", choices=[w.name for w in WORKLOADS], help="workloads to run")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the data sizes (10 on a bigger box)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check every workload still runs")
    parser.add_argument(
        "--set", action="append", type=_size_override, default=[], metavar="KEY=VALUE", dest="overrides",
        help="a size parameter of every selected workload, after --scale/--smoke (e.g. repeats=3)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=BENCH_DIR, help="folder for results.json, RESULTS.md, ratios.png")
    args = parser.parse_args(argv)
    selected = [w for w in WORKLOADS if not args.only or w.name in args.only]
    results = []
    for workload in selected:
        sizes = {**sizes_for(workload, args.scale, args.smoke), **dict(args.overrides)}
        print(f"== {workload.name}: {workload.title} {sizes}", flush=True)
        results.append(run_workload(workload, sizes))
        for q in results[-1]["ratios"]:
            print(f"   {q['name']}: {_fmt(q['value'])} (target {q['target']}, met: {q['met']})", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    if args.only and results_path.exists():
        # A partial run updates its workloads and keeps the others' last results in the report.
        fresh = {r["workload"]: r for r in results}
        kept = {r["workload"]: r for r in json.loads(results_path.read_text())}
        merged = {**kept, **fresh}
        results = [merged[w.name] for w in WORKLOADS if w.name in merged]
    results_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    chart = write_chart(results, args.out / "ratios.png")
    write_markdown(results, args.out / "RESULTS.md", chart)
    print(f"wrote {args.out / 'RESULTS.md'}")
    return results


if __name__ == "__main__":
    main()
