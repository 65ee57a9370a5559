"""``derm publish``, ``accept``, ``discard``, ``compat``, ``promote``, ``rollback``, ``retire`` and ``freshness``.

After ``derm publish --all`` refused a day (it prints the table of published, refused and blocked
snapshots and exits 1), there are two ways on:

* ``derm accept SNAPSHOT_DIR --reason TEXT``: publish the refused day anyway; the reason is
  recorded in the catalog and shown by ``derm freshness``;
* ``derm discard SNAPSHOT_DIR``, then ``derm train-upstream``: move the refused day and the later
  days of its chain aside and re-derive them from the last day left.

Either way, ``derm publish --all`` then publishes the days that were blocked behind it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click


def _paths():
    from derm.core.paths import PlatformPaths

    return PlatformPaths.from_env()


def _repo():
    from derm.core.feast_repo import FeatureRepo

    return FeatureRepo()


THRESHOLDS_HELP = "Gate thresholds YAML replacing validation/thresholds.yaml."


def _check_thresholds(_ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    """Read the file at once: a typo in it is a usage error, before any store is touched."""
    if value is not None:
        import yaml

        from derm.validation.thresholds import load_thresholds

        try:
            load_thresholds(value)
        except (ValueError, TypeError, AttributeError, yaml.YAMLError) as exc:
            raise click.BadParameter(f"{value}: {exc}") from exc
    return value


def thresholds_option(function):
    """``--thresholds PATH``: the same option, with the same help, on every command that gates."""
    return click.option(
        "--thresholds",
        type=click.Path(path_type=Path, dir_okay=False, exists=True),
        default=None,
        callback=_check_thresholds,
        help=THRESHOLDS_HELP,
    )(function)


@click.command("publish")
@click.argument("snapshot_dirs", nargs=-1, type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option(
    "--all", "publish_all", is_flag=True, help="Publish every snapshot not yet published, each chain in day order."
)
@thresholds_option
def publish(snapshot_dirs: tuple[Path, ...], publish_all: bool, thresholds: Path | None) -> None:
    """Validate snapshots with the Great Expectations gate, then publish them offline, to Feast and to Redis.

    Each (family, version) is published in day order; a refused day blocks only the later days of its own
    chain (they are not validated: the drift check compares to the day before) and everything else is
    published. Prints the table of published, refused and blocked snapshots; exits 1 if any was refused.
    Then: `derm accept SNAPSHOT_DIR --reason TEXT`, or `derm discard SNAPSHOT_DIR` and `derm train-upstream`.
    """
    from derm.cli.runtime import online_store
    from derm.materialization.publish import freshness, pending_snapshots, publish_batch

    paths = _paths()
    targets = list(snapshot_dirs) + (pending_snapshots(paths) if publish_all else [])
    if not targets:
        click.echo("nothing to publish")
        return
    with online_store(paths):
        batch = publish_batch(
            targets, paths, repo=_repo(), thresholds_path=thresholds, log=lambda line: click.echo(line, err=True)
        )
    click.echo(batch.table())
    for family in freshness(paths):
        click.echo(f"freshness {family.describe()}")
    if not batch.ok:
        sys.exit(1)


@click.command("accept")
@click.argument("snapshot_dir", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option(
    "--reason", required=True, help="Why it is published anyway: recorded in the catalog, shown by freshness."
)
@thresholds_option
def accept_command(snapshot_dir: Path, reason: str, thresholds: Path | None) -> None:
    """Publish SNAPSHOT_DIR although the gate refuses it, recording --reason and the gate's summary.

    Runs everything publish runs (the gate too, its report kept); only the gate's failure does not stop
    it. Then `derm publish --all` publishes the days of the chain that were blocked behind it.
    """
    from derm.cli.runtime import online_store
    from derm.materialization.publish import PublishError, accept_snapshot

    paths = _paths()
    with online_store(paths):
        try:
            result = accept_snapshot(snapshot_dir, paths, repo=_repo(), reason=reason, thresholds_path=thresholds)
        except PublishError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(result.summary())


@click.command("discard")
@click.argument("snapshot_dir", type=click.Path(path_type=Path, file_okay=False, exists=True))
def discard_command(snapshot_dir: Path) -> None:
    """Move a refused SNAPSHOT_DIR and the later days of its chain aside, for `derm train-upstream` to re-derive.

    None of them may be published. The refresh re-exports each missing day from its checkpoint, averaged
    onto the last day left; `derm publish --all` then publishes them. The folders are kept under
    <data dir>/discarded.
    """
    from derm.materialization.publish import PublishError, discard_snapshots

    try:
        discarded = discard_snapshots(snapshot_dir, _paths())
    except PublishError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(discarded.describe())


def _promotion_error(function):
    """Run a promotion command; a refusal is one line and exit code 1, nothing changed."""
    import functools

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        from derm.experiments.compatibility import CompatError
        from derm.materialization.publish import PublishError

        try:
            return function(*args, **kwargs)
        except (PublishError, CompatError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def _override_options(function):
    function = click.option(
        "--reason", default=None, help="Why (required with --family-only or --override-compat; recorded)."
    )(function)
    return click.option(
        "--family-only",
        is_flag=True,
        help="Move one family alone (FAMILY, e.g. ctr_pin): mixes two embedding spaces; recorded with --reason.",
    )(function)


@click.command("compat")
@click.argument("family_or_model")
@click.argument("new")
@click.option("--against", "old", default=None, help="The version to compare with (default: the promoted one).")
@click.option(
    "--thresholds",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="YAML whose compat: section replaces the one in validation/thresholds.yaml.",
)
@_promotion_error
def compat_command(family_or_model: str, new: str, old: str | None, thresholds: Path | None) -> None:
    """Compatibility gate: may model version NEW replace the promoted one (or --against OLD) under the rankers?

    Compares the two versions' spaces (per-entity agreement after orthogonal Procrustes alignment, the users'
    Pin neighbour overlap@k) and the promoted ranker's ROC-AUC on the latest labelled days with the new
    embeddings vs the old (and a ranker trained on NEW, when one is saved). Prints the verdict
    (compatible / needs-retrain / incompatible) and writes the Markdown + PNG report under
    $DERM_DATA_DIR/reports. Exits 1 when incompatible.
    """
    from derm.cli.runtime import online_store
    from derm.experiments.compatibility import INCOMPATIBLE, CompatThresholds, compatibility, write_compat_report

    paths = _paths()
    with online_store(paths):  # the feature repo's configuration names the online store
        report = compatibility(
            paths,
            _repo().store(),
            family_or_model,
            new,
            old,
            thresholds=CompatThresholds.load(thresholds),
            log=lambda line: click.echo(line, err=True),
        )
    markdown = write_compat_report(paths, report)
    click.echo(report.summary())
    click.echo(f"report: {markdown}")
    if report.verdict == INCOMPATIBLE:
        sys.exit(1)


def _gate_promotion(paths, model: str, version: str, override: str | None) -> dict | None:
    """Run the compatibility gate before a model promotion; its catalog record, or a refusal."""
    from derm.experiments.compatibility import INCOMPATIBLE, CompatError, compatibility, write_compat_report
    from derm.materialization.catalog import Catalog
    from derm.materialization.promotion import resolve_families

    state = Catalog(paths.embeddings_offline_dir).read_state()
    current = {state.promoted.get(f) for f in resolve_families(model)}
    if current == {version}:
        return None  # nothing moves
    if current == {None}:
        return None  # nothing promoted yet: nothing to be compatible with
    if len(current) != 1 or None in current:
        if override is None:
            raise click.ClickException(
                f"{model}: its families are at {sorted(map(str, current))} (a family-only override): no single version "
                "to compare with; promote with --override-compat --reason TEXT to re-unite them"
            )
        return {"against": None, "verdict": "not-run", "override": override, "serve_older_rankers": False}
    try:
        report = compatibility(paths, _repo().store(), model, version, log=lambda line: click.echo(line, err=True))
    except CompatError as exc:
        if override is None:
            raise click.ClickException(f"compatibility gate could not run: {exc}; or --override-compat") from exc
        return {"against": current.pop(), "verdict": "not-run", "override": override, "serve_older_rankers": True}
    markdown = write_compat_report(paths, report)
    click.echo(report.summary())
    click.echo(f"compatibility report: {markdown}")
    record = report.record()
    if report.verdict == INCOMPATIBLE:
        raise click.ClickException(f"{model} {version} is incompatible with {report.old}: not promoted ({markdown})")
    if not report.promotable:
        if override is None:
            raise click.ClickException(
                f"{model} {version} needs a ranker retrained on it (no saved ranker is): train one, or promote with "
                f"--override-compat --reason TEXT to let the rankers of {report.old} serve it ({markdown})"
            )
        record.update(override=override, serve_older_rankers=True)
    return record


@click.command("promote")
@click.argument("model")
@click.argument("version")
@_override_options
@click.option(
    "--override-compat",
    is_flag=True,
    help="Promote a needs-retrain version without a retrained ranker (rankers of the old version serve it); "
    "recorded with --reason.",
)
@_promotion_error
def promote_command(model: str, version: str, family_only: bool, reason: str | None, override_compat: bool) -> None:
    """Point the ranker feature services at VERSION of MODEL (ctr or cvr): its user and Pin families together.

    Refused unless both families of VERSION are online for the same newest day, and unless the compatibility
    gate (`derm compat`) says compatible, or needs-retrain with a ranker trained on VERSION saved.
    """
    from derm.cli.runtime import online_store
    from derm.materialization.promotion import promote, resolve_families

    resolve_families(model, family_only=family_only, reason=reason)  # refuse a bad call before any work
    if override_compat and not (reason or "").strip():
        raise click.UsageError("--override-compat needs --reason TEXT (recorded in the catalog)")
    paths = _paths()
    with online_store(paths):
        record = None
        if not family_only:
            record = _gate_promotion(paths, model, version, reason if override_compat else None)
        families = promote(paths, model, version, repo=_repo(), family_only=family_only, reason=reason, compat=record)
    click.echo(f"promoted {version} for {', '.join(families)}")


@click.command("rollback")
@click.argument("model")
@click.option(
    "--from",
    "from_version",
    metavar="VERSION",
    help="The version being rolled back: a retry after a kill does nothing if this rollback already completed.",
)
@_override_options
@_promotion_error
def rollback_command(model: str, from_version: str | None, family_only: bool, reason: str | None) -> None:
    """Point MODEL (ctr or cvr; a family with --family-only) back to its previously promoted version."""
    from derm.cli.runtime import online_store
    from derm.materialization.promotion import resolve_families, rollback

    resolve_families(model, family_only=family_only, reason=reason)
    with online_store(_paths()):
        versions = rollback(
            _paths(), model, repo=_repo(), family_only=family_only, reason=reason, from_version=from_version
        )
    click.echo(", ".join(f"{f} -> {v}" for f, v in versions.items()))


@click.command("retire")
@click.argument("model")
@click.argument("version")
@_override_options
@_promotion_error
def retire_command(model: str, version: str, family_only: bool, reason: str | None) -> None:
    """Drop VERSION's feature views and Redis fields (both families of MODEL); its offline partitions are kept."""
    from derm.cli.runtime import online_store
    from derm.materialization.promotion import resolve_families, retire

    resolve_families(model, family_only=family_only, reason=reason)
    with online_store(_paths()):
        families = retire(_paths(), model, version, repo=_repo(), family_only=family_only, reason=reason)
    click.echo(f"retired {version} of {', '.join(families)}")


@click.command("freshness")
@click.option("--offline-only", is_flag=True, help="The catalog alone: do not compare Redis with it.")
def freshness_command(offline_only: bool) -> None:
    """Age of the newest promoted snapshot per family, gaps and accepted days, and what Redis really holds.

    Exits 1 when a day is missing, or when a published view is not completely in Redis (``stale``,
    ``missing``, ``empty``: run ``derm repair``).
    """
    from derm.materialization.publish import freshness

    paths = _paths()
    report = freshness(paths)
    for family in report:
        click.echo(family.describe())
    online_ok = True
    if not offline_only:
        from derm.cli.runtime import online_store
        from derm.materialization.online_state import online_status

        with online_store(paths):
            states = online_status(paths, _repo())
        for state in states:
            click.echo(f"online {state.describe()}")
        online_ok = all(state.status == "ok" for state in states)
        if not online_ok:
            click.echo("Redis lacks published days: `derm repair` re-materializes them from the offline store")
    if not all(f.ok for f in report) or not online_ok:
        sys.exit(1)


@click.command("repair")
def repair_command() -> None:
    """Re-materialize from the offline store whatever Redis lacks (idempotent); print what Redis then holds."""
    from derm.cli.runtime import online_store
    from derm.materialization.online_state import repair

    paths = _paths()
    with online_store(paths):
        repaired = repair(paths, _repo())
    if not repaired:
        click.echo("every published view is completely in Redis: nothing to repair")
    for item in repaired:
        click.echo(
            f"{item.view}: {item.days} published days re-materialized; Redis holds {item.rows_held} of the newest "
            f"day's {item.rows_expected} entities"
        )
    if any(item.rows_held != item.rows_expected for item in repaired):
        sys.exit(1)
