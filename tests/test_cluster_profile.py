"""The scale-out profile end to end: ``derm run-all`` with ``DERM_PROFILE=cluster`` on local Ray and a Redis Cluster.

The profile is configuration only (``feature_repo/feature_store.cluster.yaml``): the Ray ASOF
offline store builds the rankers' point-in-time training sets in Ray tasks (a local Ray in the
command's process), and the fast online store writes into a real Redis Cluster (3 masters + 3
replicas, :class:`derm.infra.redis_cluster.LocalRedisCluster`). The cluster is this module's
and is named by ``DERM_REDIS_CONNECTION_STRING``, as a user's own cluster would be, so that the
commands after ``run-all`` (``freshness``) see what it published.

Checked: the whole job finishes with both rankers trained on training sets the Ray store wrote;
``derm freshness`` finds every published day of every family in the cluster; and
``get_online_features`` answers, for every entity, the vector of the newest published snapshot
in the offline store.

CI cost: one run-all on 5 days of 400 events (one torch thread), about 2 minutes here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from derm.core.paths import DATA_DIR_ENV, PROFILE_ENV, RAY_ADDRESS_ENV, REDIS_CONNECTION_ENV, REDIS_TYPE_ENV

pytest.importorskip("ray")

pytestmark = pytest.mark.heavy  # minutes of CI: scheduled first (tests/conftest.py)

DAYS = 5  # two train days, at least, before the two eval days (the window starts at the first snapshot)
EVENTS_PER_DAY = 400


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], Path, str]]:
    """A tiny synthetic log ending yesterday, then ``derm run-all --events`` on the cluster profile."""
    from derm.events.synthetic import SyntheticConfig, generate_event_log
    from derm.infra.redis_cluster import LocalRedisCluster

    root = tmp_path_factory.mktemp("cluster-profile")
    first_day = datetime.now(UTC).date() - timedelta(days=DAYS)  # freshness wants every day up to yesterday
    config = SyntheticConfig.preset("tiny", start_date=first_day, n_days=DAYS, events_per_day=EVENTS_PER_DAY)
    generate_event_log(config, root / "log" / "events")
    data_dir = root / "data"
    with LocalRedisCluster(root / "redis-cluster") as cluster:
        env = {
            **os.environ,
            PROFILE_ENV: "cluster",
            DATA_DIR_ENV: str(data_dir),
            REDIS_CONNECTION_ENV: cluster.connection_string,
            REDIS_TYPE_ENV: "redis_cluster",
            RAY_ADDRESS_ENV: "",  # a local Ray in each command's process
        }
        run_all = _derm(env, "run-all", "--events", str(root / "log" / "events"), "--threads", "1")
        yield env, data_dir, run_all


def _derm(env: dict[str, str], *args: str, exit_code: int = 0) -> str:
    """Run ``derm`` as a user does, in its own process (its local Ray ends with it)."""
    command = [str(Path(sys.executable).with_name("derm")), *args]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    output = completed.stdout + completed.stderr
    assert completed.returncode == exit_code, f"derm {' '.join(args)} exited {completed.returncode}:\n{output}"
    assert "Traceback" not in output, output
    return output


def test_run_all_trains_both_rankers_on_ray_training_sets(cluster_run: tuple[dict[str, str], Path, str]) -> None:
    _, data_dir, output = cluster_run
    assert "started local Redis Cluster" not in output, "the commands use the cluster named in the environment"
    summary = json.loads((data_dir / "run-summary.json").read_text())
    assert {objective: outcome["status"] for objective, outcome in summary["rankers"].items()} == {
        "ctr": "trained",
        "cvr": "trained",
    }, summary
    # The point-in-time training sets were built by the Ray store: its per-chunk result files are there.
    results = sorted((data_dir / "retrieval").glob("*/result-*.parquet"))
    assert results, f"no Ray retrieval result under {data_dir / 'retrieval'}"


def test_freshness_finds_every_published_day_in_the_cluster(cluster_run: tuple[dict[str, str], Path, str]) -> None:
    env, _, _ = cluster_run
    output = _derm(env, "freshness")
    online = [line for line in output.splitlines() if line.startswith("online ")]
    assert len(online) >= 4, output  # ctr/cvr x user/Pin v1, at least
    assert all(": ok (" in line for line in online), output


def test_online_vectors_are_the_newest_offline_snapshot(
    cluster_run: tuple[dict[str, str], Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``get_online_features`` through the cluster profile's store, against the views' offline sources."""
    import duckdb

    env, _, _ = cluster_run
    for name in (PROFILE_ENV, DATA_DIR_ENV, REDIS_CONNECTION_ENV, REDIS_TYPE_ENV, RAY_ADDRESS_ENV):
        monkeypatch.setenv(name, env[name])
    from derm.core.feast_repo import feature_store

    store = feature_store()
    views = [view for view in store.list_feature_views() if view.name.endswith("_emb_v1")]
    assert len(views) == 4, [view.name for view in views]
    for view in views:
        key = view.entity_columns[0].name
        feature = view.features[0].name
        with duckdb.connect() as con:
            # The offline store's answer at "now": each entity's newest row (snapshots are daily, one per entity).
            ids, vectors = (
                con.execute(
                    f"SELECT {key}, arg_max({feature}, event_timestamp) FROM read_parquet($path) GROUP BY {key} "
                    f"ORDER BY {key}",
                    {"path": view.batch_source.path},
                )
                .fetchnumpy()
                .values()
            )
        assert len(ids) > 10, view.name
        online = store.get_online_features(
            features=[f"{view.name}:{feature}"], entity_rows=[{key: int(entity)} for entity in ids]
        ).to_dict()[feature]
        assert None not in online, f"{view.name}: entities missing online"
        np.testing.assert_array_equal(np.array(online, dtype=np.float32), np.stack(vectors).astype(np.float32))
