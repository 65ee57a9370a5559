"""What Redis really holds, compared with what the catalog says is online; and the repair.

The catalog (``catalog.json``) says which day of each (family, version) was materialized; Redis can
disagree: restarted empty, restored from an old dump, a server swapped under the platform. So a
publish, after the last chunk of a (view, day) is written, counts the day's rows that Redis holds
(each entity's ``_ts:<view>`` field at or after the day's timestamp), refuses the day when any is
missing, and records an online *watermark in Redis itself*: a hash ``derm:online_watermark:<project>``
with one field per view, ``<day>|<rows>``. A Redis that comes back empty has lost its watermarks
too, so nothing written before can vouch for it.

:func:`online_status` compares each published view with Redis, entity by entity for a sample of
the newest day (``ok``, ``stale``: older or partial, ``missing``: nothing of this view, ``empty``:
Redis holds no key at all; ``stale`` too when a day is offline but was never marked online, a publish
that died between its offline and online steps). :func:`repair` re-materializes from the offline store, through Feast,
every view that is not ``ok`` (its whole published window, so each entity gets its newest day, as
Feast keeps the newer of two writes), and the counting and attribute views when Redis lost data;
it reports what Redis holds afterwards. It is idempotent: a second run finds everything ``ok``.

Example::

    states = online_status(paths, repo)
    if any(state.status != "ok" for state in states):
        repair(paths, repo)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pyarrow.parquet as pq
import redis

from derm.core.feast_repo import FeatureRepo
from derm.core.naming import COUNTING_VIEWS, PIN_ATTRIBUTES_VIEW, feature_view_name, join_key
from derm.core.paths import PlatformPaths
from derm.core.snapshot import SnapshotManifest
from derm.feast_plugins.compat import parse_redis_connection_string
from derm.feast_plugins.redis_format import int64_key_layout, int64_redis_keys, timestamp_parts, ts_field
from derm.materialization.catalog import OFFLINE_DATA_FILE, Catalog

WATERMARK_KEY = "derm:online_watermark:{project}"
STATUSES = ("ok", "stale", "missing", "empty")
_CHUNK = 5_000


@dataclass(frozen=True)
class OnlineState:
    """One published (family, version) as Redis holds it."""

    family: str
    version: str
    view: str
    catalog_day: date | None  # the newest day the catalog calls online
    offline_day: date | None  # the newest day published offline (newer than catalog_day: a publish died between)
    watermark_day: date | None  # the newest day Redis' own watermark records
    sampled: int  # entities of the newest day checked
    present: int  # of those, holding that day (or newer)
    status: str  # ok | stale | missing | empty

    def describe(self) -> str:
        watermark = self.watermark_day.isoformat() if self.watermark_day else "none"
        catalog = self.catalog_day.isoformat() if self.catalog_day else "none"
        behind = (
            f", offline up to {self.offline_day.isoformat()}"
            if self.offline_day and (self.catalog_day is None or self.offline_day > self.catalog_day)
            else ""
        )
        return (
            f"{self.view}: {self.status} (catalog online {catalog}{behind}, Redis watermark {watermark}, "
            f"{self.present}/{self.sampled} sampled entities hold it)"
        )


def redis_client(connection_string: str, cluster: bool = False) -> redis.Redis:
    """A client for Feast's connection string (``host:port[,password=..][,db=N][,ssl=true]``).

    ``cluster``: the string names Redis Cluster nodes (``redis_type: redis_cluster``); the client
    follows the slots (pipelines are split per node, MOVED replies followed).
    """
    nodes, options = parse_redis_connection_string(connection_string)
    if cluster:
        from redis.cluster import ClusterNode, RedisCluster

        options.pop("db", None)  # a cluster has one database
        return RedisCluster(startup_nodes=[ClusterNode(n["host"], int(n["port"])) for n in nodes], **options)
    return redis.Redis(host=nodes[0]["host"], port=int(nodes[0]["port"]), **options)


# redis-py strips the first word of the error replies it has a class for; put it back, so a message says
# what Redis answered (``OOM``, ``READONLY``...) as redis-cli would.
_REPLY_WORDS = {
    redis.exceptions.OutOfMemoryError: "OOM",
    redis.exceptions.ReadOnlyError: "READONLY",
    redis.exceptions.NoPermissionError: "NOPERM",
    redis.exceptions.BusyLoadingError: "LOADING",
    redis.exceptions.AuthenticationError: "NOAUTH",
}
# What to do about each refusal, for the error messages of publish and repair.
REPLY_HINTS = {
    "OOM": "Redis is out of memory (maxmemory reached under noeviction): raise maxmemory or free memory",
    "READONLY": "this Redis is a read-only replica: point the connection string at the primary",
    "NOPERM": "the Redis user may not run the write commands on these keys: grant them (ACL SETUSER)",
    "LOADING": "Redis is still loading its data after a restart: wait until it is done",
    "MISCONF": "Redis cannot persist (stop-writes-on-bgsave-error): fix its disk",
}


def redis_reply(error: redis.RedisError) -> str:
    """``OOM``, ``READONLY``, ``NOPERM``, ``LOADING``...: the error reply's first word, or the error's type
    (``ConnectionError``, ``TimeoutError``) when Redis did not answer."""
    for kind, word in _REPLY_WORDS.items():
        if isinstance(error, kind):
            return word
    first = str(error).split(" ", 1)[0]
    if isinstance(error, redis.ResponseError) and first.isupper():
        return first
    return type(error).__name__


def redis_connection(repo: FeatureRepo) -> tuple[redis.Redis, str, int]:
    """A client of the repository's online store, its Feast project and entity-key serialization version."""
    config = repo.store().config
    cluster = str(getattr(config.online_store, "redis_type", "redis")).endswith("redis_cluster")
    return (
        redis_client(config.online_store.connection_string, cluster=cluster),
        config.project,
        config.entity_key_serialization_version,
    )


def _keys(project: str, key_column: str, version: int, ids: np.ndarray) -> list[bytes]:
    layout = int64_key_layout(key_column, project, version)
    if layout is None:
        raise RuntimeError(f"Redis keys of {key_column} are not laid out as single int64 keys (project {project})")
    return int64_redis_keys(layout, ids).to_list()


def _chunks(values: Sequence[bytes]) -> Iterator[Sequence[bytes]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


def count_holding(
    client: redis.Redis, project: str, serialization_version: int, manifest: SnapshotManifest, ids: np.ndarray
) -> int:
    """How many of ``ids`` hold the manifest's view at the manifest's timestamp or newer, in Redis."""
    view = feature_view_name(manifest.family, manifest.model_version)
    field = ts_field(view)
    moment = manifest.event_timestamp
    wanted = (int(moment.timestamp()), moment.microsecond * 1000)
    held = 0
    for chunk in _chunks(_keys(project, join_key(manifest.family), serialization_version, ids)):
        with client.pipeline(transaction=False) as pipe:
            for key in chunk:
                pipe.hget(key, field)
            held += sum(value is not None and timestamp_parts(value) >= wanted for value in pipe.execute())
    return held


def day_ids(catalog: Catalog, manifest: SnapshotManifest) -> np.ndarray:
    """Entity ids of a published day, from its offline partition."""
    partition = catalog.partition_dir(manifest.family, manifest.model_version, manifest.snapshot_date)
    column = pq.read_table(partition / OFFLINE_DATA_FILE, columns=[join_key(manifest.family)]).column(0)
    return column.to_numpy()


def record_watermark(client: redis.Redis, project: str, manifest: SnapshotManifest, rows: int) -> None:
    """Record in Redis that the view's ``manifest`` day is completely written (never moves backwards)."""
    key = WATERMARK_KEY.format(project=project)
    view = feature_view_name(manifest.family, manifest.model_version)
    current = read_watermarks(client, project).get(view)
    if current is None or current[0] <= manifest.snapshot_date:
        client.hset(key, view, f"{manifest.snapshot_date.isoformat()}|{rows}")


def read_watermarks(client: redis.Redis, project: str) -> dict[str, tuple[date, int]]:
    raw = client.hgetall(WATERMARK_KEY.format(project=project))
    watermarks = {}
    for view, value in raw.items():
        day, _, rows = value.decode().partition("|")
        watermarks[view.decode()] = (date.fromisoformat(day), int(rows or 0))
    return watermarks


def promoted_online_state(catalog: Catalog, client: redis.Redis, project: str) -> dict[str, str]:
    """family -> ok / stale / missing / empty for each promoted version: Redis' watermark against the catalog.

    Two small reads (the watermark hash, DBSIZE), cheap enough for a serving process to repeat every
    few seconds; :func:`online_status` also samples entities.
    """
    state = catalog.read_state()
    watermarks = read_watermarks(client, project)
    empty = client.dbsize() == 0
    statuses = {}
    for family, version in state.promoted.items():
        online_day = state.online.get(family, {}).get(version)
        watermark = watermarks.get(feature_view_name(family, version))
        if empty:
            statuses[family] = "empty"
        elif watermark is None:
            statuses[family] = "missing"
        elif online_day is not None and watermark[0].isoformat() < online_day:
            statuses[family] = "stale"
        else:
            statuses[family] = "ok"
    return statuses


def online_status(paths: PlatformPaths, repo: FeatureRepo, *, sample: int = 200, seed: int = 0) -> list[OnlineState]:
    """Each published, not retired (family, version) against Redis (see the module docstring)."""
    client, project, serialization_version = redis_connection(repo)
    catalog = Catalog(paths.embeddings_offline_dir)
    state = catalog.read_state()
    watermarks = read_watermarks(client, project)
    empty = client.dbsize() == 0
    rng = np.random.default_rng(seed)
    result = []
    for published in catalog.versions():
        online_day = state.online.get(published.family, {}).get(published.version)
        catalog_day = date.fromisoformat(online_day) if online_day else None
        offline_day = max(published.days) if published.days else None
        watermark = watermarks.get(published.feature_view)
        sampled = present = 0
        if catalog_day is not None:
            manifest = catalog.published(published.family, published.version, catalog_day)
            ids = day_ids(catalog, manifest)
            ids = rng.choice(ids, size=min(sample, len(ids)), replace=False) if len(ids) else ids
            sampled = len(ids)
            present = count_holding(client, project, serialization_version, manifest, ids) if not empty else 0
        if empty:
            status = "empty"
        elif present == 0 and watermark is None:
            status = "missing"
        elif (
            watermark is None
            or catalog_day is None
            or watermark[0] < catalog_day
            or present < sampled
            or (offline_day is not None and offline_day > catalog_day)
        ):
            status = "stale"
        else:
            status = "ok"
        result.append(
            OnlineState(
                family=published.family,
                version=published.version,
                view=published.feature_view,
                catalog_day=catalog_day,
                offline_day=offline_day,
                watermark_day=watermark[0] if watermark else None,
                sampled=sampled,
                present=present,
                status=status,
            )
        )
    return result


@dataclass(frozen=True)
class Repaired:
    view: str
    days: int  # published days re-materialized
    rows_held: int  # entities of the newest day Redis holds afterwards
    rows_expected: int


def repair(paths: PlatformPaths, repo: FeatureRepo, *, now: datetime | None = None) -> list[Repaired]:
    """Re-materialize from the offline store whatever Redis lacks; what Redis holds afterwards, per view."""
    catalog = Catalog(paths.embeddings_offline_dir)
    broken = [state for state in online_status(paths, repo) if state.status != "ok" and state.offline_day]
    if not broken:
        return []
    client, project, serialization_version = redis_connection(repo)
    store = repo.store()
    # Redis lost data: the counting features and Pin attributes are gone too. They go back first: serving
    # answers again as soon as the promoted views' watermarks are back, and its answers must not be
    # computed without them meanwhile. Feast's incremental materialization would skip the intervals it
    # already did, so materialize their whole history.
    events = sorted(paths.events_dir.glob("date=*"))
    registered = {view.name for view in store.list_feature_views()}
    context_views = [view for view in [*COUNTING_VIEWS, PIN_ATTRIBUTES_VIEW] if view in registered]
    if events and context_views:
        start = datetime.fromisoformat(events[0].name.removeprefix("date=")).replace(tzinfo=UTC)
        store.materialize(start_date=start, end_date=now or datetime.now(UTC), feature_views=context_views)
    repaired = []
    with catalog.locked():
        for state in broken:
            # Every day published offline, including one whose publish died before it was marked online.
            manifests = catalog.manifests(state.family, state.version)
            first, newest = manifests[0], manifests[-1]
            # The whole window: Feast writes each entity's newest row, which is what the day-by-day publishes left.
            store.materialize(
                start_date=first.event_timestamp - timedelta(seconds=1),
                end_date=newest.event_timestamp + timedelta(seconds=1),
                feature_views=[state.view],
            )
            ids = day_ids(catalog, newest)
            held = count_holding(client, project, serialization_version, newest, ids)
            if held == len(ids):
                record_watermark(client, project, newest, held)
                current = catalog.read_state()
                online = current.online.setdefault(state.family, {})
                if online.get(state.version, "") < newest.snapshot_date.isoformat():
                    online[state.version] = newest.snapshot_date.isoformat()
                    catalog.write_state(current)
            repaired.append(Repaired(state.view, len(manifests), held, len(ids)))
    return repaired
