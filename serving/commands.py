"""``derm serve``: the retrieval and ranking HTTP service (FastAPI on uvicorn).

Heavy imports (Feast, torch, faiss) happen inside the command so ``derm --help`` stays fast.

Example::

    derm serve                                   # 127.0.0.1:8000, latest saved CTR and CVR rankers
    derm serve --port 9000 --model data/models/downstream/ctr/20260105T120000
    curl -s localhost:8000/rank -d '{"user_id": 7, "k": 100}' -H 'content-type: application/json'

Users who prefer Feast's own feature server can serve the same features with
``feast serve`` from ``feature_repo/`` (after ``eval "$(derm env)"``, see README).
"""

from __future__ import annotations

from pathlib import Path

import click

RANKER_SPEC_FILE = "ranker.json"  # written next to model.pt by training.ranker.Ranker.save
TASKS = ("ctr", "cvr")


def latest_ranker_dirs(models_dir: Path) -> dict[str, Path]:
    """task -> newest saved ranker folder under ``<models_dir>/downstream/<task>/<run>/``."""
    found: dict[str, Path] = {}
    for task in TASKS:
        runs = [p.parent for p in (Path(models_dir) / "downstream" / task).glob(f"*/{RANKER_SPEC_FILE}")]
        if runs:
            found[task] = max(runs, key=lambda run: ((run / RANKER_SPEC_FILE).stat().st_mtime_ns, run.name))
    return found


def load_rankers(models_dir: Path, model_paths: tuple[Path, ...] = ()) -> dict[str, object]:
    """Rankers keyed by task: the given folders, or else the newest saved one of each task."""
    from training.ranker import load_ranker

    directories = list(model_paths) or list(latest_ranker_dirs(models_dir).values())
    if not directories:
        raise click.ClickException(
            f"no saved ranker under {Path(models_dir) / 'downstream'}: train one (derm train-downstream) "
            "or pass --model PATH"
        )
    rankers: dict[str, object] = {}
    for directory in directories:
        ranker = load_ranker(directory)
        task = ranker.spec.task
        if task in rankers:
            raise click.ClickException(f"two {task} rankers given ({directory}); pass one per task")
        rankers[task] = ranker
    return rankers


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--model",
    "model_paths",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A saved ranker folder (repeat for CTR and CVR). Default: the newest saved ranker of each task.",
)
@click.option("--max-candidates", default=1000, show_default=True, type=click.IntRange(1), help="Pins per /rank.")
@click.option("--redis-timeout", default=1.0, show_default=True, type=float, help="Seconds before Redis is 503.")
@click.option(
    "--torch-threads",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Intra-op threads per request; requests already run in parallel.",
)
def serve(
    host: str, port: int, model_paths: tuple[Path, ...], max_candidates: int, redis_timeout: float, torch_threads: int
) -> None:
    """Serve POST /rank, POST /retrieve and GET /health over the online store (Redis, Feast format)."""
    import torch
    import uvicorn

    from pipeline.config import PlatformPaths
    from pipeline.feast_repo import online_store
    from serving.app import ServingSettings, build_service, create_app
    from serving.embedding_reader import RedisTimeouts

    torch.set_num_threads(torch_threads)
    paths = PlatformPaths.from_env()
    rankers = load_rankers(paths.models_dir, model_paths)
    settings = ServingSettings(
        max_candidates=max_candidates,
        redis_timeouts=RedisTimeouts(connect=min(0.5, redis_timeout), read=redis_timeout),
    )
    with online_store(paths):
        service = build_service(paths, rankers, settings)  # type: ignore[arg-type]
        for task, ranker in rankers.items():
            versions = ", ".join(f"{f}={v}" for f, v in ranker.embedding_versions.items())  # type: ignore[attr-defined]
            click.echo(f"{task} ranker: {versions}", err=True)
        if service.index_manager is not None:
            service.index_manager.refresh(wait=True)  # build the Pin index before taking traffic
            click.echo(f"retrieval: {service.index_manager.describe()['index']}", err=True)
        uvicorn.run(create_app(service), host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
