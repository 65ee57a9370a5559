"""Click commands of the upstream stage; heavy imports (torch, DuckDB) happen inside the commands.

``train-upstream`` refreshes every day of the event log in order, for DERM-CTR
and/or DERM-CVR, skipping the days already snapshotted under the same version.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta

import click


def _parse_date(_ctx: click.Context, _param: click.Parameter, value: str | None) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not a date (YYYY-MM-DD)") from exc


@click.command("train-upstream")
@click.option(
    "--objective",
    "--model",
    "objective_choice",
    type=click.Choice(["ctr", "cvr", "both"]),
    default="both",
    show_default=True,
    help="Upstream model(s) to refresh, by objective (--model is the 0.1 spelling).",
)
@click.option("--days", type=click.IntRange(min=1), default=None, help="Refresh only the first N days of the log.")
@click.option("--through-date", callback=_parse_date, default=None, help="Last day to refresh (YYYY-MM-DD).")
@click.option("--dim", type=click.IntRange(min=1), default=64, show_default=True, help="Embedding dimension.")
@click.option("--aggregation", type=click.Choice(["ema", "overwrite"]), default="ema", show_default=True)
@click.option("--ema-weight", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.8, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True, help="Passes over each day.")
@click.option(
    "--first-day-epochs",
    type=click.IntRange(min=1),
    default=None,
    help="Passes over the first day (a cold start; default: --epochs).",
)
@click.option("--weight-decay", type=click.FloatRange(min=0.0), default=0.0, show_default=True)
@click.option(
    "--impression-weight",
    type=click.FloatRange(min=0.0),
    default=0.0,
    show_default=True,
    help="Weight of a logistic loss of the user x Pin dot product on every impression: non-clicked "
    "impressions become the user's negatives (0 = off, the paper's loss).",
)
@click.option("--batch-size", type=click.IntRange(min=2), default=512, show_default=True)
@click.option("--lr", "learning_rate", type=float, default=2e-3, show_default=True)
@click.option("--contrastive-weight", type=float, default=0.5, show_default=True)
@click.option("--temperature", type=float, default=0.1, show_default=True)
@click.option("--active-window-days", type=click.IntRange(min=1), default=90, show_default=True)
@click.option("--publish-delay-minutes", type=click.IntRange(min=0), default=60, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch intra-op threads.")
def train_upstream(
    objective_choice: str,
    days: int | None,
    through_date: date | None,
    dim: int,
    aggregation: str,
    ema_weight: float,
    epochs: int,
    first_day_epochs: int | None,
    weight_decay: float,
    impression_weight: float,
    batch_size: int,
    learning_rate: float,
    contrastive_weight: float,
    temperature: float,
    active_window_days: int,
    publish_delay_minutes: int,
    seed: int,
    threads: int | None,
) -> None:
    """Train DERM upstream models day by day and write versioned embedding snapshots."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from derm.core.naming import OBJECTIVES
    from derm.core.paths import PlatformPaths
    from derm.training.upstream.config import RefreshConfig, TrainConfig, UpstreamConfig
    from derm.training.upstream.features import FeatureConfig
    from derm.training.upstream.model import DermConfig
    from derm.training.upstream.refresh import RefreshGapError, refresh, refresh_days

    if threads:
        torch.set_num_threads(threads)
    paths = PlatformPaths.from_env()
    cfg = UpstreamConfig(
        model=DermConfig(dim=dim),
        features=FeatureConfig(),
        train=TrainConfig(
            epochs=epochs,
            first_day_epochs=first_day_epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            temperature=temperature,
            contrastive_weight=contrastive_weight,
            impression_weight=impression_weight,
            seed=seed,
        ),
        refresh=RefreshConfig(
            aggregation=aggregation,
            ema_weight=ema_weight,
            active_window_days=active_window_days,
            publish_delay=timedelta(minutes=publish_delay_minutes),
        ),
    )
    objectives = tuple(OBJECTIVES) if objective_choice == "both" else (objective_choice,)
    console = Console()
    try:
        plan = refresh_days(paths, through_date, days)
    except ValueError as exc:  # EventLogError: no event log yet
        raise click.ClickException(str(exc)) from exc
    started = datetime.now()
    written: dict[str, int] = {}
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        progress_task = progress.add_task("refreshing", total=len(plan) * len(objectives))

        def on_day(objective: str, day: date, manifests: list) -> None:
            version = manifests[0].model_version
            written[f"{objective} {version}"] = written.get(f"{objective} {version}", 0) + 1
            rows = ", ".join(f"{m.family}={m.row_count}" for m in manifests)
            progress.update(progress_task, advance=1, description=f"{objective} {version} {day} ({rows})")

        try:
            refresh(paths, objectives, cfg, through_date=through_date, max_days=days, on_day=on_day)
        except RefreshGapError as exc:
            raise click.ClickException(str(exc)) from exc
    elapsed = (datetime.now() - started).total_seconds()
    for name, count in sorted(written.items()):
        console.print(f"{name}: {count} day(s) up to date under {paths.snapshots_dir}")
    console.print(f"done in {elapsed:.1f}s")


@click.command("upstream-quality")
@click.option(
    "--objective",
    "objective_choice",
    default="both",
    show_default=True,
    help="ctr, cvr or both (an unknown one is refused with exit code 1, like a range without data).",
)
@click.option("--from-date", callback=_parse_date, default=None, help="First snapshot day (YYYY-MM-DD; inclusive).")
@click.option("--through-date", callback=_parse_date, default=None, help="Last snapshot day (YYYY-MM-DD; inclusive).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows and notes as JSON.")
def upstream_quality_command(
    objective_choice: str, from_date: date | None, through_date: date | None, as_json: bool
) -> None:
    """Compare upstream versions on the next-day quality check recorded in their manifests.

    One row per (objective, version): the settings that set it apart from the default config, the
    snapshot days scored, mean ROC-AUC of day t's dot products on day t+1 against Pin popularity's,
    the mean margin with a 95% t-interval over days, mean recall@k against popularity's, and the days
    flagged no better than popularity. `*` marks each objective's largest mean margin among the
    versions scored on the same days. Choose the schedule on days before the rankers' validation and
    evaluation days (a note says when the range reaches them).
    """
    import json

    from derm.core.naming import OBJECTIVES
    from derm.core.paths import PlatformPaths
    from derm.experiments.upstream_selection import UpstreamQualityError, compare_upstream_versions

    objectives = tuple(OBJECTIVES) if objective_choice == "both" else (objective_choice,)
    try:
        comparison = compare_upstream_versions(PlatformPaths.from_env(), objectives, from_date, through_date)
    except UpstreamQualityError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        payload = {
            "snapshots_dir": str(comparison.snapshots_dir),
            "from_date": from_date.isoformat() if from_date else None,
            "through_date": through_date.isoformat() if through_date else None,
            "rows": [row.to_json() for row in comparison.rows],
            "notes": comparison.notes,
        }
        click.echo(json.dumps(payload, indent=2))
        return
    click.echo(
        f"next-day upstream quality, snapshot days {from_date or 'first'} .. {through_date or 'last'} "
        f"(manifests under {comparison.snapshots_dir})"
    )
    click.echo(_quality_table(comparison.rows))
    for note in comparison.notes:
        click.echo(f"note: {note}")


def _quality_table(rows: list) -> str:
    """Plain fixed-width text: pastes into a README or an issue as it is."""

    def number(value: float | None, signed: bool = False) -> str:
        if value is None:
            return "-"
        value = 0.0 if abs(value) < 5e-5 else value  # no "-0.0000"
        return f"{value:+.4f}" if signed else f"{value:.4f}"

    ks = {row.k for row in rows}
    k = f"{ks.pop()}" if len(ks) == 1 and None not in ks else "k"
    header = ["objective", "version", "best", "days", "roc_auc", "popularity", "margin [95% CI]"]
    header += [f"recall@{k}", "popularity", "flagged", "settings"]
    lines = [header]
    for row in rows:
        ci = f" [{number(row.margin_ci[0], True)}, {number(row.margin_ci[1], True)}]" if row.margin_ci else ""
        settings = " ".join(f"{name}={value}" for name, value in row.settings.items())
        lines.append(
            [
                row.objective,
                row.version,
                "*" if row.best else ("" if row.comparable else "n/a"),
                str(len(row.days)),
                number(row.roc_auc),
                number(row.roc_auc_popularity),
                number(row.margin, True) + ci,
                number(row.recall_at_k),
                number(row.recall_at_k_popularity),
                str(row.flagged_days),
                settings,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines)
