"""Candidate retrieval: approximate nearest neighbours over the promoted Pin embedding version.

The index is a faiss HNSW graph on inner product (DERM embeddings are
L2-normalised, and the upstream model scores a (user, Pin) pair by their dot
product). It is built from the offline partition of the newest day of the
promoted version that is fully online (``catalog.json``: ``promoted`` and
``online``), i.e. exactly the vectors Redis serves. :class:`PinIndexManager`
watches the catalog and rebuilds in the background when ``derm promote`` /
``derm rollback`` or a new publish changes that (version, day); requests keep
using the previous index until the new one is swapped in.

Every build reports recall@k against exact search (``IndexFlatIP``) on a sample
of queries: the user embeddings of the same model version and day when they are
published (the real query distribution), otherwise Pin vectors themselves.

With a ``cache_dir`` (``derm serve --workers N``), an index is built once per
(family, version, day, settings): the first process to need it builds it under a file
lock and saves it (``<name>.faiss`` + ``<name>.npz``, atomically); every other worker
loads that file, memory-mapped read-only where faiss supports it, instead of building
its own. A failed build is retried only after a backoff (1 s, doubling up to 60 s):
meanwhile requests are answered at once from the previous index, or refused with the
error, instead of each starting a build.

Example::

    manager = PinIndexManager(Catalog(paths.embeddings_offline_dir), family="ctr_pin")
    index = manager.current()            # builds on first use
    pin_ids, scores = index.search(user_vectors, k=50)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq

from derm.core.naming import FAMILIES, family_name, feature_name, join_key, objective_of
from derm.materialization.catalog import OFFLINE_DATA_FILE, Catalog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnnSettings:
    hnsw_neighbors: int = 32  # M: graph degree; memory and build time grow with it
    ef_construction: int = 80
    ef_search: int = 128  # candidates explored per query: the recall / latency knob
    recall_k: int = 10
    recall_queries: int = 200
    # Below this many Pins a graph buys nothing: exact search is as fast and has recall 1.
    exact_below: int = 0
    threads: int = 1  # the web server already runs requests in parallel; don't oversubscribe cores


@dataclass
class PinIndex:
    """One built index: the Pins of (family, version, day) and how good its neighbours are."""

    family: str
    version: str
    day: date
    pin_ids: np.ndarray  # int64, row i of the index
    index: faiss.Index
    kind: str
    dim: int
    recall_at_k: float
    recall_k: int
    recall_queries: str  # what the recall was measured on
    build_seconds: float
    centroid: np.ndarray  # normalised mean Pin vector: the query of a user without an embedding
    built_at: float = field(default_factory=time.time)  # epoch seconds the index was built
    source: str = "built"  # "built" here, or "loaded <file>" (shared by the worker processes)

    def __len__(self) -> int:
        return len(self.pin_ids)

    @property
    def query_family(self) -> str:
        """The user family in the same embedding space (same upstream model and version)."""
        return family_name(objective_of(self.family), "user")

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` Pins per query row: (pin ids, inner-product scores), best first; k is capped at the size."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = min(k, len(self.pin_ids))
        scores, rows = self.index.search(queries, k)
        valid = rows >= 0
        ids = np.where(valid, self.pin_ids[np.clip(rows, 0, None)], -1)
        return ids, scores

    def describe(self) -> dict[str, object]:
        return {
            "family": self.family,
            "version": self.version,
            "day": self.day.isoformat(),
            "pins": len(self.pin_ids),
            "dim": self.dim,
            "index": self.kind,
            f"recall_at_{self.recall_k}": round(self.recall_at_k, 4),
            "recall_measured_on": self.recall_queries,
            "build_seconds": round(self.build_seconds, 3),
            "built_at": round(self.built_at, 3),
            "source": self.source,
        }


def read_partition(catalog: Catalog, family: str, version: str, day: date) -> tuple[np.ndarray, np.ndarray]:
    """(ids, (n, D) float32 vectors) of one published day, straight from its Parquet file."""
    path = catalog.partition_dir(family, version, day) / OFFLINE_DATA_FILE
    table = pq.read_table(path, columns=[join_key(family), feature_name(family)])
    ids = table.column(0).to_numpy()
    vectors = table.column(1).combine_chunks()
    flat = vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    dim = len(flat) // max(len(ids), 1)
    return np.asarray(ids, dtype=np.int64), flat.reshape(len(ids), dim)


def recall_at_k(approximate: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k found in its approximate top-k."""
    k = exact.shape[1]
    hits = [len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approximate, exact, strict=True)]
    return float(np.mean(hits) / k) if hits else 1.0


def build_pin_index(
    catalog: Catalog, family: str, version: str, day: date, settings: AnnSettings | None = None
) -> PinIndex:
    """Build the index of one published Pin day and measure its recall@k against exact search."""
    settings = settings or AnnSettings()
    started = time.perf_counter()
    faiss.omp_set_num_threads(settings.threads)
    pin_ids, vectors = read_partition(catalog, family, version, day)
    if len(pin_ids) == 0:
        raise ValueError(f"{family} {version} {day}: the partition has no Pins")
    dim = vectors.shape[1]
    if len(pin_ids) < settings.exact_below:
        index: faiss.Index = faiss.IndexFlatIP(dim)
        kind = "flat-ip (exact)"
    else:
        index = faiss.IndexHNSWFlat(dim, settings.hnsw_neighbors, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = settings.ef_construction
        index.hnsw.efSearch = settings.ef_search
        kind = f"hnsw-ip M={settings.hnsw_neighbors} efSearch={settings.ef_search}"
    index.add(vectors)

    queries, measured_on = _recall_queries(catalog, family, version, day, vectors, settings)
    k = min(settings.recall_k, len(pin_ids))
    exact = faiss.IndexFlatIP(dim)
    exact.add(vectors)
    _, exact_rows = exact.search(queries, k)
    _, approximate_rows = index.search(queries, k)
    recall = recall_at_k(approximate_rows, exact_rows)

    centroid = vectors.mean(axis=0)
    centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
    built = PinIndex(
        family=family,
        version=version,
        day=day,
        pin_ids=pin_ids,
        index=index,
        kind=kind,
        dim=dim,
        recall_at_k=recall,
        recall_k=k,
        recall_queries=measured_on,
        build_seconds=time.perf_counter() - started,
        centroid=centroid.astype(np.float32),
    )
    log.info("built Pin index %s", built.describe())
    return built


def index_file_stem(family: str, version: str, day: date, settings: AnnSettings) -> str:
    """The cache file name of an index: its source and a digest of the settings it was built with."""
    digest = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()[:10]
    return f"{family}-{version}-{day.isoformat()}-{digest}"


def save_pin_index(index: PinIndex, directory: Path, stem: str) -> None:
    """Write ``<stem>.npz`` (ids, centroid, description) then ``<stem>.faiss``; each appears whole.

    The ``.faiss`` file is renamed into place last: its presence says the pair is complete.
    """
    directory.mkdir(parents=True, exist_ok=True)
    skip = {"index", "pin_ids", "centroid", "day", "source"}
    meta = {name: getattr(index, name) for name in index.__dataclass_fields__ if name not in skip}
    meta["day"] = index.day.isoformat()
    tmp = directory / f".{stem}.npz.tmp-{os.getpid()}"
    with open(tmp, "wb") as handle:
        np.savez(handle, pin_ids=index.pin_ids, centroid=index.centroid, meta=np.array(json.dumps(meta)))
    os.replace(tmp, directory / f"{stem}.npz")
    tmp = directory / f".{stem}.faiss.tmp-{os.getpid()}"
    faiss.write_index(index.index, str(tmp))
    os.replace(tmp, directory / f"{stem}.faiss")


def load_pin_index(directory: Path, stem: str, settings: AnnSettings) -> PinIndex | None:
    """The saved index ``stem``, memory-mapped read-only when faiss allows it; None when not saved."""
    path = directory / f"{stem}.faiss"
    if not path.exists():
        return None
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        how = "mmap"
    except RuntimeError:  # index types faiss cannot map: read into memory
        index = faiss.read_index(str(path))
        how = "read"
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = settings.ef_search
    with np.load(directory / f"{stem}.npz") as saved:
        meta = json.loads(str(saved["meta"]))
        pin_ids, centroid = saved["pin_ids"], saved["centroid"]
    meta.update(day=date.fromisoformat(meta["day"]), source=f"loaded ({how}) {path.name}")
    return PinIndex(index=index, pin_ids=pin_ids, centroid=centroid, **meta)


def shared_pin_index(
    catalog: Catalog, family: str, version: str, day: date, settings: AnnSettings, directory: Path
) -> PinIndex:
    """Load the saved index of (family, version, day), or build and save it once under a file lock."""
    stem = index_file_stem(family, version, day, settings)
    loaded = load_pin_index(directory, stem, settings)
    if loaded is not None:
        return loaded
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f".{stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be building it: wait, then load its file
        loaded = load_pin_index(directory, stem, settings)
        if loaded is not None:
            return loaded
        built = build_pin_index(catalog, family, version, day, settings)
        save_pin_index(built, directory, stem)
        return built


def _recall_queries(
    catalog: Catalog, family: str, version: str, day: date, pins: np.ndarray, settings: AnnSettings
) -> tuple[np.ndarray, str]:
    rng = np.random.default_rng(0)
    user_family = family_name(objective_of(family), "user")
    user_partition = catalog.partition_dir(user_family, version, day) / OFFLINE_DATA_FILE
    if user_family in FAMILIES and user_partition.exists():
        _, users = read_partition(catalog, user_family, version, day)
        if len(users) and users.shape[1] == pins.shape[1]:
            chosen = rng.choice(len(users), size=min(settings.recall_queries, len(users)), replace=False)
            return np.ascontiguousarray(users[chosen]), f"{len(chosen)} {user_family} {version} vectors"
    chosen = rng.choice(len(pins), size=min(settings.recall_queries, len(pins)), replace=False)
    return np.ascontiguousarray(pins[chosen]), f"{len(chosen)} {family} vectors"


def promoted_source(catalog: Catalog, family: str) -> tuple[str, date] | None:
    """(promoted version, its newest day fully online) of a Pin family, or None when nothing is promoted."""
    state = catalog.read_state()
    version = state.promoted.get(family)
    if version is None:
        return None
    online_day = state.online.get(family, {}).get(version)
    if online_day is None:
        return None
    return version, date.fromisoformat(online_day)


class PinIndexManager:
    """Keeps the index of the promoted version of ``family`` current.

    ``current()`` looks at the catalog at most every ``check_interval`` seconds (a
    ``stat`` of ``catalog.json``; the file is read only when it changed). A change of
    promoted version or newest online day starts a rebuild on a background thread;
    until it finishes, requests are answered from the previous index.
    """

    def __init__(
        self,
        catalog: Catalog,
        family: str = "ctr_pin",
        settings: AnnSettings | None = None,
        check_interval: float = 1.0,
        cache_dir: Path | str | None = None,
        retry_seconds: float = 1.0,
        max_retry_seconds: float = 60.0,
    ):
        if FAMILIES.get(family) != "pin":
            raise ValueError(f"{family!r} is not a Pin embedding family")
        self.catalog = catalog
        self.family = family
        self.settings = settings or AnnSettings()
        self.check_interval = check_interval
        self._index: PinIndex | None = None
        self._lock = threading.Lock()
        self._builder: threading.Thread | None = None
        self._checked_at = 0.0
        self._catalog_stamp: tuple[int, int] | None = None
        self._wanted: tuple[str, date] | None = None
        self.last_error: str | None = None
        self.rebuilds = 0
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.retry_seconds = retry_seconds
        self.max_retry_seconds = max_retry_seconds
        self.build_attempts = 0
        # (version, day) -> (failures in a row, monotonic time before which no new attempt starts)
        self._failures: dict[tuple[str, date], tuple[int, float]] = {}

    def _stamp(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.catalog.state_path)
        except FileNotFoundError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def _poll(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked_at < self.check_interval:
            return
        self._checked_at = now
        stamp = self._stamp()
        if not force and stamp == self._catalog_stamp and self._wanted is not None:
            return
        self._catalog_stamp = stamp
        self._wanted = promoted_source(self.catalog, self.family)

    def _needs_build(self) -> bool:
        index = self._index
        return self._wanted is not None and (index is None or (index.version, index.day) != self._wanted)

    def refresh(self, wait: bool = True) -> PinIndex | None:
        """Re-read the catalog now and rebuild if the promoted (version, day) changed."""
        with self._lock:
            self._poll(force=True)
            self._start_build_if_needed()
            builder = self._builder
        if wait and builder is not None:
            builder.join()
        return self._index

    def current(self) -> PinIndex | None:
        """The index to answer with now; None only before the first build finished (or nothing is promoted)."""
        with self._lock:
            self._poll()
            self._start_build_if_needed()
            builder = self._builder
        if self._index is None and builder is not None:
            builder.join()  # first request: nothing to serve yet, so wait for the build
        return self._index

    def built(self) -> PinIndex | None:
        """The index in use, without checking the catalog or starting a build."""
        return self._index

    def _start_build_if_needed(self) -> None:
        if not self._needs_build() or (self._builder is not None and self._builder.is_alive()):
            return
        assert self._wanted is not None
        version, day = self._wanted
        failed = self._failures.get((version, day))
        if failed is not None and time.monotonic() < failed[1]:
            return  # backing off: answer from the previous index (or refuse) instead of building again
        self.build_attempts += 1
        self._builder = threading.Thread(target=self._build, args=(version, day), name="pin-index-build", daemon=True)
        self._builder.start()

    def _build(self, version: str, day: date) -> None:
        try:
            if self.cache_dir is not None:
                built = shared_pin_index(self.catalog, self.family, version, day, self.settings, self.cache_dir)
            else:
                built = build_pin_index(self.catalog, self.family, version, day, self.settings)
        except Exception as error:  # keep serving the previous index; /health reports the failure
            with self._lock:
                failures = self._failures.get((version, day), (0, 0.0))[0] + 1
                delay = min(self.max_retry_seconds, self.retry_seconds * 2 ** (failures - 1))
                self._failures[(version, day)] = (failures, time.monotonic() + delay)
                self.last_error = (
                    f"{self.family} {version} {day}: {type(error).__name__}: {error} "
                    f"(attempt {failures}; next in {delay:g} s)"
                )
            log.exception("building the %s %s %s index failed", self.family, version, day)
            return
        with self._lock:
            self._index = built
            self._failures.pop((version, day), None)
            self.last_error = None
            self.rebuilds += 1
            # A promote may have happened while building: build again on the next request.
            self._checked_at = 0.0

    def describe(self) -> dict[str, object]:
        index = self._index
        wanted = self._wanted
        return {
            "family": self.family,
            "index": index.describe() if index else None,
            "promoted": {"version": wanted[0], "day": wanted[1].isoformat()} if wanted else None,
            "rebuilding": bool(self._builder and self._builder.is_alive()),
            "rebuilds": self.rebuilds,
            "build_attempts": self.build_attempts,
            "last_error": self.last_error,
        }


__all__ = [
    "AnnSettings",
    "PinIndex",
    "PinIndexManager",
    "build_pin_index",
    "index_file_stem",
    "load_pin_index",
    "promoted_source",
    "read_partition",
    "recall_at_k",
    "save_pin_index",
    "shared_pin_index",
]
