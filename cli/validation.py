"""``derm validate``: run the validation gate on embedding snapshots from the command line."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import click


@click.command("validate")
@click.argument("snapshot_dirs", nargs=-1, type=click.Path(path_type=Path, file_okay=False))
@click.option("--family", help="Embedding family (ctr_user, ctr_pin, cvr_user, cvr_pin), instead of SNAPSHOT_DIRS.")
@click.option("--version", "model_version", help="Model version of --family, e.g. v1.")
@click.option(
    "--date",
    "day",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    help="Snapshot day of --family/--version; default: the latest one.",
)
@click.option(
    "--thresholds",
    "thresholds_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Thresholds YAML replacing validation/thresholds.yaml.",
)
@click.option(
    "--docs-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Root of the GE project and Data Docs; default: <data dir>/validation.",
)
def validate(
    snapshot_dirs: tuple[Path, ...],
    family: str | None,
    model_version: str | None,
    day: datetime | None,
    thresholds_path: Path | None,
    docs_dir: Path | None,
) -> None:
    """Validate embedding snapshots; exit non-zero if any fails.

    Give SNAPSHOT_DIRS, or --family and --version (and optionally --date) to pick a snapshot
    under the platform's snapshots directory.
    """
    from derm.core.paths import PlatformPaths
    from derm.validation.gate import GateThresholds, validate_snapshot

    thresholds = GateThresholds.load(thresholds_path)
    docs_dir = docs_dir or PlatformPaths.from_env().validation_dir
    targets = list(snapshot_dirs) or [_snapshot_from_options(family, model_version, day)]
    all_passed = True
    for target in targets:
        report = validate_snapshot(target, thresholds=thresholds, docs_dir=docs_dir)
        all_passed &= report.success
        mark = click.style("PASS", fg="green") if report.success else click.style("FAIL", fg="red")
        click.echo(f"{mark} {target}")
        for failure in report.failures:
            click.echo(f"  x {failure}")
        for note in report.notes:
            click.echo(f"  - {note}")
        if report.data_docs_page is not None:
            click.echo(f"  Data Docs: {report.data_docs_page}")
        click.echo(f"  {report.summary}")
    if not all_passed:
        raise SystemExit(1)


def _snapshot_from_options(family: str | None, model_version: str | None, day: datetime | None) -> Path:
    from derm.core.paths import PlatformPaths
    from derm.core.snapshot import list_snapshots, snapshot_dir

    if not family or not model_version:
        raise click.UsageError("give SNAPSHOT_DIRS, or --family and --version")
    snapshots = PlatformPaths.from_env().snapshots_dir
    if day is not None:
        return snapshot_dir(snapshots, family, model_version, day.date())
    candidates = [path for path in list_snapshots(snapshots, family) if path.parent.name == model_version]
    if not candidates:
        raise click.UsageError(f"no snapshot of {family} {model_version} under {snapshots}")
    return candidates[-1]


@click.command("docs")
@click.option(
    "--docs-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Root of the GE project and Data Docs; default: <data dir>/validation.",
)
def docs(docs_dir: Path | None) -> None:
    """Build the Great Expectations Data Docs site (index and the kept results' pages); print its index.

    Each validation renders only its own page, so publishing costs the same on day 1,000 as on day
    10; the index that lists them is built here, on demand (``derm run-all`` ends with it).
    """
    from derm.core.paths import PlatformPaths
    from derm.validation.gate import VALIDATION_RESULTS_KEPT_PER_SUITE, build_data_docs_index

    root = docs_dir or PlatformPaths.from_env().validation_dir
    if not (root / "gx").exists():
        raise click.ClickException(f"no validation results under {root}: nothing was validated yet")
    index = build_data_docs_index(root)
    click.echo(f"Data Docs: {index} (the newest {VALIDATION_RESULTS_KEPT_PER_SUITE} results of each suite)")
