"""Click commands of the leakage audit: ``audit-leakage TRAINING_SET`` and ``leakage-experiment``.

Heavy imports happen inside the commands, so ``derm --help`` answers at once.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import click


def _parse_versions(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    versions = {}
    for value in values:
        family, sep, version = value.partition("=")
        if not sep or not family or not version:
            raise click.BadParameter(f"{value!r}: expected FAMILY=VERSION, e.g. ctr_user=v1")
        versions[family] = version
    return versions


@click.command("audit-leakage")
@click.argument("training_set", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "--version",
    "versions",
    multiple=True,
    callback=_parse_versions,
    help="FAMILY=VERSION to audit against (default: the file's metadata, else the promoted version).",
)
@click.option("--show", type=click.IntRange(min=0), default=20, show_default=True, help="Violations to print.")
def audit_leakage(training_set: Path, versions: dict[str, str], show: int) -> None:
    """Prove a training set point-in-time correct against a DuckDB ASOF oracle; exit 1 on any violation."""
    from pipeline.config import PlatformPaths
    from validation.leakage import audit_training_set

    try:
        report = audit_training_set(training_set, PlatformPaths.from_env(), versions=versions, max_reported=show)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(report.describe(limit=show))
    sys.exit(0 if report.ok else 1)


@click.command("leakage-experiment")
@click.option("--task", type=click.Choice(["ctr", "cvr"]), default="ctr", show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--eval-days", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--bootstrap", type=click.IntRange(min=10), default=1000, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch intra-op threads.")
def leakage_experiment_command(task: str, epochs: int, eval_days: int, bootstrap: int, threads: int | None) -> None:
    """Train on a point-in-time and on a deliberately leaky training set; report the AUC inflation and audit both."""
    import torch
    from rich.console import Console

    from pipeline.config import PlatformPaths
    from pipeline.feast_repo import online_store
    from training.ablation import comparison_markdown, leakage_experiment, write_report
    from training.downstream import DownstreamConfig

    if threads:
        torch.set_num_threads(threads)
    console = Console(stderr=True)
    paths = PlatformPaths.from_env()
    with online_store(paths):
        experiment = leakage_experiment(
            paths,
            DownstreamConfig(epochs=epochs, eval_days=eval_days, bootstrap=bootstrap),
            task,
            log=partial(console.print, markup=False, highlight=False),
        )
    audits = (
        "## Leakage audit\n\n"
        f"```\n{experiment.point_in_time_audit.describe(limit=5)}\n```\n\n"
        f"```\n{experiment.leaky_audit.describe(limit=5)}\n```\n"
    )
    report = write_report(paths, "leakage_experiment", "Leakage experiment", [experiment.comparison], extra=audits)
    click.echo(comparison_markdown(experiment.comparison))
    click.echo(audits)
    click.echo(f"wrote {report} and {report.with_suffix('.png')}")
    if experiment.point_in_time_audit.ok is False or experiment.leaky_audit.ok:
        raise click.ClickException("the audit did not separate the point-in-time set from the leaky one")
