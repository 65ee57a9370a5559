"""SIGKILL the publisher at random instants; the next run completes and every invariant holds (issue 12).

Each trial starts ``publish --all`` of three days of two families in a forked child (Feast is already
imported, so a trial costs a publish, not an interpreter), kills it with SIGKILL after a random delay
drawn over the length of an uninterrupted run (fixed seed), then publishes again and checks:

* every (family, version) ends online at its newest day, and Redis agrees (``online_status`` ok, the
  watermark, every entity of the newest day);
* each offline day holds exactly its snapshot's vectors, and Redis serves the newest day's;
* a second run publishes nothing and refuses nothing.

``DERM_KILL_TRIALS`` sets the number of trials (CI runs a few; the figures in the README come from a
longer run).
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.online_read import unit_vectors
from derm.core.paths import DATA_DIR_ENV, PlatformPaths
from derm.infra.redis_server import LocalRedisServer
from tests.kill_trials import run_killed, template_redis, template_start

DAYS = (date(2026, 3, 1), date(2026, 3, 2), date(2026, 3, 3))
FAMILIES = ("ctr_user", "ctr_pin")
ENTITIES = 60
DIM = 8
TRIALS = int(os.environ.get("DERM_KILL_TRIALS", "4"))


@dataclass
class Template:
    root: Path
    server: LocalRedisServer
    snapshots: Path  # snapshots + versions.json, nothing published
    vectors: dict[tuple[str, date], np.ndarray]
    ids: np.ndarray
    outcomes: list[str] = field(default_factory=list)


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    return unit_vectors(rng, n, DIM)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Template]:
    from derm.training.upstream.export import write_precomputed_snapshot

    root, paths, ids, rng = template_start(tmp_path_factory, "kill", first_id=5_000, entities=ENTITIES)
    vectors = {}
    for family in FAMILIES:
        current = _unit(rng, ENTITIES)
        for day in DAYS:
            current = current + 0.05 * _unit(rng, ENTITIES)
            current /= np.linalg.norm(current, axis=1, keepdims=True)
            vectors[family, day] = current.copy()
            write_precomputed_snapshot(paths, family, day, ids, current, family[:1] * 64)
    # Each trial points DERM_DATA_DIR at its own folder; the environment is restored after the module.
    with template_redis(root, paths) as server:
        yield Template(root, server, paths.snapshots_dir, vectors, ids)


def _fresh(template: Template, trial: int) -> PlatformPaths:
    paths = PlatformPaths(template.root / f"trial{trial}")
    shutil.copytree(template.snapshots, paths.snapshots_dir)
    template.server.client().flushall()
    os.environ[DATA_DIR_ENV] = str(paths.data_dir)
    return paths


def _publish_all(paths: PlatformPaths):
    from derm.core.feast_repo import FeatureRepo
    from derm.materialization.publish import pending_snapshots, publish_batch
    from derm.training.upstream.export import snapshot_available_at

    return publish_batch(
        pending_snapshots(paths), paths, repo=FeatureRepo(), now=snapshot_available_at(DAYS[-1], timedelta(hours=1))
    )


def _check_invariants(template: Template, paths: PlatformPaths) -> None:
    from derm.core.feast_repo import FeatureRepo
    from derm.core.naming import feature_name, feature_view_name, join_key
    from derm.materialization.catalog import OFFLINE_DATA_FILE, Catalog
    from derm.materialization.online_state import online_status

    catalog = Catalog(paths.embeddings_offline_dir)
    state = catalog.read_state()
    assert {family: state.online[family]["v1"] for family in FAMILIES} == dict.fromkeys(FAMILIES, DAYS[-1].isoformat())
    statuses = {s.view: (s.status, s.present, s.sampled) for s in online_status(paths, FeatureRepo(), sample=ENTITIES)}
    assert statuses == {feature_view_name(f, "v1"): ("ok", ENTITIES, ENTITIES) for f in FAMILIES}
    store = FeatureRepo().store()
    for family in FAMILIES:
        for day in DAYS:
            table = pq.read_table(catalog.partition_dir(family, "v1", day) / OFFLINE_DATA_FILE)
            assert table.column(join_key(family)).to_pylist() == template.ids.tolist()
            stored = np.array(table.column(feature_name(family)).to_pylist(), dtype=np.float32)
            np.testing.assert_array_equal(stored, template.vectors[family, day])
        served = store.get_online_features(
            features=[f"{feature_view_name(family, 'v1')}:{feature_name(family)}"],
            entity_rows=[{join_key(family): int(i)} for i in template.ids],
        ).to_dict()[feature_name(family)]
        np.testing.assert_array_equal(np.array(served, dtype=np.float32), template.vectors[family, DAYS[-1]])
    again = _publish_all(paths)
    assert not again.published and not again.refused and not again.blocked, again.table()


def test_publish_killed_at_random_instants_recovers_with_every_invariant(template: Template) -> None:
    # An uninterrupted run, for the span the kill instants are drawn from.
    paths = _fresh(template, 0)
    began = time.perf_counter()
    batch = _publish_all(paths)
    span = time.perf_counter() - began
    assert len(batch.published) == len(FAMILIES) * len(DAYS), batch.table()
    _check_invariants(template, paths)

    rng = random.Random(1234)
    for trial in range(1, TRIALS + 1):
        paths = _fresh(template, trial)
        outcome = run_killed(functools.partial(_publish_all, paths), rng.uniform(0.0, span))
        template.outcomes.append(outcome)
        _publish_all(paths)  # the next run completes whatever the kill interrupted
        _check_invariants(template, paths)
    print(f"kill trials: {TRIALS}, {template.outcomes.count('killed')} killed mid-run, 0 invariant violations")
