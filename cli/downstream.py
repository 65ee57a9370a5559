"""Click commands of the downstream stage: ``train-downstream`` and ``audit-leakage``.

Heavy imports (torch, Feast, DuckDB) happen inside the commands, so ``derm --help`` answers at once.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import click

from derm.cli.publishing import thresholds_option


def _parse_versions(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    versions = {}
    for value in values:
        family, sep, version = value.partition("=")
        if not sep or not family or not version:
            raise click.BadParameter(f"{value!r}: expected FAMILY=VERSION, e.g. ctr_user=v1")
        versions[family] = version
    return versions


def downstream_config(
    epochs: int,
    eval_days: int,
    batch_size: int,
    bootstrap: int,
    seed: int,
    gate: bool = True,
    thresholds: Path | None = None,
    **ranker: object,
):
    """The DownstreamConfig of the training options; ``thresholds`` is the training-set gate's YAML.

    ``ranker`` holds the options of :func:`ranker_options` (validation days, grids, sequence encoder, experts).
    """
    from derm.training.downstream.train import DownstreamConfig

    grids = {name: tuple(values) for name in ("weight_decay", "embedding_dropout") if (values := ranker.pop(name, ()))}
    return DownstreamConfig(
        epochs=epochs,
        eval_days=eval_days,
        batch_size=batch_size,
        bootstrap=bootstrap,
        seed=seed,
        gate=gate,
        gate_thresholds=thresholds,
        **grids,
        **ranker,
    )


def ranker_options(function):
    """Options of the ranker and of its no-harm training (issue 17), passed on as ``**ranker``."""
    for option in reversed(
        [
            click.option(
                "--validation-days",
                type=click.IntRange(min=1),
                default=1,
                show_default=True,
                help="Labelled days before the eval days used for early stopping, the grid and calibration.",
            ),
            click.option(
                "--weight-decay",
                type=click.FloatRange(min=0),
                multiple=True,
                help="AdamW weight decay; repeat for a grid chosen on validation (default: 1e-4 and 1e-2).",
            ),
            click.option(
                "--embedding-dropout",
                type=click.FloatRange(min=0, max=1),
                multiple=True,
                help="Share of embeddings replaced by the cold-start vector in training; repeat for a grid "
                "chosen on validation (default: 0, 0.3 and 1; 1 = the families off).",
            ),
            click.option(
                "--sequence-encoder/--no-sequence-encoder",
                default=False,
                show_default=True,
                help="A transformer over the user's recent engaged Pins (built point in time from the log).",
            ),
            click.option(
                "--experts",
                type=click.IntRange(min=0),
                default=0,
                show_default=True,
                help="> 0: a mixture of this many experts (MMoE gates) as the deep tower.",
            ),
            click.option(
                "--embedding-dot-products/--no-embedding-dot-products",
                default=True,
                show_default=True,
                help="Give the ranker each upstream model's user x Pin dot product as an input.",
            ),
        ]
    ):
        function = option(function)
    return function


def training_options(function):
    for option in reversed(
        [
            click.option(
                "--epochs",
                type=click.IntRange(min=1),
                default=4,
                show_default=True,
                help="At most this many epochs (early stopping on validation log loss).",
            ),
            click.option(
                "--eval-days",
                type=click.IntRange(min=1),
                default=2,
                show_default=True,
                help="The last N days of the log evaluate; earlier days train.",
            ),
            click.option("--batch-size", type=click.IntRange(min=2), default=1024, show_default=True),
            click.option(
                "--bootstrap",
                type=click.IntRange(min=10),
                default=1000,
                show_default=True,
                help="Bootstrap resamples of the 95% CIs.",
            ),
            click.option("--seed", type=int, default=0, show_default=True),
            click.option("--threads", type=click.IntRange(min=1), default=None, help="torch intra-op threads."),
        ]
    ):
        function = option(function)
    return function


@click.command("train-downstream")
@click.option(
    "--objective",
    "--task",
    type=click.Choice(["ctr", "cvr", "both"]),
    default="both",
    show_default=True,
    help="Ranker(s) to train, by objective (--task is the 0.1 spelling).",
)
@click.option("--run", "run_name", default=None, help="Run name (default: a UTC timestamp).")
@click.option("--no-gate", is_flag=True, help="Skip the training-set gate (not recommended).")
@thresholds_option
@training_options
@ranker_options
def train_downstream(
    objective: str,
    run_name: str | None,
    no_gate: bool,
    thresholds: Path | None,
    epochs: int,
    eval_days: int,
    batch_size: int,
    bootstrap: int,
    seed: int,
    threads: int | None,
    **ranker: object,
) -> dict[str, dict[str, str]]:
    """Train the CTR/CVR ranker on the promoted feature service (point-in-time, through Feast); print metrics.

    The training set is gated first (--thresholds, --no-gate); a refusal lists the failed expectations
    and the Data Docs link and exits 1. A ranker the log gives nothing to learn (a single label class,
    too few labelled days) is skipped with its reason; returns each objective's outcome (for run-all).
    """
    import torch
    from rich.console import Console

    from derm.cli.runtime import online_store
    from derm.core.feast_repo import FeatureRepo
    from derm.core.paths import PlatformPaths
    from derm.training.downstream.train import RankerSkipped, default_run_name, run_downstream
    from derm.validation.gate import ValidationFailed

    if threads:
        torch.set_num_threads(threads)
    console = Console(stderr=True)
    paths = PlatformPaths.from_env()
    cfg = downstream_config(
        epochs, eval_days, batch_size, bootstrap, seed, gate=not no_gate, thresholds=thresholds, **ranker
    )
    run_name = run_name or default_run_name()
    outcomes: dict[str, dict[str, str]] = {}
    with online_store(paths):
        for name in ("ctr", "cvr") if objective == "both" else (objective,):
            try:
                result = run_downstream(
                    paths,
                    name,
                    cfg,
                    store=FeatureRepo().store(),
                    run=run_name,
                    log=partial(console.print, markup=False, highlight=False),
                )
            except RankerSkipped as exc:
                click.echo(f"{name} ranker skipped: {exc}")
                outcomes[name] = {"status": "skipped", "reason": str(exc)}
                continue
            except ValidationFailed as exc:
                raise click.ClickException(str(exc)) from exc
            click.echo(result.describe())
            click.echo(f"  ranker saved to {result.ranker_dir}")
            outcomes[name] = {"status": "trained", "ranker_dir": str(result.ranker_dir)}
    return outcomes


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
@click.option("--no-gate", is_flag=True, help="Only the point-in-time audit, not the training-set gate.")
@thresholds_option
def audit_leakage(
    training_set: Path, versions: dict[str, str], show: int, no_gate: bool, thresholds: Path | None
) -> None:
    """Prove a training set point-in-time correct against a DuckDB ASOF oracle, then run the training-set gate.

    Exit 1 on any point-in-time violation or gate refusal (the failed expectations and the Data Docs
    page are printed); the gate runs on training sets written by ``derm train-downstream`` (they carry
    their window and objective), with the event log's label rate when the log is in the data dir.
    """
    from derm.core.paths import PlatformPaths
    from derm.core.training_set import read_training_set
    from derm.training.downstream.leakage import audit_training_set
    from derm.training.downstream.training_sets import gate_training_set

    paths = PlatformPaths.from_env()
    try:
        report = audit_training_set(training_set, paths, versions=versions, max_reported=show)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(report.describe(limit=show))
    table, info = read_training_set(training_set)
    gate_ok = True
    if no_gate:
        pass
    elif info is None:
        click.echo(f"gate: skipped, {training_set} has no training-set metadata (window, objective)")
    else:
        events_dir = paths.events_dir if paths.events_dir.exists() else None
        gate = gate_training_set(table, info, paths.validation_dir, thresholds, events_dir=events_dir)
        gate_ok = gate.success
        click.echo(f"gate: {'PASS' if gate.success else 'REFUSED'} {gate.summary}")
        for failure in gate.failures:
            click.echo(f"  x {failure}")
        if gate.data_docs_page is not None:
            click.echo(f"  Data Docs: {gate.data_docs_page}")
    sys.exit(0 if report.ok and gate_ok else 1)
