"""Move the ranker feature services between published model versions: promote, roll back, retire.

A *model version* is the unit of promotion: ``ctr v2`` is the user family ``ctr_user`` and the Pin
family ``ctr_pin`` of DERM-CTR's version ``v2``, one embedding space. :func:`promote`,
:func:`rollback` and :func:`retire` move both families together, in one catalog write followed by
one ``feast apply``, so the ``ctr_ranker`` / ``cvr_ranker`` feature services (and the ANN index,
which is built from the promoted Pin version and queried with the same version's users) never mix
a v2 user tower with v1 Pins. A promotion is refused unless both families of the version are
completely online *for the same day*, the newest one either has.

Moving one family alone is an override: ``family_only=True`` with a ``reason``, recorded in the
catalog's ``overrides`` with who and when. So is promoting past the compatibility gate
(:mod:`derm.experiments.compatibility`, run by ``derm promote``): the gate's record given as
``compat`` is kept in the catalog, where serving reads whether rankers trained on the replaced
version may score the new one.

Crash safety (issue 12): the catalog is written with a ``pending`` record (what moves, from which
versions to which, the views a retirement drops), then ``feast apply`` runs, then the record moves to
``last_change``. A failed apply of a promotion or rollback puts the previous catalog back (so a retried
rollback goes back one version, not two); a process killed at any instant leaves the record, and the next
promote, rollback or retire finishes that change (one ``feast apply``) before doing anything else. A
retirement clears the dropped views' Redis rows *before* its apply (Feast's SQL registry forgets a dropped
view before clearing its rows, so a kill in between would strand them) and is always rolled forward.
A rollback retried with ``from_version`` after it completed (the caller could not tell) finds it in
``last_change`` and does nothing. Every instant is exercised by ``tests/test_kill_operations.py``.

Example::

    paths, repo = PlatformPaths.from_env(), FeatureRepo()
    promote(paths, "ctr", "v2", repo=repo)      # both families of the CTR model
    rollback(paths, "ctr", repo=repo)
    promote(paths, "ctr_pin", "v3", repo=repo, family_only=True, reason="hotfix of the Pin tower")
"""

from __future__ import annotations

import getpass
from datetime import UTC, datetime
from typing import Any

from derm.core.feast_repo import FeatureRepo
from derm.core.naming import FAMILIES, OBJECTIVES, families_of, feature_view_name, objective_of
from derm.core.paths import PlatformPaths
from derm.materialization.catalog import Catalog, CatalogState
from derm.materialization.publish import PublishError


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return "unknown"


def resolve_families(family_or_model: str, *, family_only: bool = False, reason: str | None = None) -> list[str]:
    """The families an operation moves: both of a model, or one family behind ``family_only`` with a reason.

    Raises:
        PublishError: unknown name; a family without ``family_only``; ``family_only`` without a reason
            or with a model name.
    """
    if family_or_model in OBJECTIVES:
        if family_only:
            raise PublishError(f"--family-only needs a family ({', '.join(families_of(family_or_model).values())})")
        return list(families_of(family_or_model).values())
    if family_or_model not in FAMILIES:
        raise PublishError(
            f"unknown model or family {family_or_model!r}: expected one of {sorted(OBJECTIVES)} "
            f"or, with --family-only, {sorted(FAMILIES)}"
        )
    if not family_only:
        model = objective_of(family_or_model)
        raise PublishError(
            f"{family_or_model} is one family of model {model}: a model version moves as a whole "
            f"(`derm promote {model} VERSION`); moving one family alone mixes two embedding spaces and needs "
            "--family-only --reason TEXT"
        )
    if not reason or not reason.strip():
        raise PublishError(f"--family-only {family_or_model}: give --reason (recorded in the catalog)")
    return [family_or_model]


def _record_override(state: CatalogState, action: str, families: list[str], version: str | None, reason: str) -> None:
    state.overrides.append(
        {"action": action, "families": families, "version": version, "reason": reason, "by": _operator(), "at": _now()}
    )


def _commit(
    catalog: Catalog,
    before: CatalogState,
    after: CatalogState,
    action: str,
    families: list[str],
    repo: FeatureRepo,
    views_to_drop: list[str] | None = None,
) -> None:
    """One catalog write (with its ``pending`` record), one ``feast apply``, then the record is cleared.

    A promotion or rollback whose apply fails gets the previous catalog back; a retirement, whose Redis
    rows may already be gone, keeps its record and is finished by the next command.
    """
    after.pending = {
        "action": action,
        "families": families,
        "from": {family: before.promoted.get(family) for family in families},
        "to": {family: after.promoted.get(family) for family in families},
        "views": views_to_drop or [],
        "at": _now(),
    }
    catalog.write_state(after)
    try:
        _carry_out(after.pending, repo)
    except Exception:
        if action != "retire":
            # Nothing of this change is left: a retry starts from the same catalog (issue 12, item 4).
            catalog.write_state(before)
        raise
    after.last_change, after.pending = after.pending, None
    catalog.write_state(after)


def _carry_out(pending: dict[str, Any], repo: FeatureRepo) -> None:
    """What a catalog change needs outside the catalog: the dropped views' Redis rows cleared, ``feast apply``.

    Both steps are idempotent, so a change interrupted anywhere is finished by running them again.
    """
    if pending.get("views"):
        repo.teardown_views(pending["views"])
    repo.apply()  # the registry is generated from the catalog, which already holds the change


def _finish_pending(catalog: Catalog, state: CatalogState, repo: FeatureRepo) -> dict[str, Any] | None:
    """Finish a change interrupted after its catalog write (the process was killed); returns what it was."""
    pending = state.pending
    if pending is None:
        return None
    _carry_out(pending, repo)
    state.last_change, state.pending = pending, None
    catalog.write_state(state)
    return pending


def _online_day(catalog: Catalog, state: CatalogState, family: str, version: str) -> str:
    days = [m.snapshot_date.isoformat() for m in catalog.manifests(family, version)]
    if not days or version in state.retired.get(family, []):
        raise PublishError(f"{family} {version} is not published (or retired): nothing to promote")
    newest = max(days)
    if state.online.get(family, {}).get(version) != newest:
        raise PublishError(
            f"{family} {version}: day {newest} is offline but not completely online; "
            "re-run its publish before promoting"
        )
    return newest


def promote(
    paths: PlatformPaths,
    family_or_model: str,
    version: str,
    *,
    repo: FeatureRepo,
    family_only: bool = False,
    reason: str | None = None,
    compat: dict[str, Any] | None = None,
) -> list[str]:
    """Point the ranker feature services at ``version`` of a model (both families), in one catalog change.

    Args:
        paths: platform locations.
        family_or_model: ``"ctr"`` / ``"cvr"``; a family (``"ctr_pin"``) only with ``family_only``.
        version: the model version, e.g. ``"v2"``.
        repo: the Feast repository (one ``feast apply``).
        family_only: move one family alone (an override, recorded with ``reason``).
        reason: why, for an override (``family_only``, or ``compat["override"]``).
        compat: the compatibility gate's record for this promotion (kept in the catalog's ``compat``;
            ``serve_older_rankers`` there lets rankers trained on the replaced version score this one).

    Returns:
        The families moved.

    Raises:
        PublishError: a version retired, unpublished or not completely online; the two families not
            online for the same newest day; a family without ``family_only`` or an override without reason.
    """
    families = resolve_families(family_or_model, family_only=family_only, reason=reason)
    catalog = Catalog(paths.embeddings_offline_dir)
    with catalog.locked():
        state = catalog.read_state()
        _finish_pending(catalog, state, repo)
        before = catalog.read_state()
        days = {family: _online_day(catalog, state, family, version) for family in families}
        if len(set(days.values())) > 1:
            listed = ", ".join(f"{f} through {d}" for f, d in days.items())
            raise PublishError(
                f"{version}: its families are not online for the same newest day ({listed}); publish the missing "
                "day of the other family first, so that users and Pins come from one day of one model"
            )
        moved = [family for family in families if state.promoted.get(family) != version]
        for family in moved:
            current = state.promoted.get(family)
            if current is not None:
                state.history.setdefault(family, []).append(current)
            state.promoted[family] = version
        if family_only:
            _record_override(state, "promote", families, version, reason or "")
        if compat is not None:
            objective = objective_of(families[0])
            state.compat.setdefault(objective, {})[version] = {**compat, "at": _now()}
            if compat.get("override"):
                _record_override(state, "promote-past-compat", families, version, str(compat["override"]))
        if moved or compat is not None:
            _commit(catalog, before, state, "promote", families, repo)
    return families


def rollback(
    paths: PlatformPaths,
    family_or_model: str,
    *,
    repo: FeatureRepo,
    family_only: bool = False,
    reason: str | None = None,
    from_version: str | None = None,
) -> dict[str, str]:
    """Point a model's families (or one, with ``family_only``) back to the version promoted before the current one.

    A model rolls back only when its families were promoted together: the user and the Pin family must
    be at the same version now and go back to the same earlier version.

    Args:
        from_version: the version being rolled back, for a retry that must not go back twice: when the
            families are no longer at it because this very rollback completed (the catalog's
            ``last_change``), nothing is done.

    Raises:
        PublishError: no earlier version; the families' histories disagree (roll back with
            ``family_only`` instead, or promote a version); ``from_version`` is not what is promoted and
            was not the last rollback.
    """
    families = resolve_families(family_or_model, family_only=family_only, reason=reason)
    catalog = Catalog(paths.embeddings_offline_dir)
    with catalog.locked():
        state = catalog.read_state()
        pending = _finish_pending(catalog, state, repo)
        if pending is not None and pending["action"] == "rollback" and pending["families"] == families:
            # The same rollback was interrupted after its catalog write: it is done now; popping again
            # would go back two versions.
            return {f: state.promoted[f] for f in families}
        if from_version is not None and any(state.promoted.get(f) != from_version for f in families):
            last = state.last_change or {}
            done = (
                last.get("action") == "rollback"
                and last.get("families") == families
                and set(last.get("from", {}).values()) == {from_version}
                and all(state.promoted.get(f) == last.get("to", {}).get(f) for f in families)
            )
            if done:
                return {f: state.promoted[f] for f in families}
            currents = {f: state.promoted.get(f) for f in families}
            raise PublishError(f"{family_or_model}: promoted is {currents}, not {from_version}: nothing rolled back")
        before = catalog.read_state()
        for family in families:
            if not state.history.get(family):
                raise PublishError(f"{family}: no earlier promoted version to roll back to")
        targets = {family: state.history[family][-1] for family in families}
        currents = {family: state.promoted.get(family) for family in families}
        if len(families) > 1 and (len(set(targets.values())) > 1 or len(set(currents.values())) > 1):
            raise PublishError(
                f"{family_or_model}: its families were not promoted together (now {currents}, before {targets}); "
                f"promote one model version, or roll back one family with --family-only --reason TEXT"
            )
        for family in families:
            state.promoted[family] = state.history[family].pop()
        if family_only:
            _record_override(state, "rollback", families, targets[families[0]], reason or "")
        _commit(catalog, before, state, "rollback", families, repo)
    return {f: state.promoted[f] for f in families}


def retire(
    paths: PlatformPaths,
    family_or_model: str,
    version: str,
    *,
    repo: FeatureRepo,
    family_only: bool = False,
    reason: str | None = None,
) -> list[str]:
    """Remove a model version's feature views and Redis fields; its offline partitions stay for audits."""
    families = resolve_families(family_or_model, family_only=family_only, reason=reason)
    catalog = Catalog(paths.embeddings_offline_dir)
    with catalog.locked():
        state = catalog.read_state()
        _finish_pending(catalog, state, repo)
        before = catalog.read_state()
        published = [family for family in families if catalog.manifests(family, version)]
        if not published:
            raise PublishError(f"{family_or_model} {version} is not published")
        for family in families:
            if state.promoted.get(family) == version:
                raise PublishError(f"{family} {version} is promoted: promote or roll back to another version first")
        if all(version in state.retired.get(f, []) and version not in state.history.get(f, []) for f in published):
            return published  # retired already: a retry changes nothing
        for family in published:
            retired = state.retired.setdefault(family, [])
            if version not in retired:
                retired.append(version)
            state.history[family] = [v for v in state.history.get(family, []) if v != version]
        if family_only:
            _record_override(state, "retire", families, version, reason or "")
        # The views' Redis fields are deleted first, then feast apply drops the views (see the module docstring).
        views = [feature_view_name(family, version) for family in published]
        _commit(catalog, before, state, "retire", published, repo, views_to_drop=views)
    return published


__all__ = ["promote", "resolve_families", "retire", "rollback"]
