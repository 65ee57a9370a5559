"""Click commands of the downstream stage: ``train-downstream`` and ``ablation``.

Heavy imports (torch, Feast, DuckDB) happen inside the commands, so ``derm --help`` answers at once.
"""

from __future__ import annotations

from functools import partial

import click


def _downstream_config(epochs: int, eval_days: int, batch_size: int, bootstrap: int, seed: int, gate: bool = True):
    from training.downstream import DownstreamConfig

    return DownstreamConfig(
        epochs=epochs, eval_days=eval_days, batch_size=batch_size, bootstrap=bootstrap, seed=seed, gate=gate
    )


def _common_options(function):
    for option in reversed(
        [
            click.option("--epochs", type=click.IntRange(min=1), default=2, show_default=True),
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
@click.option("--task", type=click.Choice(["ctr", "cvr", "both"]), default="both", show_default=True)
@click.option("--run", "run_name", default=None, help="Run name (default: a UTC timestamp).")
@click.option("--no-gate", is_flag=True, help="Skip the training-set gate (not recommended).")
@_common_options
def train_downstream(
    task: str,
    run_name: str | None,
    no_gate: bool,
    epochs: int,
    eval_days: int,
    batch_size: int,
    bootstrap: int,
    seed: int,
    threads: int | None,
) -> None:
    """Train the CTR/CVR ranker on the promoted feature service (point-in-time, through Feast); print metrics."""
    import torch
    from rich.console import Console

    from pipeline.config import PlatformPaths
    from pipeline.feast_repo import online_store
    from training.downstream import default_run_name, run_downstream
    from validation.gate import ValidationFailed

    if threads:
        torch.set_num_threads(threads)
    console = Console(stderr=True)
    paths = PlatformPaths.from_env()
    cfg = _downstream_config(epochs, eval_days, batch_size, bootstrap, seed, gate=not no_gate)
    run_name = run_name or default_run_name()
    with online_store(paths):
        for name in ("ctr", "cvr") if task == "both" else (task,):
            try:
                result = run_downstream(
                    paths, name, cfg, run=run_name, log=partial(console.print, markup=False, highlight=False)
                )
            except ValidationFailed as exc:
                raise click.ClickException(str(exc)) from exc
            click.echo(result.describe())
            click.echo(f"  ranker saved to {result.ranker_dir}")


@click.command("ablation")
@click.option(
    "--task",
    type=click.Choice(["ctr", "cvr", "both"]),
    default="both",
    show_default=True,
    help="Rankers of the embedding-family ablation.",
)
@click.option("--skip-aggregation", is_flag=True, help="Skip the moving-average vs overwrite ablation.")
@_common_options
def ablation(
    task: str,
    skip_aggregation: bool,
    epochs: int,
    eval_days: int,
    batch_size: int,
    bootstrap: int,
    seed: int,
    threads: int | None,
) -> None:
    """The paper's ablations: embedding families (none/user/user+pin/all four) and moving average vs overwrite."""
    import torch
    from rich.console import Console

    from pipeline.config import PlatformPaths
    from pipeline.feast_repo import online_store
    from training.ablation import (
        AblationConfig,
        aggregation_ablation,
        comparison_markdown,
        embedding_ablation,
        write_report,
    )

    if threads:
        torch.set_num_threads(threads)
    console = Console(stderr=True)
    paths = PlatformPaths.from_env()
    cfg = AblationConfig(
        tasks=("ctr", "cvr") if task == "both" else (task,),
        train=_downstream_config(epochs, eval_days, batch_size, bootstrap, seed),
    )
    with online_store(paths):
        console.rule("embedding families")
        comparisons = embedding_ablation(paths, cfg, log=partial(console.print, markup=False, highlight=False))
        report = write_report(paths, "ablation_embeddings", "Downstream ablation: DERM embedding families", comparisons)
        for comparison in comparisons:
            click.echo(comparison_markdown(comparison))
        click.echo(f"wrote {report} and {report.with_suffix('.png')}")
        if not skip_aggregation:
            console.rule("moving average vs overwrite")
            comparison = aggregation_ablation(paths, cfg, log=partial(console.print, markup=False, highlight=False))
            report = write_report(
                paths, "ablation_aggregation", "Downstream ablation: embedding aggregation", [comparison]
            )
            click.echo(comparison_markdown(comparison))
            click.echo(f"wrote {report} and {report.with_suffix('.png')}")
