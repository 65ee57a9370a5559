"""Move the ranker feature services between published versions: promote, roll back, retire.

A promotion changes only definitions: the catalog's promoted version and the
``ctr_ranker`` / ``cvr_ranker`` feature services regenerated from it by one
``feast apply``. It is refused for a version not completely online, so a
feature service never points at a view whose newest day is missing in Redis.

Example::

    paths, repo = PlatformPaths.from_env(), FeatureRepo()
    promote(paths, "ctr", "v2", repo=repo)      # both families of the CTR model
    rollback(paths, "ctr", repo=repo)
"""

from __future__ import annotations

from derm.core.feast_repo import FeatureRepo
from derm.core.naming import FAMILIES, objective_of
from derm.core.paths import PlatformPaths
from derm.materialization.catalog import Catalog
from derm.materialization.publish import PublishError


def _resolve_families(family_or_model: str) -> list[str]:
    if family_or_model in FAMILIES:
        return [family_or_model]
    families = [f for f in FAMILIES if objective_of(f) == family_or_model]
    if not families:
        raise PublishError(f"unknown family or model {family_or_model!r}: expected one of {sorted(FAMILIES)}, ctr, cvr")
    return families


def promote(paths: PlatformPaths, family_or_model: str, version: str, *, repo: FeatureRepo) -> list[str]:
    """Point the ranker feature services at ``version`` (of one family, or of both families of a model).

    Refuses a version that is retired or not completely written online.
    """
    catalog = Catalog(paths.embeddings_offline_dir)
    families = _resolve_families(family_or_model)
    with catalog.locked():
        state = catalog.read_state()
        for family in families:
            days = [m.snapshot_date.isoformat() for m in catalog.manifests(family, version)]
            if not days or version in state.retired.get(family, []):
                raise PublishError(f"{family} {version} is not published (or retired): nothing to promote")
            if state.online.get(family, {}).get(version) != max(days):
                raise PublishError(
                    f"{family} {version}: day {max(days)} is offline but not completely online; "
                    "re-run its publish before promoting"
                )
        for family in families:
            current = state.promoted.get(family)
            if current != version:
                if current is not None:
                    state.history.setdefault(family, []).append(current)
                state.promoted[family] = version
        catalog.write_state(state)
        repo.apply()
    return families


def rollback(paths: PlatformPaths, family_or_model: str, *, repo: FeatureRepo) -> dict[str, str]:
    """Point each family back to the version promoted before the current one."""
    catalog = Catalog(paths.embeddings_offline_dir)
    families = _resolve_families(family_or_model)
    with catalog.locked():
        state = catalog.read_state()
        for family in families:
            if not state.history.get(family):
                raise PublishError(f"{family}: no earlier promoted version to roll back to")
        for family in families:
            state.promoted[family] = state.history[family].pop()
        catalog.write_state(state)
        repo.apply()
    return {f: state.promoted[f] for f in families}


def retire(paths: PlatformPaths, family_or_model: str, version: str, *, repo: FeatureRepo) -> list[str]:
    """Remove a version's feature view and its Redis fields; its offline partitions stay for audits."""
    catalog = Catalog(paths.embeddings_offline_dir)
    families = _resolve_families(family_or_model)
    with catalog.locked():
        state = catalog.read_state()
        for family in families:
            if state.promoted.get(family) == version:
                raise PublishError(f"{family} {version} is promoted: promote or roll back to another version first")
            if not catalog.manifests(family, version):
                raise PublishError(f"{family} {version} is not published")
        for family in families:
            retired = state.retired.setdefault(family, [])
            if version not in retired:
                retired.append(version)
            state.history[family] = [v for v in state.history.get(family, []) if v != version]
        catalog.write_state(state)
        # feast apply drops the view; Feast's Redis store then deletes that view's fields from every key.
        repo.apply()
    return families
