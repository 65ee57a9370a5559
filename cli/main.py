"""``derm``: one command per pipeline stage, and ``derm run-all`` for the whole job.

Stages, in data-flow order::

    generate -> stats -> train-upstream -> validate/publish -> apply -> materialize
             -> train-downstream -> lookup

Heavy libraries (Feast, torch, Great Expectations) are imported inside the
commands so ``derm --help`` answers at once.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
from rich.console import Console

from derm.cli.downstream import audit_leakage, train_downstream
from derm.cli.experiments import ablation, leakage_experiment_command, plant_upstream_command
from derm.cli.publishing import (
    accept_command,
    compat_command,
    discard_command,
    freshness_command,
    promote_command,
    publish,
    repair_command,
    retire_command,
    rollback_command,
)
from derm.cli.runtime import online_store, resolve_redis
from derm.cli.serving import serve
from derm.cli.upstream import train_upstream, upstream_quality_command
from derm.cli.validation import docs, validate
from derm.core.paths import REDIS_CONNECTION_ENV, PlatformPaths

console = Console(stderr=True)


def _paths() -> PlatformPaths:
    return PlatformPaths.from_env()


@click.group()
def cli() -> None:
    """Embedding feature platform: DERM embeddings published, validated and served through Feast."""


@cli.command()
@click.option("--preset", type=click.Choice(["tiny", "local", "real", "bench"]), default="local", show_default=True)
@click.option("--days", type=int, help="Number of days (default: the preset's).")
@click.option("--events-per-day", type=int, help="Impressions per day (default: the preset's).")
@click.option(
    "--start-date",
    type=click.DateTime(["%Y-%m-%d"]),
    help="First day (default: so that the log ends yesterday, UTC).",
)
@click.option("--seed", type=int, default=7, show_default=True)
def generate(preset: str, days: int | None, events_per_day: int | None, start_date: datetime | None, seed: int) -> None:
    """Write the synthetic multi-surface event log (day-partitioned Parquet)."""
    import pyarrow.parquet as pq

    from derm.events.synthetic import SyntheticConfig, generate_event_log

    overrides: dict[str, object] = {"seed": seed}
    if days:
        overrides["n_days"] = days
    if events_per_day:
        overrides["events_per_day"] = events_per_day
    cfg = SyntheticConfig.preset(preset, **overrides)
    first_day = start_date.date() if start_date else datetime.now(UTC).date() - timedelta(days=cfg.n_days)
    cfg = SyntheticConfig.preset(preset, **overrides, start_date=first_day)
    paths = _paths()
    files = generate_event_log(cfg, paths.events_dir, progress=True)
    events = sum(pq.ParquetFile(path).metadata.num_rows for path in files)
    console.print(f"wrote {events:,} events in {len(files)} days to {paths.events_dir}")


class EventLogRefused(click.ClickException):
    """A log that breaks the event-log contract: one line naming the file, column and rule; exit code 2."""

    exit_code = 2


@contextlib.contextmanager
def _event_log_boundary() -> Iterator[None]:
    from derm.events.schema import EventLogError

    try:
        yield
    except EventLogError as error:
        raise EventLogRefused(f"event log refused: {error}") from error


@cli.command()
@click.argument("source", type=click.Path(path_type=Path, file_okay=False, exists=True))
def ingest(source: Path) -> None:
    """Check the event log in SOURCE against the contract and import it as the platform's log.

    Whatever the contract accepts (any timestamp unit and zone, dictionary strings, several
    files a day, missing days) is written once in the canonical types under
    $DERM_DATA_DIR/events; a log that breaks it is refused (exit code 2) with nothing written.
    """
    from derm.events.schema import import_event_log

    paths = _paths()
    with _event_log_boundary():
        files = import_event_log(source, paths.events_dir)
    console.print(f"imported {len(files)} days from {source} into {paths.events_dir}")


@cli.command()
def stats() -> None:
    """Derive daily user/Pin counting features and Pin attributes from the event log into the offline store."""
    from derm.materialization.counting_features import build_counting_features

    paths = _paths()
    with _event_log_boundary():
        counts = build_counting_features(paths.events_dir, paths.stats_dir)
    console.print(f"counting features: {counts} rows under {paths.stats_dir}")


@cli.command()
def apply() -> None:
    """``feast apply`` on feature_repo/ (in process)."""
    from derm.core.feast_repo import apply_repo

    with online_store(_paths()):
        apply_repo()


@cli.command()
@click.option("--end", type=click.DateTime(), help="Materialize up to this time (default: now, UTC).")
def materialize(end: datetime | None) -> None:
    """``feast materialize-incremental`` into Redis."""
    from derm.core.feast_repo import materialize_incremental

    end = (end or datetime.now(UTC)).replace(tzinfo=UTC)
    with online_store(_paths()):
        materialize_incremental(end)


@cli.command()
@click.option("--user-id", type=int, default=0, show_default=True)
@click.option("--pin-id", type=int, multiple=True, default=(0, 1, 2), show_default=True)
def lookup(user_id: int, pin_id: tuple[int, ...]) -> None:
    """Read a user's and some Pins' features back from Redis with ``get_online_features``."""
    with online_store(_paths()):
        sample_lookup(user_id, list(pin_id))


def sample_lookup(user_id: int, pin_ids: list[int]) -> dict[str, list]:
    from derm.core.feast_repo import feature_store

    store = feature_store()
    features = [f"{fv.name}:{f.name}" for fv in store.list_feature_views() for f in fv.features]
    rows = [{"user_id": user_id, "pin_id": pin} for pin in pin_ids]
    result = store.get_online_features(features=features, entity_rows=rows).to_dict()
    for name, values in result.items():
        shown = [_short(v) for v in values]
        console.print(f"  {name}: {shown}")
    return result


def _short(value: object) -> object:
    if isinstance(value, list) and len(value) > 4:
        return f"[{', '.join(f'{x:.3f}' for x in value[:3])}, ... ({len(value)} values)]"
    return value


@cli.command()
@click.option("--show-secrets", is_flag=True, help="Print the Redis password in clear (needed for eval).")
def env(show_secrets: bool) -> None:
    """Print the exports Feast needs to use this project's repo by hand: eval "$(derm env --show-secrets)"."""
    from derm.core.feast_repo import feast_environment

    paths = _paths()
    connection = resolve_redis(paths)
    if connection is None:
        raise click.ClickException("no Redis: run `derm redis up` first, or set " + REDIS_CONNECTION_ENV)
    masked = False
    for name, value in feast_environment(paths, connection).items():
        if not show_secrets:
            value, hidden = mask_secrets(value)
            masked = masked or hidden
        click.echo(f"export {name}={shlex.quote(value)}")  # a password or path may hold quotes
    if masked:
        click.echo("# password masked: `derm env --show-secrets` prints it (for eval)", err=True)


def mask_secrets(value: str) -> tuple[str, bool]:
    """``value`` with every ``password=...`` of a Redis connection string replaced by ``****``; whether any was."""
    masked, count = _SECRET.subn(r"\1****", value)
    return masked, count > 0


_SECRET = re.compile(r"((?:^|,)\s*password\s*=)[^,]*", re.IGNORECASE)


@cli.group()
def redis() -> None:
    """The one private redis-server of the data directory (local profile)."""


@redis.command("up")
@click.option(
    "--foreground",
    is_flag=True,
    help="Hold the server until interrupted (Ctrl-C, SIGTERM, SIGHUP), then stop it unless another command uses it.",
)
def redis_up(foreground: bool) -> None:
    """Start the local Redis (or find it running) and keep it up until `derm redis down`; its data persists."""
    from derm.infra.redis_server import DataDirRedis

    server = DataDirRedis(_paths().redis_dir)
    if foreground:
        with server.session() as connection:
            verb = "started" if server.started else "reusing"
            console.print(f"{verb} redis-server at {mask_secrets(connection)[0]}; Ctrl-C stops it")
            while True:
                time.sleep(3600)
    connection, started = server.up()
    verb = "redis-server running" if started else "already running"
    console.print(f"{verb} at {mask_secrets(connection)[0]}; stop it with `derm redis down`")


@redis.command("down")
def redis_down() -> None:
    """Stop the local Redis started by ``derm redis up`` (its data is kept); a command using it keeps it until done."""
    from derm.infra.redis_server import DataDirRedis

    outcome = DataDirRedis(_paths().redis_dir).down()
    messages = {
        "stopped": "stopped",
        "not running": "no local redis-server was running",
        "in use": "still used by another derm command: it stops when the last one exits",
    }
    console.print(messages[outcome])


@cli.command("run-all")
@click.option("--preset", type=click.Choice(["tiny", "local"]), default="local", show_default=True)
@click.option(
    "--events",
    "events_source",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="Run on this existing event log (imported with `derm ingest`) instead of generating one.",
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch intra-op threads of the training.")
@click.pass_context
def run_all(ctx: click.Context, preset: str, events_source: Path | None, threads: int | None) -> None:
    """The whole job end to end on the current profile: on a synthetic log, or on yours with --events.

    Ends with the run summary (also written to $DERM_DATA_DIR/run-summary.json): each ranker trained, or
    skipped with its reason when the log gives it nothing to learn (a single label class, no labelled days).
    """
    import json

    from derm.core.feast_repo import apply_repo, materialize_incremental
    from derm.core.files import atomic_write_text

    paths = _paths()
    if events_source is None:
        console.rule("1/8 generate event log")
        ctx.invoke(generate, preset=preset)
    else:
        console.rule(f"1/8 import event log {events_source}")
        ctx.invoke(ingest, source=events_source)
    console.rule("2/8 counting features")
    ctx.invoke(stats)
    console.rule("3/8 upstream DERM-CTR and DERM-CVR, daily refresh")
    ctx.invoke(train_upstream, threads=threads)
    with online_store(paths):
        console.rule("4/8 validate and publish embedding snapshots")
        ctx.invoke(publish, publish_all=True)
        console.rule("5/8 feast apply")
        apply_repo()
        console.rule("6/8 feast materialize-incremental")
        materialize_incremental(datetime.now(UTC))
        console.rule("7/8 downstream CTR and CVR rankers on point-in-time training sets")
        rankers = ctx.invoke(train_downstream, objective="both", threads=threads)
        console.rule("8/8 sample online lookup")
        sample_lookup(user_id=0, pin_ids=[0, 1, 2])
    ctx.invoke(docs)
    summary = {
        "events": str(events_source) if events_source is not None else f"synthetic preset {preset}",
        "finished_at": datetime.now(UTC).isoformat(),
        "rankers": rankers,
    }
    atomic_write_text(paths.data_dir / "run-summary.json", json.dumps(summary, indent=2) + "\n")
    console.rule("run summary")
    for objective, outcome in rankers.items():
        detail = outcome["ranker_dir"] if outcome["status"] == "trained" else outcome["reason"]
        console.print(f"{objective} ranker: {outcome['status']} ({detail})", markup=False, highlight=False)
    console.print(f"done: data in {paths.data_dir} (summary: {paths.data_dir / 'run-summary.json'})")


for _command in (
    train_upstream,
    upstream_quality_command,
    validate,
    docs,
    publish,
    accept_command,
    discard_command,
    promote_command,
    rollback_command,
    retire_command,
    freshness_command,
    repair_command,
    compat_command,
    train_downstream,
    ablation,
    plant_upstream_command,
    audit_leakage,
    leakage_experiment_command,
    serve,
):
    cli.add_command(_command)
