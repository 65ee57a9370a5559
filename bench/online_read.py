"""Online read benchmark (P2): 1 user + N candidate Pins x 64-d, four ways, in one run.

* ``reader``: :class:`derm.serving.embedding_reader.EmbeddingReader` over the four embedding
  families (ctr/cvr user and Pin) -- key encoding, one pipelined HMGET per entity,
  prefix-checked NumPy decode, ``_ts`` parse;
* ``rank``: ``POST /rank`` on loopback (uvicorn in this process): the reader over every
  ranker feature, two rankers (CTR, CVR), JSON in and out;
* ``stock``: Feast's ``get_online_features(...).to_dict()`` for the same embedding refs;
* ``raw``: the limit -- the same HMGETs (same keys and fields) as prebuilt RESP bytes,
  hiredis parse, ``b"".join`` + ``np.frombuffer``, no checks.

Targets: reader p99 <= 1.5x raw p99, reader >= 10x faster than stock.

The benchmark builds its own platform in a temporary folder (synthetic event log,
counting features, four published embedding families, a private redis-server), so it
runs anywhere and never touches ``$DERM_DATA_DIR``. The builder,
:func:`build_platform`, is also what ``tests/test_serving.py`` serves from.

    python -m bench.online_read --pins 500 --requests 300
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from derm.core.naming import COUNTING_VIEWS, PIN_ATTRIBUTES_VIEW
from derm.core.paths import DATA_DIR_ENV, REDIS_CONNECTION_ENV, REDIS_TYPE_ENV, PlatformPaths

FAMILIES = ("ctr_user", "ctr_pin", "cvr_user", "cvr_pin")
PUBLISH_DELAY = timedelta(hours=1)


# ---------------------------------------------------------------------------------------------
# A small, complete platform: event log, counting features, published embeddings, rankers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchPlatform:
    paths: PlatformPaths
    connection_string: str
    users: int
    pins: int
    dim: int
    embedding_day: date
    serving_time: datetime  # an instant at which everything published is fresh (within every TTL)


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def publish_embeddings(
    paths: PlatformPaths, family: str, day: date, ids: np.ndarray, vectors: np.ndarray, config_seed: str
) -> str:
    """Write one snapshot with the upstream refresh's writer and publish it (gate, offline, Redis)."""
    from derm.core.feast_repo import FeatureRepo
    from derm.core.snapshot import read_manifest
    from derm.materialization.publish import publish_snapshot
    from derm.training.upstream.export import snapshot_available_at, write_precomputed_snapshot

    directory = write_precomputed_snapshot(
        paths, family, day, ids, vectors, (config_seed * 64)[:64], publish_delay=PUBLISH_DELAY
    )
    version = read_manifest(directory).model_version
    ts = snapshot_available_at(day, PUBLISH_DELAY)
    publish_snapshot(directory, paths, repo=FeatureRepo(), now=ts + timedelta(hours=1))
    return version


@contextlib.contextmanager
def feast_environment(paths: PlatformPaths, connection_string: str) -> Iterator[None]:
    """Point the Feast repository at ``paths`` and this Redis; restore the previous environment after."""
    names = (DATA_DIR_ENV, REDIS_CONNECTION_ENV, REDIS_TYPE_ENV)
    previous = {name: os.environ.get(name) for name in names}
    os.environ.update({DATA_DIR_ENV: str(paths.data_dir), REDIS_CONNECTION_ENV: connection_string})
    os.environ[REDIS_TYPE_ENV] = "redis"
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def build_platform(
    data_dir: Path,
    connection_string: str,
    *,
    users: int = 200,
    pins: int = 500,
    dim: int = 64,
    start_date: date | None = None,
    log_days: int = 3,
    seed: int = 0,
    stats_dir: Path | None = None,
    events_dir: Path | None = None,
) -> BenchPlatform:
    """Event log, counting features, the four families published at v1 on the log's last day, stats in Redis.

    Must run inside :func:`feast_environment` for the same ``data_dir`` and Redis.
    ``stats_dir``/``events_dir``: reuse an existing event log and its counting features
    (copied) instead of generating them.
    """
    from derm.core.feast_repo import feature_store
    from derm.events.synthetic import SyntheticConfig, generate_event_log
    from derm.materialization.counting_features import build_counting_features

    paths = PlatformPaths(Path(data_dir))
    if events_dir is not None:
        shutil.copytree(events_dir, paths.events_dir, dirs_exist_ok=True)
        log_days = len(list(paths.events_dir.glob("date=*")))
        start_date = min(date.fromisoformat(p.name[5:]) for p in paths.events_dir.glob("date=*"))
    else:
        start_date = start_date or datetime.now(UTC).date() - timedelta(days=log_days)
        config = SyntheticConfig.preset(
            "tiny", n_users=users, n_pins=pins, n_days=log_days, events_per_day=2_000, start_date=start_date
        )
        generate_event_log(config, paths.events_dir)
    if stats_dir is not None:
        shutil.copytree(stats_dir, paths.stats_dir, dirs_exist_ok=True)
    else:
        build_counting_features(paths.events_dir, paths.stats_dir)
    assert start_date is not None
    day = start_date + timedelta(days=log_days - 1)
    rng = np.random.default_rng(seed)
    for family in FAMILIES:
        count = users if family.endswith("_user") else pins
        publish_embeddings(paths, family, day, np.arange(count), unit_vectors(rng, count, dim), "a")
    serving_time = datetime.combine(day + timedelta(days=1), datetime.min.time(), UTC) + 2 * PUBLISH_DELAY
    # The counting features as of serving time; materialize keeps the newest row per entity.
    feature_store().materialize(
        start_date=serving_time - timedelta(days=60),
        end_date=serving_time,
        feature_views=[*COUNTING_VIEWS, PIN_ATTRIBUTES_VIEW],
    )
    return BenchPlatform(paths, connection_string, users, pins, dim, day, serving_time)


def untrained_rankers(store: Any, objectives: tuple[str, ...] = ("ctr", "cvr"), seed: int = 0) -> dict[str, Any]:
    """Real ``derm.training.downstream.ranker.Ranker`` objects on the registered ranker services, with initial weights.

    Serving and its benchmarks only need the scoring path (same cost as a trained model).
    """
    import torch

    from derm.training.downstream.ranker import Ranker, RankerSpec

    rankers = {}
    for objective in objectives:
        service = store.get_feature_service(f"{objective}_ranker")
        refs = [f"{p.name}:{f.name}" for p in service.feature_view_projections for f in p.features]
        versions, dims = {}, {}
        for projection in service.feature_view_projections:
            view = store.get_feature_view(projection.name)
            if "family" in view.tags:
                versions[view.tags["family"]] = view.tags["model_version"]
                dims[view.tags["family"]] = int(view.tags["dim"])
        torch.manual_seed(seed)
        spec = RankerSpec(
            objective=objective,
            feature_service=service.name,
            feature_refs=refs,
            embedding_versions=versions,
            embedding_dims=dims,
        )
        rankers[objective] = Ranker(spec)
    return rankers


# ---------------------------------------------------------------------------------------------
# An in-process HTTP server on loopback
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1") -> Iterator[int]:
    """Run ``app`` with uvicorn on a free loopback port in a thread; yields the port."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def post_json(connection: http.client.HTTPConnection, path: str, body: Any) -> tuple[int, Any]:
    payload = json.dumps(body).encode()
    connection.request("POST", path, body=payload, headers={"content-type": "application/json"})
    response = connection.getresponse()
    data = response.read()
    return response.status, json.loads(data) if data else None


# ---------------------------------------------------------------------------------------------
# The measurements
# ---------------------------------------------------------------------------------------------


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "n": len(ms),
    }


def _timed(fn: Any, repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def _timed_interleaved(functions: dict[str, Any], repeats: int, warmup: int = 5) -> dict[str, list[float]]:
    """Time several functions in alternating order, so background load hits each of them alike."""
    names = list(functions)
    out: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + repeats):
        for name in names if i % 2 == 0 else reversed(names):
            started = time.perf_counter()
            functions[name]()
            if i >= warmup:
                out[name].append(time.perf_counter() - started)
    return out


def raw_reader(reader: Any, refs: list[str]) -> Any:
    """The limit: the reader's own HMGETs as prebuilt bytes, hiredis parse, join + frombuffer, no checks.

    Same keys, same fields (incl. ``_ts``, which the TTL check needs), same round trip; what
    is left out is everything the reader adds on the client: key encoding, prefix checks,
    timestamps, fallbacks.
    """
    from derm.serving.embedding_reader import _LIST_ELEMENT, vector_prefix

    def prepare(entities: dict[str, np.ndarray]) -> tuple[bytes, int, list[tuple[int, list[tuple[int, Any]]]]]:
        payload, layout, total = [], [], 0
        for join_key, plan in reader.plans.items():
            keys = reader.redis_keys(join_key, entities[join_key])
            payload.append(reader.hmget_payload(join_key, keys))
            wanted = []
            for view in plan.views:
                for feature in view.features:
                    if view.ref(feature) in refs and feature.dim:
                        wanted.append((plan.fields.index(view.field(feature)), (view, feature)))
            layout.append((len(keys), wanted))
            total += len(keys)
        return b"".join(payload), total, layout

    def read(prepared: tuple[bytes, int, list]) -> dict[str, np.ndarray]:
        payload, total, layout = prepared
        replies = reader.redis.execute_packed(payload, total)
        out, offset = {}, 0
        for count, wanted in layout:
            rows = replies[offset : offset + count]
            offset += count
            for position, (view, feature) in wanted:
                prefix = len(vector_prefix(feature.value_type, feature.dim))
                dtype = _LIST_ELEMENT[feature.value_type][1]
                block = np.frombuffer(b"".join([row[position] or b"" for row in rows]), np.uint8)
                out[view.ref(feature)] = block.reshape(-1, prefix + feature.dim * 4)[:, prefix:].copy().view(dtype)
        return out

    return prepare, read


def measure(
    platform: BenchPlatform, requests: int, pins: int, stock_requests: int | None = None, user_id: int = 3
) -> dict[str, Any]:
    """All four measurements against a built platform (inside its :func:`feast_environment`)."""
    from derm.core.feast_repo import feature_store
    from derm.serving.embedding_reader import EmbeddingReader
    from derm.serving.http_api import create_app
    from derm.serving.service import RankingService

    store = feature_store()
    rankers = untrained_rankers(store)
    embedding_refs = [ref for ref in rankers["ctr"].feature_refs if ref.split(":")[1].endswith("_emb")]
    rng = np.random.default_rng(1)
    pin_ids = rng.choice(platform.pins, size=min(pins, platform.pins), replace=False).astype(np.int64)
    if pins > platform.pins:  # more candidates than Pins: the rest are unknown ids (read as missing)
        pin_ids = np.concatenate([pin_ids, np.arange(platform.pins, pins, dtype=np.int64) + 10**9])
    entities = {"user_id": np.array([user_id], dtype=np.int64), "pin_id": pin_ids}

    reader = EmbeddingReader.for_features(store, embedding_refs, enforce_ttl=True)
    results: dict[str, Any] = {"pins": len(pin_ids), "dim": platform.dim, "families": len(embedding_refs)}

    prepare, read_raw = raw_reader(reader, embedding_refs)
    prepared = prepare(entities)
    raw = read_raw(prepared)
    check = reader.read(entities, now=platform.serving_time)
    for ref, matrix in raw.items():  # the limit reads the same bytes the reader decodes
        assert check.found[ref].all(), f"{ref}: the raw path assumes every entity is stored"
        np.testing.assert_array_equal(matrix, check.columns[ref])
    timings = _timed_interleaved(
        {"reader": lambda: reader.read(entities, now=platform.serving_time), "raw": lambda: read_raw(prepared)},
        requests,
    )
    results["reader"] = _percentiles(timings["reader"])
    results["raw"] = _percentiles(timings["raw"])

    rows = [{"user_id": user_id, "pin_id": int(p)} for p in pin_ids]
    stock_n = stock_requests or max(3, min(requests, 50))
    results["stock"] = _percentiles(
        _timed(lambda: store.get_online_features(features=embedding_refs, entity_rows=rows).to_dict(), stock_n, 1)
    )

    service = RankingService(store, rankers, settings=None)
    body = {"user_id": user_id, "pin_ids": pin_ids.tolist()}
    with serve_in_thread(create_app(service)) as port:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

        def rank() -> None:
            status, _ = post_json(connection, "/rank", body)
            assert status == 200, status

        results["rank"] = _percentiles(_timed(rank, requests))
        connection.close()

    results["reader_p99_over_raw_p99"] = round(results["reader"]["p99_ms"] / results["raw"]["p99_ms"], 2)
    results["stock_p50_over_reader_p50"] = round(results["stock"]["p50_ms"] / results["reader"]["p50_ms"], 1)
    results["stock_p99_over_reader_p99"] = round(results["stock"]["p99_ms"] / results["reader"]["p99_ms"], 1)
    results["targets_met"] = {
        "reader_p99_le_1.5x_raw": results["reader_p99_over_raw_p99"] <= 1.5,
        "reader_ge_10x_faster_than_stock": results["stock_p50_over_reader_p50"] >= 10,
    }
    return results


@contextlib.contextmanager
def bench_platform(pins: int, dim: int = 64, users: int = 200) -> Iterator[BenchPlatform]:
    """A throwaway platform (temp folder + private redis-server) for a benchmark run."""
    from derm.infra.redis_server import LocalRedisServer

    with tempfile.TemporaryDirectory(prefix="derm-bench-") as tmp:
        paths = PlatformPaths(Path(tmp))
        with LocalRedisServer(paths.redis_dir, persist=False) as server:
            with feast_environment(paths, server.connection_string):
                yield build_platform(paths.data_dir, server.connection_string, users=users, pins=pins, dim=dim)


def run(pins: int = 500, requests: int = 200) -> dict[str, Any]:
    """Build a platform with ``pins`` Pins (64-d) and time ``requests`` reads of 1 user + ``pins`` Pins each way."""
    with bench_platform(pins=max(pins, 20)) as platform:
        return measure(platform, requests=requests, pins=pins)


def main() -> None:  # pragma: no cover - command line
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pins", type=int, default=500)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    print(json.dumps(run(args.pins, args.requests), indent=2))


if __name__ == "__main__":  # pragma: no cover
    main()
