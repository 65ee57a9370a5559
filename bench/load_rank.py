"""Bounded load test of ``POST /rank`` on loopback: throughput, p50/p99 latency, errors.

At most ``requests`` requests and at most ``duration`` seconds, from ``concurrency``
client threads with keep-alive connections; every non-200 answer or transport error
counts as an error (the target is 0).

By default the server runs in this process (uvicorn thread, on a throwaway platform
built by :mod:`bench.online_read`), so clients and server share the GIL and the
throughput is a lower bound; ``--url`` points the clients at a running ``derm serve``
instead. The benchmark of record is :mod:`bench.p2_load` (workload ``P2-load``):
``derm serve --workers N`` as its own process under ``wrk``, side by side with
``feast serve``; this module stays as a quick check without ``wrk``.

    python -m bench.load_rank --requests 2000 --duration 30 --concurrency 8 --pins 100
    python -m bench.load_rank --url http://127.0.0.1:8000 --users 200 --pin-pool 80
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import numpy as np


def load(
    host: str,
    port: int,
    *,
    requests: int,
    duration: float,
    concurrency: int,
    pins: int,
    users: int,
    pin_pool: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Send at most ``requests`` /rank requests within ``duration`` seconds; report what happened."""
    lock = threading.Lock()
    sent = 0
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + duration

    def client(worker: int) -> None:
        nonlocal sent
        rng = np.random.default_rng(seed + worker)
        connection = http.client.HTTPConnection(host, port, timeout=10)
        try:
            while time.monotonic() < deadline:
                with lock:
                    if sent >= requests:
                        return
                    sent += 1
                body = json.dumps(
                    {
                        "user_id": int(rng.integers(users)),
                        "pin_ids": rng.choice(pin_pool, size=min(pins, pin_pool), replace=False).tolist(),
                    }
                ).encode()
                started = time.perf_counter()
                try:
                    connection.request("POST", "/rank", body=body, headers={"content-type": "application/json"})
                    response = connection.getresponse()
                    response.read()
                    status = response.status
                except (OSError, http.client.HTTPException) as error:
                    connection.close()
                    connection = http.client.HTTPConnection(host, port, timeout=10)
                    with lock:
                        errors.append(f"{type(error).__name__}: {error}")
                    continue
                elapsed = time.perf_counter() - started
                with lock:
                    if status == 200:
                        latencies.append(elapsed)
                    else:
                        errors.append(f"HTTP {status}")
        finally:
            connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=duration + 15)  # a request in flight at the deadline may still finish
    wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1e3 if latencies else np.zeros(1)
    return {
        "requests": sent,
        "ok": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:5],
        "seconds": round(wall, 2),
        "throughput_rps": round(len(latencies) / wall, 1) if wall else 0.0,
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "concurrency": concurrency,
        "pins_per_request": pins,
    }


def run(
    requests: int = 1000,
    duration: float = 30.0,
    concurrency: int = 8,
    pins: int = 100,
    url: str | None = None,
    users: int = 200,
    pin_pool: int = 500,
) -> dict[str, Any]:
    """The load test, against ``url`` or a server started here on a throwaway platform."""
    if url:
        parts = urlsplit(url)
        return load(
            parts.hostname or "127.0.0.1",
            parts.port or 80,
            requests=requests,
            duration=duration,
            concurrency=concurrency,
            pins=pins,
            users=users,
            pin_pool=pin_pool,
        )
    import torch

    from bench.online_read import bench_platform, serve_in_thread, untrained_rankers
    from derm.core.feast_repo import feature_store
    from derm.serving.http_api import create_app
    from derm.serving.service import RankingService

    torch.set_num_threads(1)  # as `derm serve` does: requests run in parallel, one intra-op thread each

    with bench_platform(pins=pin_pool, users=users) as platform:
        store = feature_store()
        service = RankingService(store, untrained_rankers(store))
        with serve_in_thread(create_app(service)) as port:
            return load(
                "127.0.0.1",
                port,
                requests=requests,
                duration=duration,
                concurrency=concurrency,
                pins=pins,
                users=platform.users,
                pin_pool=platform.pins,
            )


def main() -> None:  # pragma: no cover - command line
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--pins", type=int, default=100, help="candidate Pins per request")
    parser.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000 (default: start one here)")
    parser.add_argument("--users", type=int, default=200, help="user ids are drawn from [0, users)")
    parser.add_argument("--pin-pool", type=int, default=500, help="Pin ids are drawn from [0, pin_pool)")
    args = parser.parse_args()
    result = run(args.requests, args.duration, args.concurrency, args.pins, args.url, args.users, args.pin_pool)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":  # pragma: no cover
    main()
