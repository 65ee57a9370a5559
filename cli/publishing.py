"""``derm publish``, ``promote``, ``rollback``, ``retire`` and ``freshness``."""

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


@click.command("publish")
@click.argument("snapshot_dirs", nargs=-1, type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--all", "publish_all", is_flag=True, help="Publish every snapshot not yet published, oldest first.")
@click.option("--thresholds", type=click.Path(path_type=Path, dir_okay=False, exists=True), help="Gate thresholds.")
def publish(snapshot_dirs: tuple[Path, ...], publish_all: bool, thresholds: Path | None) -> None:
    """Validate snapshots with the Great Expectations gate, then publish them offline, to Feast and to Redis."""
    from rich.progress import track

    from derm.cli.runtime import online_store
    from derm.materialization.publish import PublishError, freshness, pending_snapshots, publish_snapshot
    from derm.validation.gate import ValidationFailed

    paths = _paths()
    targets = list(snapshot_dirs) + (pending_snapshots(paths) if publish_all else [])
    if not targets:
        click.echo("nothing to publish")
        return
    with online_store(paths):
        for directory in track(targets, description="publishing", console=None, transient=True):
            try:
                result = publish_snapshot(directory, paths, repo=_repo(), thresholds_path=thresholds)
            except (PublishError, ValidationFailed) as exc:
                click.echo(f"REFUSED {directory}\n{exc}", err=True)
                sys.exit(1)
            click.echo(result.summary().splitlines()[0])
    for family in freshness(paths):
        click.echo(f"freshness {family.describe()}")


@click.command("promote")
@click.argument("family")
@click.argument("version")
def promote_command(family: str, version: str) -> None:
    """Point the ranker feature services at VERSION of FAMILY (or of both families of model ctr/cvr)."""
    from derm.cli.runtime import online_store
    from derm.materialization.publish import promote

    with online_store(_paths()):
        families = promote(_paths(), family, version, repo=_repo())
    click.echo(f"promoted {version} for {', '.join(families)}")


@click.command("rollback")
@click.argument("family")
def rollback_command(family: str) -> None:
    """Point FAMILY (or model ctr/cvr) back to its previously promoted version."""
    from derm.cli.runtime import online_store
    from derm.materialization.publish import rollback

    with online_store(_paths()):
        versions = rollback(_paths(), family, repo=_repo())
    click.echo(", ".join(f"{f} -> {v}" for f, v in versions.items()))


@click.command("retire")
@click.argument("family")
@click.argument("version")
def retire_command(family: str, version: str) -> None:
    """Drop VERSION's feature view and Redis fields; its offline partitions are kept."""
    from derm.cli.runtime import online_store
    from derm.materialization.publish import retire

    with online_store(_paths()):
        families = retire(_paths(), family, version, repo=_repo())
    click.echo(f"retired {version} of {', '.join(families)}")


@click.command("freshness")
def freshness_command() -> None:
    """Age of the newest promoted snapshot per family; exits 1 when a day is missing."""
    from derm.materialization.publish import freshness

    report = freshness(_paths())
    for family in report:
        click.echo(family.describe())
    if not all(f.ok for f in report):
        sys.exit(1)
