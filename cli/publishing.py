"""``derm publish``, ``accept``, ``discard``, ``promote``, ``rollback``, ``retire`` and ``freshness``.

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


@click.command("promote")
@click.argument("family")
@click.argument("version")
def promote_command(family: str, version: str) -> None:
    """Point the ranker feature services at VERSION of FAMILY (or of both families of model ctr/cvr)."""
    from derm.cli.runtime import online_store
    from derm.materialization.promotion import promote

    with online_store(_paths()):
        families = promote(_paths(), family, version, repo=_repo())
    click.echo(f"promoted {version} for {', '.join(families)}")


@click.command("rollback")
@click.argument("family")
def rollback_command(family: str) -> None:
    """Point FAMILY (or model ctr/cvr) back to its previously promoted version."""
    from derm.cli.runtime import online_store
    from derm.materialization.promotion import rollback

    with online_store(_paths()):
        versions = rollback(_paths(), family, repo=_repo())
    click.echo(", ".join(f"{f} -> {v}" for f, v in versions.items()))


@click.command("retire")
@click.argument("family")
@click.argument("version")
def retire_command(family: str, version: str) -> None:
    """Drop VERSION's feature view and Redis fields; its offline partitions are kept."""
    from derm.cli.runtime import online_store
    from derm.materialization.promotion import retire

    with online_store(_paths()):
        families = retire(_paths(), family, version, repo=_repo())
    click.echo(f"retired {version} of {', '.join(families)}")


@click.command("freshness")
def freshness_command() -> None:
    """Age of the newest promoted snapshot per family, gaps and accepted days; exits 1 when a day is missing."""
    from derm.materialization.publish import freshness

    report = freshness(_paths())
    for family in report:
        click.echo(family.describe())
    if not all(f.ok for f in report):
        sys.exit(1)
