"""The online store on a real Redis Cluster: 3 masters + 3 replicas of Debian's redis-server.

One cluster per test session (``redis_cluster``, started by the project's own
``derm.infra.redis_cluster``). The fast writer is compared byte for byte with stock
Feast on the same cluster: stock Feast writes project ``clstock``, the fast path
project ``clfast``, and every hash must be equal once the project suffix of its key
is set aside (keys of the two projects hash to different slots, so both writers
really spread over all masters). Then: slots moved under the writer (``MOVED``) or
migrating (``ASK``), Feast's and the serving reader's reads, and a master killed in
the middle of writes and reads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from derm.infra.redis_cluster import SLOTS, LocalRedisCluster

feast = pytest.importorskip("feast")

from derm.feast_plugins import compat, redis_format  # noqa: E402
from derm.feast_plugins.redis_online_store import FastRedisOnlineStore, _ClusterSocketWriter  # noqa: E402
from tests.stock_comparison import (  # noqa: E402
    FAST_STORE,
    VECTOR_ENGINE,
    WINDOW_END,
    WINDOW_START,
    cluster_hashes,
    feature_store_in,
    hash_tagged_rows,
    stock_and_fast_stores,
    user_embedding_view,
)

DIM = 8
TAGS = {"dim": str(DIM)}  # the serving reader's vector width


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    with LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


def _flush(cluster: LocalRedisCluster) -> None:
    for port in cluster.master_ports():
        with cluster.node_client(port) as client:
            client.flushall()


@pytest.fixture(scope="module")
def cluster_stores(tmp_path_factory: pytest.TempPathFactory, redis_cluster: LocalRedisCluster):
    """Stock Feast (local engine, ``redis`` store) and the fast path, both on the cluster."""
    tmp_path = tmp_path_factory.mktemp("cluster-stores")
    data = tmp_path / "embeddings.parquet"
    pq.write_table(hash_tagged_rows(seed=3, entities=300, dim=DIM), data)
    user, view = user_embedding_view(data, tags=TAGS)
    online = {"redis_type": "redis_cluster", "connection_string": redis_cluster.connection_string}
    stock, fast = stock_and_fast_stores(
        tmp_path,
        [user, view],
        ("clstock", "clfast"),
        stock_online=online,
        fast_online={**online, "write_batch_rows": 37},
        fast_engine={"type": VECTOR_ENGINE, "read_batch_rows": 53},
    )
    _flush(redis_cluster)
    return stock, fast, view


def test_cluster_has_three_masters_with_a_replica_each(redis_cluster: LocalRedisCluster) -> None:
    assert len(redis_cluster.master_ports()) == 3
    with redis_cluster.node_client(redis_cluster.ports[0]) as client:
        info = client.cluster("info")
        assert info["cluster_state"] == "ok" and int(info["cluster_slots_assigned"]) == SLOTS
        nodes = client.cluster("nodes")
    assert sum("slave" in node["flags"] for node in nodes.values()) == 3


@settings(max_examples=30, deadline=None)
@given(st.lists(st.binary(min_size=12, max_size=12), min_size=1, max_size=20), st.booleans())
def test_key_slots_are_the_clusters(redis_cluster: LocalRedisCluster, keys: list[bytes], ragged: bool) -> None:
    rows = redis_format.RaggedBytes.from_list([*keys, b"x{tag}y"] if ragged else keys)
    with redis_cluster.node_client(redis_cluster.ports[0]) as client:
        expected = [client.cluster("keyslot", key) for key in rows.to_list()]
    assert redis_format.key_slots(rows).tolist() == expected


def test_materialize_on_cluster_is_byte_identical_to_stock(cluster_stores, redis_cluster: LocalRedisCluster) -> None:
    stock, fast, _ = cluster_stores
    writer = fast._get_provider().online_store._writer(fast.config)
    assert isinstance(writer, _ClusterSocketWriter)
    writer.close()
    stock.materialize(start_date=WINDOW_START, end_date=WINDOW_END)
    fast.materialize(start_date=WINDOW_START, end_date=WINDOW_END)
    expected, got = cluster_hashes(redis_cluster, "clstock"), cluster_hashes(redis_cluster, "clfast")
    assert len(expected) == 300
    assert got == expected
    # Spread over every master, hash-tagged keys included.
    for port in redis_cluster.master_ports():
        with redis_cluster.node_client(port) as client:
            assert client.dbsize() > 50

    # An older, overlapping window: rows not newer than what is stored are skipped, on both.
    stock.materialize(start_date=WINDOW_START - timedelta(days=3), end_date=WINDOW_START + timedelta(hours=12))
    fast.materialize(start_date=WINDOW_START - timedelta(days=3), end_date=WINDOW_START + timedelta(hours=12))
    assert cluster_hashes(redis_cluster, "clfast") == cluster_hashes(redis_cluster, "clstock") == expected


def test_online_reads_on_cluster(cluster_stores) -> None:
    """get_online_features through Feast, and the serving reader's cluster path, read what was written."""
    from derm.serving.embedding_reader import EmbeddingReader

    stock, fast, _ = cluster_stores
    ids = [int(i) for i in pq.read_table(fast.get_data_source("emb").path).column("user_id").unique()[:40]]
    features = ["user_emb:embedding", "user_emb:clicks", "user_emb:label"]
    rows = [{"user_id": i} for i in [*ids, 10**9]]
    expected = stock.get_online_features(features=features, entity_rows=rows).to_dict()
    got = fast.get_online_features(features=features, entity_rows=rows).to_dict()
    assert got == expected and got["label"][-1] is None

    reader = EmbeddingReader.for_features(fast, ["user_emb:embedding"])
    result = reader.read({"user_id": np.array([*ids, 10**9])})
    found = result.found["user_emb:embedding"]
    vectors = result.columns["user_emb:embedding"]
    for i, vector in enumerate(got["embedding"]):
        assert bool(found[i]) == (vector is not None)
        if vector is not None:
            np.testing.assert_array_equal(vectors[i], np.asarray(vector, np.float32))


def _owner(cluster: LocalRedisCluster, slot: int) -> tuple[int, str]:
    with cluster.node_client(cluster.ports[0]) as client:
        for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                port = int(master[1])
                with cluster.node_client(port) as owner:
                    return port, owner.execute_command("CLUSTER", "MYID").decode()
    raise AssertionError(slot)


def _table(ids: np.ndarray, at: datetime) -> pa.Table:
    return pa.table(
        {
            "user_id": pa.array(ids, pa.int64()),
            "embedding": pa.array(
                list(np.tile(np.arange(DIM, dtype=np.float32), (len(ids), 1))), pa.list_(pa.float32())
            ),
            "clicks": pa.array(ids, pa.int64()),
            "label": pa.array([str(i) for i in ids]),
            "event_timestamp": pa.array([at] * len(ids), pa.timestamp("us", tz="UTC")),
            "created": pa.array([at] * len(ids), pa.timestamp("us", tz="UTC")),
        }
    )


def _begin_migration(cluster: LocalRedisCluster, slot: int) -> tuple[int, str]:
    """Mark ``slot`` as migrating from its master to another one; returns the source port and the target id."""
    source_port, source_id = _owner(cluster, slot)
    target_port = next(port for port in cluster.master_ports() if port != source_port)
    with cluster.node_client(target_port) as target, cluster.node_client(source_port) as source:
        target_id = target.execute_command("CLUSTER", "MYID").decode()
        target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    return source_port, target_id


def _finish_migration(cluster: LocalRedisCluster, slot: int, target_id: str) -> None:
    for port in cluster.master_ports():
        with cluster.node_client(port) as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


def _fast_store(tmp_path: Path, cluster: LocalRedisCluster, project: str, **settings: object):
    """A fast store of its own project on the cluster, and the view (its rows are written with write_arrow)."""
    data = tmp_path / "unused.parquet"
    pq.write_table(hash_tagged_rows(seed=1, entities=1, dim=DIM), data)
    user, view = user_embedding_view(data, tags=TAGS)
    online = {"type": FAST_STORE, "redis_type": "redis_cluster", "connection_string": cluster.connection_string}
    store = feature_store_in(tmp_path, project, {**online, **settings}, {"type": VECTOR_ENGINE})
    store.apply([user, view])
    return store, view


def test_writer_follows_moved_and_ask(tmp_path: Path, redis_cluster: LocalRedisCluster) -> None:
    """A slot moved to another master after the writer loaded its map (MOVED), then one half-migrated (ASK)."""
    fast, view = _fast_store(tmp_path, redis_cluster, "clmove")
    store: FastRedisOnlineStore = fast._get_provider().online_store
    config = fast.config
    ids = np.arange(5_000_000, 5_000_400, dtype=np.int64)
    keys = redis_format.int64_redis_keys(redis_format.int64_key_layout("user_id", "clmove", 3), ids)
    slots = redis_format.key_slots(keys)
    moved_slot = int(slots[0])
    # A slot only the second write touches: its keys are not on the source yet, so the source answers ASK.
    ask_slot = int(next(slot for slot in slots[200:] if slot not in set(slots[:200].tolist())))
    compat.redis_client(store, config.online_store)  # the store's cached client has loaded the slot map

    _, target_id = _begin_migration(redis_cluster, moved_slot)
    _finish_migration(redis_cluster, moved_slot, target_id)  # an empty slot moves at once: the map is stale
    assert store.write_arrow(config, view, _table(ids[:200], WINDOW_END)) == 200
    source_port, target_id = _begin_migration(redis_cluster, ask_slot)
    try:
        with redis_cluster.node_client(source_port) as source:
            before = source.execute_command("CLUSTER", "COUNTKEYSINSLOT", ask_slot)  # other tests' keys
            assert store.write_arrow(config, view, _table(ids, WINDOW_END)) == 200  # the first 200 are not newer
            # The new keys of the migrating slot went to the importing master, none to the source.
            assert source.execute_command("CLUSTER", "COUNTKEYSINSLOT", ask_slot) == before
    finally:
        _finish_migration(redis_cluster, ask_slot, target_id)
    client = redis.RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0])
    try:
        assert all(client.hget(key, redis_format.ts_field("user_emb")) for key in keys.to_list())
    finally:
        client.close()


def test_master_killed_during_writes_and_reads(tmp_path: Path, redis_cluster: LocalRedisCluster) -> None:
    """A master is SIGKILLed while the writer streams chunks and a reader polls: its replica takes over, reads
    resume, and every row the writer reported written is there afterwards (``replica_acks: 1``)."""
    store, view = _fast_store(
        tmp_path, redis_cluster, "clfail", write_batch_rows=500, replica_acks=1, cluster_retry_seconds=60
    )
    online: FastRedisOnlineStore = store._get_provider().online_store
    batches, batch_rows = 12, 2000
    written: list[int] = []  # batches the writer has returned from
    reads = {"ok_after_kill": 0, "failed": 0}
    killed = threading.Event()
    stop = threading.Event()

    failures: list[BaseException] = []

    def write() -> None:
        try:
            for batch in range(batches):
                ids = np.arange(batch * batch_rows, (batch + 1) * batch_rows, dtype=np.int64)
                online.write_arrow(store.config, view, _table(ids, WINDOW_START + timedelta(minutes=batch)))
                written.append(batch)
                time.sleep(0.05)
        except BaseException as error:
            failures.append(error)
            raise

    def read() -> None:
        while not stop.is_set():
            try:
                rows = [{"user_id": i} for i in range(0, batch_rows * max(1, len(written)), 997)]
                store.get_online_features(features=["user_emb:clicks"], entity_rows=rows).to_dict()
                if killed.is_set():
                    reads["ok_after_kill"] += 1
            except (redis.RedisError, OSError):
                reads["failed"] += 1
            time.sleep(0.02)

    writer = threading.Thread(target=write)
    reader = threading.Thread(target=read)
    writer.start()
    reader.start()
    while len(written) < 3 and writer.is_alive():
        time.sleep(0.01)
    victim = redis_cluster.master_ports()[0]
    redis_cluster.kill(victim)
    killed.set()
    writer.join(timeout=120)
    assert not writer.is_alive() and written == list(range(batches)), f"the writer gave up: {failures!r}"
    redis_cluster.wait_until_healthy()
    deadline = time.monotonic() + 30
    while reads["ok_after_kill"] < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    reader.join()
    try:
        assert victim not in redis_cluster.master_ports()
        assert reads["ok_after_kill"] >= 3, reads
        everything = [{"user_id": i} for i in range(batches * batch_rows)]
        got = store.get_online_features(features=["user_emb:clicks"], entity_rows=everything).to_dict()
        assert got["clicks"] == list(range(batches * batch_rows)), "rows acknowledged by the writer were lost"
    finally:
        redis_cluster.restart(victim)  # back as a replica, so later tests see 3 masters + 3 replicas
        redis_cluster.wait_until_healthy()


def test_cluster_profile_is_configuration_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_cluster: LocalRedisCluster
) -> None:
    """DERM_PROFILE=cluster loads feature_store.cluster.yaml: the Ray ASOF store and the fast store on a cluster."""
    from derm.core.feast_repo import feast_environment, feature_store
    from derm.core.paths import PROFILE_ENV, PlatformPaths, feature_store_yaml
    from derm.feast_plugins.ray_asof_offline_store import RayAsofOfflineStoreConfig

    monkeypatch.setenv(PROFILE_ENV, "cluster")
    monkeypatch.delenv("DERM_RAY_ADDRESS", raising=False)
    for name, value in feast_environment(PlatformPaths(tmp_path), redis_cluster.connection_string).items():
        monkeypatch.setenv(name, value)
    assert feature_store_yaml().name == "feature_store.cluster.yaml"
    config = feature_store().config
    assert isinstance(config.offline_store, RayAsofOfflineStoreConfig)
    assert config.offline_store.ray_address is None  # empty: a local Ray
    assert config.offline_store.storage_path == f"{tmp_path}/retrieval"
    assert str(config.online_store.redis_type.value) == "redis_cluster"
    assert config.online_store.connection_string == redis_cluster.connection_string
    assert config.online_store.replica_acks == 1
