"""Runtime wiring of the commands: which Redis the Feast online store uses, started here when local.

The local profile starts a private ``redis-server`` under ``<data_dir>/redis``
(``derm.infra.redis_server``); the production profile reads
``DERM_REDIS_CONNECTION_STRING``. Library code never does this: it is handed a
Feast store or a connection string.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from derm.core.feast_repo import export_feast_environment
from derm.core.paths import REDIS_CONNECTION_ENV, PlatformPaths, active_profile
from derm.infra.redis_server import LocalRedisServer


def resolve_redis(paths: PlatformPaths) -> str | None:
    """The Redis the Feast online store should use, or None when the local one must be started."""
    if os.environ.get(REDIS_CONNECTION_ENV):
        return os.environ[REDIS_CONNECTION_ENV]
    if active_profile() == "production":
        raise RuntimeError(f"profile production: set {REDIS_CONNECTION_ENV} to your Redis connection string")
    return LocalRedisServer.running(paths.redis_dir)


@contextlib.contextmanager
def online_store(paths: PlatformPaths) -> Iterator[str]:
    """Export the Feast environment for the configured Redis, starting the local one if needed."""

    connection = resolve_redis(paths)
    if connection is not None:
        export_feast_environment(paths, connection)
        yield connection
        return
    with LocalRedisServer(paths.redis_dir) as server:
        print(f"started local redis-server at {server.connection_string} (data in {paths.redis_dir})", file=sys.stderr)
        export_feast_environment(paths, server.connection_string)
        yield server.connection_string
