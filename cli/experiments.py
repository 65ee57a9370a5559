"""Click commands of the paper's experiments: ``ablation`` and ``leakage-experiment``.

Heavy imports (torch, Feast, DuckDB) happen inside the commands, so ``derm --help`` answers at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime
from functools import partial
from pathlib import Path

import click

from derm.cli.downstream import downstream_config, ranker_options, training_options
from derm.cli.publishing import thresholds_option


@click.command("ablation")
@click.option(
    "--objective",
    "--task",
    type=click.Choice(["ctr", "cvr", "both"]),
    default="both",
    show_default=True,
    help="Rankers of the embedding-family ablation.",
)
@click.option(
    "--skip-aggregation", is_flag=True, help="Skip the aggregation sweep (overwrite, moving average w=0.2/0.5/0.8)."
)
@click.option("--skip-embeddings", is_flag=True, help="Skip the embedding-family ablation (run only the sweep).")
@click.option(
    "--independent-variants",
    is_flag=True,
    help="Keep every variant's own ranker. By default a variant keeps the ranker selected for the variant "
    "before it when that one has the lower validation log loss (nested selection; the step's lift is then 0).",
)
@click.option(
    "--name",
    default="ablation",
    show_default=True,
    help="Prefix of the runs and reports (to keep, e.g., a run with --sequence-encoder beside one without).",
)
@thresholds_option
@training_options
@ranker_options
def ablation(
    objective: str,
    skip_aggregation: bool,
    skip_embeddings: bool,
    independent_variants: bool,
    name: str,
    thresholds: Path | None,
    epochs: int,
    eval_days: int,
    batch_size: int,
    bootstrap: int,
    seed: int,
    threads: int | None,
    **ranker: object,
) -> None:
    """The paper's ablations: embedding families (none/user/user+pin/all four) and the aggregation sweep.

    The report sets every ranker's log loss against the base rate's, draws a reliability diagram, says
    which ranker validation kept for each nested variant (unless --independent-variants), prints the
    leakage audit of the compared rows (labels respect conversion time, embeddings are the snapshots
    known then; exit 1 if it finds a leak) and lists the upstream quality figures of the promoted
    versions' manifests. Every training set is gated with --thresholds (the sweep's snapshots are
    published with the gate's drift checks relaxed, as that ablation requires; when the promoted version is
    planted by `derm plant-upstream`, the sweep's points are planted too); a refusal lists the
    failed expectations and the Data Docs link and exits 1. A ranker the log gives nothing to learn
    (a single label class, too few labelled days) is reported as skipped with its reason (exit 0).
    """
    import torch
    from rich.console import Console

    from derm.cli.runtime import online_store
    from derm.core.feast_repo import FeatureRepo
    from derm.core.paths import PlatformPaths
    from derm.experiments.ablation import AblationConfig, aggregation_ablation, embedding_ablation
    from derm.experiments.reports import (
        comparison_markdown,
        plot_upstream_quality,
        reports_dir,
        upstream_quality_markdown,
        write_report,
    )
    from derm.training.downstream.training_sets import ranker_service, service_families

    if threads:
        torch.set_num_threads(threads)
    console = Console(stderr=True)
    paths, repo = PlatformPaths.from_env(), FeatureRepo()
    cfg = AblationConfig(
        objectives=("ctr", "cvr") if objective == "both" else (objective,),
        train=downstream_config(epochs, eval_days, batch_size, bootstrap, seed, thresholds=thresholds, **ranker),
        run_prefix=name,
        nested_selection=not independent_variants,
    )
    leaked: list[str] = []
    with online_store(paths), _refusals_end_cleanly():
        if not skip_embeddings:
            console.rule("embedding families")
            comparisons = embedding_ablation(
                paths, repo, cfg, log=partial(console.print, markup=False, highlight=False)
            )
            promoted = dict(service_families(repo.store(), ranker_service(repo.store(), "ctr")))
            quality = upstream_quality_markdown(paths.snapshots_dir, promoted)
            plot = plot_upstream_quality(paths.snapshots_dir, promoted, reports_dir(paths) / "upstream_quality.png")
            if plot is not None:
                quality += f"\n![upstream quality]({plot.name})\n"
            report = write_report(
                paths, f"{name}_embeddings", "Downstream ablation: DERM embedding families", comparisons, extra=quality
            )
            click.echo(quality)
            for comparison in comparisons:
                click.echo(comparison_markdown(comparison))
            _echo_skipped(comparisons)
            for comparison in comparisons:
                if comparison.audit:  # the verdict line of the audit printed in full with its table above
                    verdict = comparison.audit.splitlines()[-1]
                    click.echo(f"{comparison.objective} leakage audit of the ablation's rows: {verdict}")
                    if not comparison.audit_ok:
                        leaked.append(comparison.objective)
            _echo_written(report)
        if not skip_aggregation:
            console.rule("aggregation sweep: overwrite, moving average w = 0.2, 0.5, 0.8")
            comparison = aggregation_ablation(
                paths, repo, cfg, log=partial(console.print, markup=False, highlight=False)
            )
            report = write_report(
                paths, f"{name}_aggregation", "Downstream ablation: embedding aggregation", [comparison]
            )
            click.echo(comparison_markdown(comparison))
            _echo_skipped([comparison])
            _echo_written(report)
    if leaked:
        raise click.ClickException(
            f"the leakage audit of the {' and '.join(leaked)} ablation rows found values not known at their time "
            "(see the audit above): the ablation's figures are not trustworthy"
        )


@click.command("plant-upstream")
@click.option(
    "--preset",
    type=click.Choice(["tiny", "local", "real", "bench"]),
    default="local",
    show_default=True,
    help="The preset `derm generate` wrote the log with.",
)
@click.option("--days", type=int, help="As given to `derm generate` (default: the preset's).")
@click.option("--events-per-day", type=int, help="As given to `derm generate` (default: the preset's).")
@click.option(
    "--start-date", type=click.DateTime(["%Y-%m-%d"]), required=True, help="The log's first day (YYYY-MM-DD)."
)
@click.option("--seed", type=int, default=7, show_default=True, help="As given to `derm generate`.")
@click.option("--dim", type=click.IntRange(min=1), default=64, show_default=True, help="Embedding dimension.")
@click.option("--aggregation", type=click.Choice(["ema", "overwrite"]), default="ema", show_default=True)
@click.option("--ema-weight", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.8, show_default=True)
def plant_upstream_command(
    preset: str,
    days: int | None,
    events_per_day: int | None,
    start_date: datetime,
    seed: int,
    dim: int,
    aggregation: str,
    ema_weight: float,
) -> None:
    """Publishable snapshots of the synthetic generator's own tastes: a positive control for the ablation.

    For a log written by `derm generate` (same --preset, --days, --events-per-day, --start-date and --seed;
    checked byte for byte by regenerating it, exit 1 if it differs), writes a DERM-CTR and a DERM-CVR version
    whose day-t vectors are the generator's day-t user and Pin tastes (CTR: click and interest factors; CVR:
    the shared click half and purchase intent), through the refresh's own moving average, carry-forward,
    re-normalisation and next-day quality check. `derm publish --all`, `derm apply` and `derm ablation` then
    treat it like a trained version; the ablation's aggregation sweep plants its points too. What the
    ablation finds with it is what it would find if the upstream models learnt everything planted.
    """
    from derm.core.paths import PlatformPaths
    from derm.events.synthetic import SyntheticConfig
    from derm.experiments.planted import PlantedLogMismatch, PlantedUpstream, plant_upstream
    from derm.training.upstream.config import DermConfig, RefreshConfig, UpstreamConfig

    overrides: dict[str, object] = {"seed": seed, "start_date": start_date.date()}
    if days:
        overrides["n_days"] = days
    if events_per_day:
        overrides["events_per_day"] = events_per_day
    planted = PlantedUpstream(
        SyntheticConfig.preset(preset, **overrides),
        UpstreamConfig(
            model=DermConfig(dim=dim), refresh=RefreshConfig(aggregation=aggregation, ema_weight=ema_weight)
        ),
    )
    paths = PlatformPaths.from_env()
    try:
        manifests = plant_upstream(paths, planted)
    except (PlantedLogMismatch, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    for objective, written in manifests.items():
        days_written = len({m.snapshot_date for m in written})
        version = written[0].model_version
        click.echo(f"{objective} {version} (planted): {days_written} day(s) under {paths.snapshots_dir}")


def _echo_skipped(comparisons: list) -> None:
    """One line per ranker the log gave nothing to learn, as ``derm train-downstream`` prints it."""
    for comparison in comparisons:
        if comparison.skipped:
            click.echo(f"{comparison.objective} ranker skipped: {comparison.skipped}")


def _echo_written(report: Path) -> None:
    """``wrote <report.md> and <the plots and JSON beside it>`` (plots are absent when every ranker was skipped)."""
    beside = [
        report.with_suffix(".json"),
        report.with_suffix(".png"),
        report.with_name(f"{report.stem}_calibration.png"),
    ]
    written = [str(path) for path in beside if path.exists()]
    click.echo(f"wrote {report}" + (f" and {', '.join(written)}" if written else ""))


@contextlib.contextmanager
def _refusals_end_cleanly() -> Iterator[None]:
    """A gate refusal ends the command with its failures and Data Docs link (exit 1), not a traceback."""
    from derm.materialization.publish import PublishError
    from derm.validation.gate import ValidationFailed

    try:
        yield
    except (ValidationFailed, PublishError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.command("leakage-experiment")
@click.option("--objective", type=click.Choice(["ctr", "cvr"]), default="ctr", show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--eval-days", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--bootstrap", type=click.IntRange(min=10), default=1000, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch intra-op threads.")
@thresholds_option
def leakage_experiment_command(
    objective: str, epochs: int, eval_days: int, bootstrap: int, threads: int | None, thresholds: Path | None
) -> None:
    """Train on a point-in-time and on a deliberately leaky training set; report the AUC inflation and audit both."""
    import torch
    from rich.console import Console

    from derm.cli.runtime import online_store
    from derm.core.feast_repo import FeatureRepo
    from derm.core.paths import PlatformPaths
    from derm.experiments.leakage import leakage_experiment
    from derm.experiments.reports import comparison_markdown, skipped_comparison, write_report
    from derm.training.downstream.train import DownstreamConfig, RankerSkipped

    if threads:
        torch.set_num_threads(threads)
    console = Console(stderr=True)
    paths = PlatformPaths.from_env()
    title = f"{objective.upper()} ranker: point-in-time vs leaky training set"
    with online_store(paths), _refusals_end_cleanly():
        try:
            experiment = leakage_experiment(
                paths,
                FeatureRepo(),
                DownstreamConfig(epochs=epochs, eval_days=eval_days, bootstrap=bootstrap, gate_thresholds=thresholds),
                objective,
                log=partial(console.print, markup=False, highlight=False),
            )
        except RankerSkipped as exc:  # nothing to learn: reported, not a crash (exit 0)
            skipped = skipped_comparison(objective, title, str(exc))
            report = write_report(paths, "leakage_experiment", "Leakage experiment", [skipped])
            click.echo(comparison_markdown(skipped))
            _echo_skipped([skipped])
            _echo_written(report)
            return
    audits = (
        "## Leakage audit\n\n"
        f"```\n{experiment.point_in_time_audit.describe(limit=5)}\n```\n\n"
        f"```\n{experiment.leaky_audit.describe(limit=5)}\n```\n"
    )
    report = write_report(paths, "leakage_experiment", "Leakage experiment", [experiment.comparison], extra=audits)
    click.echo(comparison_markdown(experiment.comparison))
    click.echo(audits)
    _echo_written(report)
    if experiment.point_in_time_audit.ok is False or experiment.leaky_audit.ok:
        raise click.ClickException("the audit did not separate the point-in-time set from the leaky one")
