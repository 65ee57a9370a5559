"""Set-up shared by the SIGKILL recovery tests (issue 12): the template a module's trials start from, and an
operation run in a forked child that is SIGKILLed at a chosen instant.

A kill test builds one template per module (snapshots, counting tables, a redis-server of its own), copies
it afresh for every trial, kills the operation under test at a random instant and checks what the re-run
leaves::

    from tests.kill_trials import run_killed, template_redis, template_start

    start = template_start(tmp_path_factory, "kill", first_id=5_000, entities=60)
    ...  # write the template's snapshots into start.paths, vectors drawn from start.rng
    with template_redis(start.root, start.paths) as server:
        yield Template(...)

    outcome = run_killed(functools.partial(publish, paths), delay=0.8)   # "killed" or "finished before the kill"
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from bench.online_read import feast_environment
from derm.core.paths import PlatformPaths
from derm.infra.redis_server import LocalRedisServer


class TemplateStart(NamedTuple):
    """Where a module's template begins.

    Attributes:
        root: the module's folder: ``template/`` (the template's data directory), ``redis/`` (its
            redis-server) and one folder a trial.
        paths: the template's data directory, ``root/template``.
        ids: the entity ids of every snapshot, ``first_id, first_id + 1, ...``, shape ``(entities,)``, int64.
        rng: a generator seeded with 0, for the snapshots' vectors.
    """

    root: Path
    paths: PlatformPaths
    ids: np.ndarray
    rng: np.random.Generator


def template_start(tmp_path_factory: pytest.TempPathFactory, name: str, first_id: int, entities: int) -> TemplateStart:
    """A fresh module folder named after ``name``, its template's paths, ids and seeded generator."""
    root = tmp_path_factory.mktemp(name)
    ids = np.arange(first_id, first_id + entities, dtype=np.int64)
    return TemplateStart(root, PlatformPaths(root / "template"), ids, np.random.default_rng(0))


@contextlib.contextmanager
def template_redis(root: Path, paths: PlatformPaths) -> Iterator[LocalRedisServer]:
    """The template's own redis-server (``root/redis``, not persisted), with Feast's environment pointing at it
    and at ``paths``; the environment is restored and the server stopped when the block ends."""
    with LocalRedisServer(root / "redis", persist=False) as server:
        with feast_environment(paths, server.connection_string):
            yield server


def run_killed(run: Callable[[], object], delay: float) -> str:
    """Run ``run`` in a forked child and SIGKILL it after ``delay`` seconds; how the child ended.

    The child inherits the parent's imports (Feast included), so a trial costs the operation, not an
    interpreter; it leaves with ``os._exit`` and never runs the parent's cleanup.

    Returns:
        ``"killed"``, or ``"finished before the kill"`` when the operation was done before ``delay``.
    """
    pid = os.fork()
    if pid == 0:  # the child: run the operation, then leave without running the parent's cleanup
        try:
            run()
        finally:
            os._exit(0)
    time.sleep(delay)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _, status = os.waitpid(pid, 0)
    return "killed" if os.WIFSIGNALED(status) else "finished before the kill"
