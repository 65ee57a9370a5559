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


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--model",
    "model_paths",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A saved ranker folder (repeat for CTR and CVR). Default: the newest saved ranker of each objective.",
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

    from derm.cli.runtime import online_store
    from derm.core.feast_repo import FeatureRepo
    from derm.core.paths import PlatformPaths
    from derm.serving.embedding_reader import RedisTimeouts
    from derm.serving.http_api import create_app
    from derm.serving.service import ServingSettings, build_service
    from derm.training.downstream.ranker import load_rankers

    torch.set_num_threads(torch_threads)
    paths = PlatformPaths.from_env()
    try:
        rankers = load_rankers(paths.models_dir, model_paths)
    except ValueError as error:
        raise click.ClickException(f"{error} (derm train-downstream, or --model PATH)") from error
    settings = ServingSettings(
        max_candidates=max_candidates,
        redis_timeouts=RedisTimeouts(connect=min(0.5, redis_timeout), read=redis_timeout),
    )
    with online_store(paths):
        try:
            service = build_service(paths, FeatureRepo().store(), rankers, settings)  # type: ignore[arg-type]
        except ValueError as error:  # e.g. the pin_attributes view is not registered yet
            raise click.ClickException(str(error)) from error
        for objective, ranker in rankers.items():
            versions = ", ".join(f"{f}={v}" for f, v in ranker.embedding_versions.items())  # type: ignore[attr-defined]
            click.echo(f"{objective} ranker: {versions}", err=True)
        if service.index_manager is not None:
            service.index_manager.refresh(wait=True)  # build the Pin index before taking traffic
            click.echo(f"retrieval: {service.index_manager.describe()['index']}", err=True)
        uvicorn.run(create_app(service), host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
