"""``derm serve``: the retrieval and ranking HTTP service (FastAPI on uvicorn).

Heavy imports (Feast, torch, faiss) happen inside the command so ``derm --help`` stays fast.

``--workers N`` runs N uvicorn worker processes on one socket. The command builds the
ANN index of the promoted Pin version once and saves it under
``<data>/serving/ann-index/``; every worker loads (memory-maps) that file instead of
building its own, and each has its own Redis connection pool and its own rankers. A
later promote is built once by the first worker that sees it (under a file lock) and
loaded by the others. The workers' Prometheus samples are aggregated in a temporary
folder (``PROMETHEUS_MULTIPROC_DIR``) so ``/metrics`` covers all of them.

Example::

    derm serve                                   # 127.0.0.1:8000, latest saved CTR and CVR rankers
    derm serve --workers 2                       # one process per core
    derm serve --port 9000 --model data/models/downstream/ctr/20260105T120000
    curl -s localhost:8000/rank -d '{"user_id": 7, "k": 100}' -H 'content-type: application/json'
    curl -s localhost:8000/metrics

Users who prefer Feast's own feature server can serve the same features with
``feast serve`` from ``feature_repo/`` (after ``eval "$(derm env)"``, see README).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

OPTIONS_ENV = "DERM_SERVE_OPTIONS"  # the options, for the worker processes (which start from an import string)


def index_cache_dir(paths: Any) -> Path:
    """Where the ANN indexes shared by the worker processes are saved."""
    return Path(paths.data_dir) / "serving" / "ann-index"


def _ranker_ids(paths: Any, model_paths: list[str]) -> dict[str, str]:
    """objective -> ``<objective>/<run folder>`` of the rankers served (their saved folders' names)."""
    from derm.training.downstream.ranker import latest_ranker_dirs

    folders = [Path(p) for p in model_paths] or list(latest_ranker_dirs(paths.models_dir).values())
    ids = {}
    for folder in folders:
        spec = json.loads((folder / "ranker.json").read_text())
        objective = spec.get("objective") or spec.get("task")
        ids[objective] = f"{objective}/{folder.name}"
    return ids


def build_app(options: dict[str, Any], *, wait_for_index: bool = True, announce: bool = False) -> Any:
    """The service and its HTTP app from the command's options (in the command, or in each worker)."""
    import torch

    from derm.core.feast_repo import FeatureRepo
    from derm.core.paths import PlatformPaths
    from derm.serving.embedding_reader import RedisTimeouts
    from derm.serving.http_api import create_app
    from derm.serving.service import ServingSettings, build_service
    from derm.training.downstream.ranker import load_rankers

    torch.set_num_threads(options["torch_threads"])
    paths = PlatformPaths.from_env()
    model_paths = [Path(p) for p in options["model_paths"]]
    try:
        rankers = load_rankers(paths.models_dir, model_paths)
    except ValueError as error:
        raise click.ClickException(f"{error} (derm train-downstream, or --model PATH)") from error
    timeout = options["redis_timeout"]
    settings = ServingSettings(
        max_candidates=options["max_candidates"],
        redis_timeouts=RedisTimeouts(connect=min(0.5, timeout), read=timeout),
    )
    try:
        service = build_service(
            paths,
            FeatureRepo().store(),
            rankers,  # type: ignore[arg-type]
            settings,
            ranker_ids=_ranker_ids(paths, options["model_paths"]),
            index_cache_dir=index_cache_dir(paths) if options["shared_index"] else None,
        )
    except ValueError as error:  # e.g. the pin_attributes view is not registered yet
        raise click.ClickException(str(error)) from error
    if announce:
        for objective, ranker in rankers.items():
            versions = ", ".join(f"{f}={v}" for f, v in ranker.embedding_versions.items())
            click.echo(f"{objective} ranker {service.ranker_ids[objective]}: {versions}", err=True)
    service.warm_up()  # trace the rankers and open a Redis connection before taking traffic
    if wait_for_index and service.index_manager is not None:
        service.index_manager.refresh(wait=True)  # build (or load) the Pin index before taking traffic
        if announce:
            click.echo(f"retrieval: {service.index_manager.describe()['index']}", err=True)
    # Move everything start-up allocated (Feast, torch, protobuf: ~300k objects) out of the cyclic GC's
    # reach: a full collection over them took ~0.5 s here, a pause any request caught in it would pay.
    gc.collect()
    gc.freeze()
    return create_app(service)


def worker_app() -> Any:
    """The app of one ``--workers`` process (uvicorn's factory; options from the parent's environment)."""
    return build_app(json.loads(os.environ[OPTIONS_ENV]))


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
@click.option("--access-log/--no-access-log", default=False, show_default=True, help="One log line per request.")
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Worker processes (one per core); they share one saved ANN index.",
)
def serve(
    host: str,
    port: int,
    model_paths: tuple[Path, ...],
    max_candidates: int,
    redis_timeout: float,
    torch_threads: int,
    access_log: bool,
    workers: int,
) -> None:
    """Serve POST /rank, POST /retrieve, GET /health and GET /metrics over the online store (Redis, Feast format)."""
    import uvicorn

    from derm.cli.runtime import online_store
    from derm.core.paths import PlatformPaths
    from derm.serving.metrics import MULTIPROCESS_ENV

    options = {
        "model_paths": [str(p.resolve()) for p in model_paths],
        "max_candidates": max_candidates,
        "redis_timeout": redis_timeout,
        "torch_threads": torch_threads,
        "shared_index": workers > 1,
    }
    paths = PlatformPaths.from_env()
    with online_store(paths):
        if workers == 1:
            app = build_app(options, announce=True)
            uvicorn.run(app, host=host, port=port, log_level="info", access_log=access_log, timeout_graceful_shutdown=5)
            return
        # Build and save the index once here (and check the options) before any worker starts.
        build_app(options, announce=True)
        metrics_dir = tempfile.mkdtemp(prefix="derm-serve-metrics-")
        os.environ[MULTIPROCESS_ENV] = metrics_dir  # inherited by the workers
        os.environ[OPTIONS_ENV] = json.dumps(options)
        click.echo(f"{workers} workers; shared index under {index_cache_dir(paths)}", err=True)
        try:
            uvicorn.run(
                "derm.cli.serving:worker_app",
                factory=True,
                host=host,
                port=port,
                workers=workers,
                # A worker is ready once it has imported torch/Feast and loaded rankers and index: far more
                # than uvicorn's default 5 s on a busy machine, which would kill and respawn it forever.
                timeout_worker_healthcheck=600,
                log_level="info",
                access_log=access_log,
                timeout_graceful_shutdown=5,
            )
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            sys.stderr.flush()
