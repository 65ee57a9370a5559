"""Runtime wiring of the commands: which Redis the Feast online store uses, started here when local.

The local profile uses the one private ``redis-server`` of ``<data_dir>/redis``
(``derm.infra.redis_server.DataDirRedis``: reused when running, else started,
and stopped by the last command using it, on SIGTERM and SIGHUP too); the
production profile reads
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
from derm.infra.redis_cluster import LocalRedisCluster
from derm.infra.redis_server import DataDirRedis


def resolve_redis(paths: PlatformPaths) -> str | None:
    """The Redis the Feast online store should use, or None when the local one must be started."""
    if os.environ.get(REDIS_CONNECTION_ENV):
        return os.environ[REDIS_CONNECTION_ENV]
    if active_profile() == "production":
        raise RuntimeError(f"profile production: set {REDIS_CONNECTION_ENV} to your Redis connection string")
    if active_profile() == "cluster":
        return None  # the private Redis Cluster lives for one command (see online_store)
    return DataDirRedis(paths.redis_dir).running()


@contextlib.contextmanager
def online_store(paths: PlatformPaths) -> Iterator[str]:
    """Export the Feast environment for the configured Redis, using the data directory's local one if needed."""

    if os.environ.get(REDIS_CONNECTION_ENV) or active_profile() == "production":
        connection = resolve_redis(paths)
        assert connection is not None
        export_feast_environment(paths, connection)
        yield connection
        return
    if active_profile() == "cluster":
        # Scale-out profile without a cluster of yours: a private 3-master Redis Cluster for this command.
        with LocalRedisCluster(paths.redis_cluster_dir) as cluster:
            print(f"started local Redis Cluster at {cluster.connection_string}", file=sys.stderr)
            export_feast_environment(paths, cluster.connection_string)
            try:
                yield cluster.connection_string
            finally:
                os.environ.pop(REDIS_CONNECTION_ENV, None)
        return
    server = DataDirRedis(paths.redis_dir)
    with server.session() as connection:
        where = connection.split(",", 1)[0]
        verb = "started" if server.started else "reusing"
        print(f"{verb} local redis-server at {where} (data in {paths.redis_dir})", file=sys.stderr)
        export_feast_environment(paths, connection)
        try:
            yield connection
        finally:
            # The server may stop with this session: a later command of this process must not reuse its address.
            os.environ.pop(REDIS_CONNECTION_ENV, None)
