"""A model version is the unit of promotion: both families move together, overrides are recorded,
and a failed or killed ``feast apply`` never makes a retried rollback go back two versions.

Real parts: the session redis-server, Feast's apply through the feature repo, the catalog on disk.
The module runs on its own data directory so its catalog never meets the other modules'.
"""

from __future__ import annotations

import os
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pytest

from derm.core.feast_repo import FeatureRepo
from derm.core.paths import DATA_DIR_ENV, PlatformPaths
from derm.materialization.catalog import Catalog

DIM = 8
DAY1 = date(2026, 1, 2)
NOW = datetime(2026, 1, 5, 12, tzinfo=UTC)
COUNTS = {"ctr_user": 40, "ctr_pin": 30}


def _unit(seed: int, n: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class FailingApply(FeatureRepo):
    """The real repository whose ``feast apply`` fails before touching the registry (injected fault)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def apply(self, *args, **kwargs):
        raise self.error


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, redis_server, feast_env):
    """ctr v1 and v2 on one day (both families), ctr v3 with its Pin family one day behind; v1 promoted."""
    from derm.core.feast_repo import export_feast_environment
    from derm.events.synthetic import SyntheticConfig, generate_event_log
    from derm.materialization.counting_features import build_counting_features
    from derm.materialization.publish import publish_snapshot
    from derm.training.upstream.export import write_precomputed_snapshot

    paths = PlatformPaths(tmp_path_factory.mktemp("promotion"))
    previous = os.environ.get(DATA_DIR_ENV)
    export_feast_environment(paths, redis_server.connection_string)
    generate_event_log(SyntheticConfig.preset("tiny", start_date=DAY1, n_days=2), paths.events_dir)
    build_counting_features(paths.events_dir, paths.stats_dir)
    for seed, config in enumerate("abc"):
        for family, n in COUNTS.items():
            vectors = _unit(seed * 10 + len(family), n)
            days = (DAY1, DAY1 + timedelta(days=1)) if (config, family) == ("c", "ctr_user") else (DAY1,)
            for day in days:
                ids = np.arange(n)
                source = write_precomputed_snapshot(paths, family, day, ids, vectors, config_hash=config * 64)
                publish_snapshot(source, paths, repo=FeatureRepo(), now=NOW)
    yield paths
    if previous is not None:
        export_feast_environment(PlatformPaths(previous), redis_server.connection_string)


def _served(*families: str) -> dict[str, str]:
    """family -> version in the registered ctr_ranker feature service (what Feast serves now)."""
    from derm.core.feast_repo import feature_store

    store = feature_store()
    views = [p.name for p in store.get_feature_service("ctr_ranker").feature_view_projections]
    tags = [store.get_feature_view(v).tags for v in views]
    return {t["family"]: t["model_version"] for t in tags if t.get("family") in families}


def test_model_versions_move_together_and_half_online_versions_are_refused(platform: PlatformPaths) -> None:
    from derm.materialization.promotion import promote, retire, rollback
    from derm.materialization.publish import PublishError

    catalog = Catalog(platform.embeddings_offline_dir)
    assert catalog.read_state().promoted == {"ctr_user": "v1", "ctr_pin": "v1"}
    assert promote(platform, "ctr", "v2", repo=FeatureRepo()) == ["ctr_user", "ctr_pin"]
    assert _served("ctr_user", "ctr_pin") == {"ctr_user": "v2", "ctr_pin": "v2"}
    state = catalog.read_state()
    assert state.history["ctr_user"][-1] == state.history["ctr_pin"][-1] == "v1" and state.pending is None

    with pytest.raises(PublishError, match="not online for the same newest day"):
        promote(platform, "ctr", "v3", repo=FeatureRepo())
    assert catalog.read_state().promoted == {"ctr_user": "v2", "ctr_pin": "v2"}, "a refusal changes nothing"

    with pytest.raises(PublishError, match="one family of model ctr"):
        promote(platform, "ctr_user", "v3", repo=FeatureRepo())
    with pytest.raises(PublishError, match="give --reason"):
        promote(platform, "ctr_user", "v3", repo=FeatureRepo(), family_only=True)
    promote(platform, "ctr_user", "v3", repo=FeatureRepo(), family_only=True, reason="user tower hotfix")
    assert _served("ctr_user", "ctr_pin") == {"ctr_user": "v3", "ctr_pin": "v2"}
    override = catalog.read_state().overrides[-1]
    assert override["action"] == "promote" and override["families"] == ["ctr_user"]
    assert override["reason"] == "user tower hotfix" and override["by"] and override["at"]

    with pytest.raises(PublishError, match="not promoted together"):
        rollback(platform, "ctr", repo=FeatureRepo())
    rollback(platform, "ctr_user", repo=FeatureRepo(), family_only=True, reason="undo the hotfix")
    assert _served("ctr_user", "ctr_pin") == {"ctr_user": "v2", "ctr_pin": "v2"}

    with pytest.raises(PublishError, match="is promoted"):
        retire(platform, "ctr", "v2", repo=FeatureRepo())
    assert retire(platform, "ctr", "v3", repo=FeatureRepo()) == ["ctr_user", "ctr_pin"]
    retired = catalog.read_state().retired
    assert retired["ctr_user"] == ["v3"] and retired["ctr_pin"] == ["v3"]


def test_rollback_after_a_failed_or_killed_apply_goes_back_one_version(platform: PlatformPaths) -> None:
    from derm.materialization.promotion import promote, rollback

    catalog = Catalog(platform.embeddings_offline_dir)
    promote(platform, "ctr", "v1", repo=FeatureRepo())
    promote(platform, "ctr", "v2", repo=FeatureRepo())
    before = catalog.read_state()
    assert before.promoted["ctr_pin"] == "v2" and before.history["ctr_pin"][-1] == "v1"
    depth = len(before.history["ctr_pin"])

    # A failed apply: the catalog is put back, so the retry rolls back exactly once (issue 12, item 4).
    with pytest.raises(RuntimeError, match="registry unavailable"):
        rollback(platform, "ctr", repo=FailingApply(RuntimeError("registry unavailable")))
    assert catalog.read_state() == before
    assert rollback(platform, "ctr", repo=FeatureRepo()) == {"ctr_user": "v1", "ctr_pin": "v1"}
    assert len(catalog.read_state().history["ctr_pin"]) == depth - 1
    assert _served("ctr_user", "ctr_pin") == {"ctr_user": "v1", "ctr_pin": "v1"}

    # Killed between the catalog write and the apply: the marker stays, the retry finishes the same
    # rollback instead of popping another version.
    promote(platform, "ctr", "v2", repo=FeatureRepo())
    depth = len(catalog.read_state().history["ctr_pin"])
    with pytest.raises(KeyboardInterrupt):
        rollback(platform, "ctr", repo=FailingApply(KeyboardInterrupt()))
    pending = catalog.read_state()
    assert pending.pending["action"] == "rollback" and pending.promoted["ctr_pin"] == "v1"
    assert _served("ctr_pin") == {"ctr_pin": "v2"}, "Feast still serves v2 until the apply runs"
    assert rollback(platform, "ctr", repo=FeatureRepo()) == {"ctr_user": "v1", "ctr_pin": "v1"}
    after = catalog.read_state()
    assert after.pending is None and len(after.history["ctr_pin"]) == depth - 1
    assert _served("ctr_user", "ctr_pin") == {"ctr_user": "v1", "ctr_pin": "v1"}

    # Killed after its last catalog write, the caller cannot tell whether it completed: a retry naming the
    # version it rolled back from finds it in last_change and does nothing; a wrong version is refused.
    from derm.materialization.publish import PublishError

    assert after.last_change["action"] == "rollback" and after.last_change["from"]["ctr_pin"] == "v2"
    assert rollback(platform, "ctr", repo=FeatureRepo(), from_version="v2") == {"ctr_user": "v1", "ctr_pin": "v1"}
    assert catalog.read_state() == after
    with pytest.raises(PublishError, match="not v3: nothing rolled back"):
        rollback(platform, "ctr", repo=FeatureRepo(), from_version="v3")
