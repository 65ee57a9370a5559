"""P2-load's wrk script: closed loop, and paced at a constant rate as wrk2 does (bench/p2_load.lua).

``wrk`` is Debian's package, installed by ``scripts/bootstrap.sh``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bench.p2_load import write_bodies, wrk


class _Ok(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as wrk's connections expect
    disable_nagle_algorithm = True  # headers and body are two writes: Nagle + delayed ACK would add 40 ms

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200 if self.path == "/ok" else 404)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # wrk resets its connections when a run ends


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    server = _Server(("127.0.0.1", 0), _Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def bodies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bodies(tmp_path_factory.mktemp("p2") / "bodies.jsonl", "rank", pins=5, users=3, pin_pool=10)


def test_paced_run_holds_the_offered_rate_and_reports_its_lateness(url: str, bodies: Path) -> None:
    # 2 threads x 2 connections at 80 req/s for 2 s: a schedule, not a closed loop (which would send thousands).
    paced = wrk(url, "/ok", bodies, connections=4, duration=2.0, max_requests=10_000, rate=80)
    assert paced["errors"] == 0 and paced["paced"] > 0
    assert 0.8 * 80 <= paced["rps"] <= 1.1 * 80, paced
    assert paced["late_max_ms"] >= paced["late_p99_ms"] >= 0


def test_closed_loop_is_not_paced_and_counts_error_statuses(url: str, bodies: Path) -> None:
    closed = wrk(url, "/missing", bodies, connections=2, duration=1.0, max_requests=300)
    assert closed["paced"] == 0 and "kept_up" not in closed
    assert closed["requests"] >= 290 and closed["non_2xx"] == closed["requests"], closed


def test_an_offered_rate_the_server_cannot_hold_is_flagged(url: str, bodies: Path) -> None:
    # One connection and a 1 ms schedule: the schedule slips, and the point says so.
    flooded = wrk(url, "/ok", bodies, connections=1, duration=1.0, max_requests=100_000, rate=100_000)
    assert not flooded["kept_up"] and flooded["late_max_ms"] > 5.0, flooded
