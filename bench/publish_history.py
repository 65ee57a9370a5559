"""Publish cost versus history: one small snapshot published with 10 vs 2,000 earlier days.

Issue 11: on a real log, once ~1,200 validation results existed, each publish took 4-5 s and
rising (Great Expectations' Data Docs builders and the catalog read every past result and
manifest). The gate and the publish must cost the same on day 1,000 as on day 10.

Two data directories share one Redis (separate databases) and hold the same family and version:

* ``short``: ``short_history`` earlier published days;
* ``long``: ``long_history`` earlier published days, each with its Great Expectations
  validation result and Data Docs page, as a long-running platform accumulates them.

The first day of each is published for real (gate, offline, ``feast apply``, Redis); the other
earlier days are copies of it under their own dates (offline partition, manifest, source
snapshot, validation result and its rendered page), so building the history costs seconds, not
hours. Then ``publishes`` new days are published in both, alternately, and the median seconds
per publish compared: ``long / short`` (goal <= 1.2).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from bench.online_read import PUBLISH_DELAY, feast_environment, unit_vectors

FAMILY = "ctr_user"
CONFIG_HASH = "b" * 64


def _copy_day(paths, source_dir: Path, day: date) -> tuple[Path, str, datetime]:
    """A published day cloned from ``source_dir``'s day: offline partition, source snapshot, manifest dates.

    Returns the version's offline folder, the day file's name in it and the day's timestamp.
    """
    from derm.core.snapshot import MANIFEST_FILE, read_manifest, snapshot_dir
    from derm.materialization.catalog import OFFLINE_DATA_FILE, Catalog

    template = read_manifest(source_dir)
    shift = day - template.snapshot_date
    manifest = json.loads((source_dir / MANIFEST_FILE).read_text())
    manifest["snapshot_date"] = day.isoformat()
    for name in ("event_timestamp", "data_window_start", "data_window_end", "created_at"):
        manifest[name] = (datetime.fromisoformat(manifest[name]) + shift).isoformat()
    catalog = Catalog(paths.embeddings_offline_dir)
    for template_dir, target_dir in (
        (source_dir, snapshot_dir(paths.snapshots_dir, FAMILY, template.model_version, day)),
        (
            catalog.partition_dir(FAMILY, template.model_version, template.snapshot_date),
            catalog.partition_dir(FAMILY, template.model_version, day),
        ),
    ):
        target_dir.mkdir(parents=True, exist_ok=True)
        for file in template_dir.iterdir():
            if file.name != MANIFEST_FILE:
                os.link(file, target_dir / file.name)  # same bytes, no disk cost
        (target_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    partition = catalog.partition_dir(FAMILY, template.model_version, day)
    moment = datetime.fromisoformat(manifest["event_timestamp"])
    return partition.parent, f"{partition.name}/{OFFLINE_DATA_FILE}", moment


def _copy_validation_results(validation_dir: Path, copies: int) -> None:
    """Clone every stored validation result and its Data Docs page ``copies`` times under new run names.

    GE keeps a result at ``<suite parts>/<run name>/<run time>/<batch>.json`` (its page at the same path
    with ``.html``): a copy is the same result of the same suite under another run name.
    """
    uncommitted = validation_dir / "gx" / "uncommitted"
    for root, suffix in ((uncommitted / "validations", ".json"), (uncommitted / "data_docs" / "local_site" /
                                                                   "validations", ".html")):  # fmt: skip
        for result in [p for p in root.rglob(f"*{suffix}")]:
            run_dir = result.parent.parent
            for i in range(copies):
                target = run_dir.parent / f"{run_dir.name}_history{i:05d}"
                if not target.exists():
                    shutil.copytree(run_dir, target, copy_function=os.link)


def _build_history(paths, redis_connection: str, days: int, start: date, vectors: np.ndarray, ids: np.ndarray) -> None:
    from derm.core.feast_repo import FeatureRepo
    from derm.feast_plugins.source_index import record_files_timestamps
    from derm.materialization.catalog import Catalog
    from derm.materialization.publish import publish_snapshot
    from derm.training.upstream.export import snapshot_available_at, write_precomputed_snapshot

    with feast_environment(paths, redis_connection):
        first = write_precomputed_snapshot(paths, FAMILY, start, ids, vectors, CONFIG_HASH, PUBLISH_DELAY)
        publish_snapshot(first, paths, repo=FeatureRepo(), now=snapshot_available_at(start, PUBLISH_DELAY))
    copies = [_copy_day(paths, first, start + timedelta(days=offset)) for offset in range(1, days)]
    # As each publish records its day file's timestamps, in one write.
    if copies:
        record_files_timestamps(copies[0][0], {name: (moment, moment) for _, name, moment in copies})
    # Two results per publish (rows and dimensions suites) for a day with a previous day; one for the first.
    _copy_validation_results(paths.validation_dir, days - 1)
    catalog = Catalog(paths.embeddings_offline_dir)
    with catalog.locked():
        state = catalog.read_state()
        state.online.setdefault(FAMILY, {})["v1"] = (start + timedelta(days=days - 1)).isoformat()
        catalog.write_state(state)


def _count_results(validation_dir: Path) -> int:
    return sum(1 for _ in (validation_dir / "gx" / "uncommitted" / "validations").rglob("*.json"))


def run(short_history: int = 10, long_history: int = 2_000, publishes: int = 5, entities: int = 300, dim: int = 32
        ) -> dict[str, Any]:  # fmt: skip
    from derm.core.feast_repo import FeatureRepo
    from derm.core.paths import PlatformPaths
    from derm.infra.redis_server import LocalRedisServer
    from derm.materialization.publish import publish_snapshot
    from derm.training.upstream.export import snapshot_available_at, write_precomputed_snapshot

    rng = np.random.default_rng(0)
    ids = np.arange(entities, dtype=np.int64)
    base = unit_vectors(rng, entities, dim)
    start = date(2020, 1, 1)
    seconds: dict[str, list[float]] = {"short": [], "long": []}
    results_before: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-publish-history-")))
        server = stack.enter_context(LocalRedisServer(tmp / "redis", persist=False))
        setups = {
            "short": (PlatformPaths(tmp / "short"), f"{server.connection_string},db=1", short_history),
            "long": (PlatformPaths(tmp / "long"), f"{server.connection_string},db=2", long_history),
        }
        for name, (paths, connection, days) in setups.items():
            _build_history(paths, connection, days, start, base, ids)
            results_before[name] = _count_results(paths.validation_dir)
        for i in range(publishes):
            # Each new day moves a little, as the EMA refresh does.
            vectors = base + 0.05 * unit_vectors(rng, entities, dim)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            for name, (paths, connection, days) in setups.items():
                day = start + timedelta(days=days + i)
                with feast_environment(paths, connection):
                    directory = write_precomputed_snapshot(paths, FAMILY, day, ids, vectors, CONFIG_HASH, PUBLISH_DELAY)
                    began = time.perf_counter()
                    publish_snapshot(
                        directory, paths, repo=FeatureRepo(), now=snapshot_available_at(day, PUBLISH_DELAY)
                    )
                    seconds[name].append(time.perf_counter() - began)
        results_after = {name: _count_results(paths.validation_dir) for name, (paths, _, _) in setups.items()}
    # The first publish of each data dir after the history was built may prune the results beyond retention:
    # a one-time cost, reported apart; the steady state is the median of the others.
    steady = {name: values[1:] or values for name, values in seconds.items()}
    short_median, long_median = (statistics.median(steady[name]) for name in ("short", "long"))
    return {
        "short_history_days": short_history,
        "long_history_days": long_history,
        "validation_results_before": results_before,
        "validation_results_after": results_after,
        "first_publish_s": {name: values[0] for name, values in seconds.items()},
        "short_publish_s": short_median,
        "long_publish_s": long_median,
        "long_over_short": long_median / short_median,
        "publish_s": seconds,
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
