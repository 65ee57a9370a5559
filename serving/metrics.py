"""Prometheus metrics of the serving HTTP API (``GET /metrics``, prometheus-client).

Every :func:`derm.serving.http_api.create_app` gets its own :class:`ServingMetrics`
(its own registry, so several apps in one process, as in the tests, do not clash).
Under ``derm serve --workers N`` the workers are separate processes: the command sets
``PROMETHEUS_MULTIPROC_DIR`` before they start, each worker writes its samples there
and ``/metrics`` (answered by any worker) aggregates all of them
(``prometheus_client.multiprocess``).

Metrics (all prefixed ``derm_``):

* ``http_requests_total{endpoint,method,status}``, ``http_request_seconds{endpoint,status}``
  (histogram): every request, refused ones included;
* ``redis_read_seconds``, ``model_seconds{objective}``, ``ann_seconds`` (histograms): the
  stages of a /rank or /retrieve request;
* ``candidates_per_request{endpoint}`` (histogram): Pins scored or retrieved;
* ``embedding_version_served{objective,family,version}``: 1 for every (ranker, family,
  version) loaded; ``retrieval_index_info{family,version,day}``: 1 for the ANN index in use;
* ``retrieval_index_age_seconds``: seconds since the index in use was built;
  ``retrieval_index_data_age_seconds``: seconds since the end of the day it was built from;
* ``redis_errors_total{kind}``: Redis unreachable, timed out or answering an error reply;
* ``corrupt_values_total{feature}``: stored vectors refused for non-finite elements.

Example::

    metrics = ServingMetrics()
    metrics.request("/rank", "POST", 200, 0.004)
    body, content_type = metrics.exposition()
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from datetime import time as day_time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Milliseconds matter here: the target is a p99 under 20 ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0)
CANDIDATE_BUCKETS = (1, 10, 50, 100, 200, 500, 1000, 2000)


def multiprocess_dir() -> str | None:
    """The folder the worker processes share their samples in, when running several."""
    return os.environ.get(MULTIPROCESS_ENV) or None


class ServingMetrics:
    """The serving metrics on one registry; see the module docstring for the names."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess = multiprocess_dir() is not None
        r = self.registry
        self.requests = Counter(
            "derm_http_requests", "HTTP requests answered.", ["endpoint", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "derm_http_request_seconds",
            "Time to answer an HTTP request.",
            ["endpoint", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.redis_read = Histogram(
            "derm_redis_read_seconds", "Redis round trip and decode of one request.", buckets=STAGE_BUCKETS, registry=r
        )
        self.model = Histogram(
            "derm_model_seconds", "Ranker inference of one request.", ["objective"], buckets=STAGE_BUCKETS, registry=r
        )
        self.ann = Histogram("derm_ann_seconds", "ANN search of one request.", buckets=STAGE_BUCKETS, registry=r)
        self.candidates = Histogram(
            "derm_candidates_per_request",
            "Pins scored (/rank) or returned (/retrieve) per request.",
            ["endpoint"],
            buckets=CANDIDATE_BUCKETS,
            registry=r,
        )
        self.redis_errors = Counter(
            "derm_redis_errors", "Requests answered 503 because of Redis.", ["kind"], registry=r
        )
        self.corrupt_values = Counter(
            "derm_corrupt_values", "Stored vectors refused for non-finite elements.", ["feature"], registry=r
        )
        mode: dict[str, Any] = {"multiprocess_mode": "livemax"} if self.multiprocess else {}
        self.versions = Gauge(
            "derm_embedding_version_served",
            "1 for every embedding (family, version) a loaded ranker reads.",
            ["objective", "family", "version"],
            registry=r,
            **mode,
        )
        self.index_info = Gauge(
            "derm_retrieval_index_info",
            "1 for the ANN index answering /retrieve.",
            ["family", "version", "day"],
            registry=r,
            **mode,
        )
        recent: dict[str, Any] = {"multiprocess_mode": "livemostrecent"} if self.multiprocess else {}
        self.index_age = Gauge(
            "derm_retrieval_index_age_seconds", "Seconds since the ANN index in use was built.", registry=r, **recent
        )
        self.index_data_age = Gauge(
            "derm_retrieval_index_data_age_seconds",
            "Seconds since the end of the day the ANN index was built from.",
            registry=r,
            **recent,
        )
        self._index_key: tuple[str, str, str] | None = None

    def request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        code = str(status)
        self.requests.labels(endpoint, method, code).inc()
        self.latency.labels(endpoint, code).observe(seconds)

    def stages(self, endpoint: str, timings: Mapping[str, float], candidates: int | None) -> None:
        """Record the stage timings a service call reported (``redis``, ``ann``, ``model:<objective>``)."""
        for stage, seconds in timings.items():
            if stage == "redis":
                self.redis_read.observe(seconds)
            elif stage == "ann":
                self.ann.observe(seconds)
            elif stage.startswith("model:"):
                self.model.labels(stage.partition(":")[2]).observe(seconds)
        if candidates is not None:
            self.candidates.labels(endpoint).observe(candidates)

    def loaded_versions(self, versions: Mapping[str, Mapping[str, str]]) -> None:
        for objective, families in versions.items():
            for family, version in families.items():
                self.versions.labels(objective, family, version).set(1)

    def index(self, family: str, version: str, day: str, built_at: float) -> None:
        """The index in use (``built_at``: epoch seconds) and its ages, as of now."""
        key = (family, version, day)
        if key != self._index_key:
            if self._index_key is not None:
                self.index_info.remove(*self._index_key)
            self.index_info.labels(*key).set(1)
            self._index_key = key
        now = time.time()
        self.index_age.set(max(0.0, now - built_at))
        day_end = datetime.combine(datetime.fromisoformat(day).date() + timedelta(days=1), day_time.min, UTC)
        self.index_data_age.set(max(0.0, now - day_end.timestamp()))

    def exposition(self) -> tuple[bytes, str]:
        """(text exposition, content type): this process's registry, or every worker's when several run."""
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


__all__ = ["MULTIPROCESS_ENV", "ServingMetrics", "multiprocess_dir"]
