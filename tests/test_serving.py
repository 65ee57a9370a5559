"""Online serving: the vectorized Redis reader against Feast, training/serving consistency, the Pins' context
from the feature store, the ranking service and its HTTP API, bad input and Redis faults, the Pin index
rebuilt on promote, and smoke runs of the benchmarks.

The module serves its own small platform (own data folder, own redis-server), built
with the benchmark's builder from the session's tiny event log plus a few events that
make the Pin-attribute tie-break matter: the four families published at v1 on the
log's last day through the real publish path, the counting features and the Pin
attributes materialized as of ``serving_time``.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import threading
import time
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.online_read import (
    BenchPlatform,
    build_platform,
    feast_environment,
    post_json,
    publish_embeddings,
    serve_in_thread,
    unit_vectors,
    untrained_rankers,
)
from derm.core.days import day_end
from derm.core.paths import PlatformPaths

USERS, PINS, DIM = 200, 80, 16  # the tiny event log's users and Pins
UNKNOWN = 10**9
# Pins 5 and 6 get two events each at the same newest instant; the higher event_id's attributes are due.
TIED = {5: (600, 60), 6: (900, 90)}


def _append_tied_events(events_dir: Path) -> None:
    """Two events per tied Pin at the last instant of the log's last day, with different attributes.

    The higher ``event_id`` has the smaller values and comes second for pin 5, the larger values and
    comes first for pin 6: "first row", "last row", max and min each pick wrong on one of them.
    """
    day = max(date.fromisoformat(p.name.removeprefix("date=")) for p in events_dir.glob("date=*"))
    folder = events_dir / f"date={day.isoformat()}"
    rows = [(9 * 10**15 + 1, 5, 700, 70), (9 * 10**15 + 2, 5, 600, 60)]
    rows += [(9 * 10**15 + 4, 6, 900, 90), (9 * 10**15 + 3, 6, 800, 80)]
    n = len(rows)
    table = pa.table(
        {
            "event_id": [r[0] for r in rows],
            "event_timestamp": [day_end(day) - timedelta(microseconds=1)] * n,
            "user_id": [0] * n,
            "pin_id": [r[1] for r in rows],
            "advertiser_id": [r[2] for r in rows],
            "category_id": [r[3] for r in rows],
            "surface": ["home_feed"] * n,
            "clicked": [False] * n,
            "converted": [False] * n,
        },
        schema=pq.read_schema(next(folder.glob("*.parquet"))),
    )
    pq.write_table(table, folder / "ties.parquet")


@pytest.fixture(scope="module")
def platform(tmp_path_factory, tiny_event_log):
    from derm.core.feast_repo import feature_store
    from derm.infra.redis_server import LocalRedisServer
    from derm.materialization.counting_features import build_counting_features

    source = tmp_path_factory.mktemp("serving_log")
    shutil.copytree(tiny_event_log, source / "events")
    _append_tied_events(source / "events")
    build_counting_features(source / "events", source / "stats")
    paths = PlatformPaths(tmp_path_factory.mktemp("serving"))
    with LocalRedisServer(paths.redis_dir, persist=False) as server:
        with feast_environment(paths, server.connection_string):
            platform = build_platform(
                paths.data_dir,
                server.connection_string,
                users=USERS,
                pins=PINS,
                dim=DIM,
                events_dir=source / "events",
                stats_dir=source / "stats",
            )
            feature_store().materialize(  # the builder materializes the counting views only
                start_date=platform.serving_time - timedelta(days=60),
                end_date=platform.serving_time,
                feature_views=["pin_attributes"],
            )
            yield platform


@pytest.fixture(scope="module")
def store(platform: BenchPlatform):
    from derm.core.feast_repo import feature_store

    return feature_store()


@pytest.fixture(scope="module")
def service(platform: BenchPlatform, store):
    from derm.materialization.catalog import Catalog
    from derm.serving.service import RankingService, ServingSettings

    return RankingService(
        store,
        untrained_rankers(store),
        catalog=Catalog(platform.paths.embeddings_offline_dir),
        settings=ServingSettings(max_candidates=100, max_k=50, max_body_bytes=20_000),
        clock=lambda: platform.serving_time,
    )


@pytest.fixture(scope="module")
def server(service):
    from derm.serving.http_api import create_app

    with serve_in_thread(create_app(service)) as port:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        yield connection
        connection.close()


def _ranker_refs(store) -> list[str]:
    service = store.get_feature_service("ctr_ranker")
    return [f"{p.name}:{f.name}" for p in service.feature_view_projections for f in p.features]


# ---------------------------------------------------------------------------------------------
# The reader returns exactly what get_online_features returns
# ---------------------------------------------------------------------------------------------


def _assert_same_as_feast(columns: dict, found: dict, feast: dict) -> None:
    for name, values in columns.items():
        expected = feast[name]
        assert len(expected) == len(values), name
        for row, stock in enumerate(expected):
            if stock is None:
                assert not found[name][row], f"{name} row {row}: Feast has None, the reader found a value"
                assert not np.any(values[row]), f"{name} row {row}: the default must be zeros"
            else:
                assert found[name][row], f"{name} row {row}: Feast has a value, the reader none"
                np.testing.assert_array_equal(values[row], np.asarray(stock, dtype=values.dtype), err_msg=name)


def test_reader_returns_what_get_online_features_returns(platform: BenchPlatform, store) -> None:
    from derm.serving.embedding_reader import EmbeddingReader

    refs = _ranker_refs(store)
    users = [3, UNKNOWN, 0, -5]
    pins = [1, UNKNOWN, 79, 7, 80]
    # entity rows pair users and Pins one to one, like Feast's entity_rows
    rows = [{"user_id": u, "pin_id": p} for u, p in zip([*users, 3], pins, strict=True)]
    feast = store.get_online_features(features=refs, entity_rows=rows).to_dict()

    reader = EmbeddingReader.for_features(store, refs)  # Feast-compatible: no TTL at read time
    features = reader.read({"user_id": np.array([*users, 3]), "pin_id": np.array(pins)})
    columns, found = features.by_feature_name(refs)
    _assert_same_as_feast(columns, found, feast)
    assert features.stats.fallback == 0, "every stored value must take the fixed-prefix path"
    assert columns["ctr_pin_emb"].shape == (5, DIM) and columns["ctr_pin_emb"].dtype == np.float32

    # Every vector here is months old at the wall clock, far beyond the views' TTL: Feast 0.67
    # still returns them (it does not apply a view's TTL when reading Redis), and so does the
    # Feast-compatible reader. With enforce_ttl the reader drops them, as offline retrieval would.
    assert feast["ctr_user_emb"][0] is not None
    strict = EmbeddingReader.for_features(store, refs, enforce_ttl=True)
    stale = strict.read({"user_id": np.array(users), "pin_id": np.array(pins)})
    assert not stale.found["ctr_user_emb_v1:ctr_user_emb"].any()
    assert stale.expired["ctr_user_emb_v1"].tolist() == [True, False, True, False]  # unknown ids are not "expired"
    assert not stale.columns["ctr_user_emb_v1:ctr_user_emb"].any()
    fresh = strict.read({"user_id": np.array(users), "pin_id": np.array(pins)}, now=platform.serving_time)
    assert fresh.found["ctr_user_emb_v1:ctr_user_emb"].tolist() == [True, False, True, False]


def test_vector_decoder_falls_back_to_protobuf_for_other_encodings() -> None:
    from feast.protos.feast.types.Value_pb2 import Value
    from feast.value_type import ValueType

    from derm.serving.embedding_reader import DecodeStats, decode_vectors

    good = Value(float_list_val={"val": [1.5, -2.0, 3.25]}).SerializeToString()
    short = Value(float_list_val={"val": [1.0, 2.0]}).SerializeToString()
    other_type = Value(double_list_val={"val": [1.0, 2.0, 3.0]}).SerializeToString()
    # the same floats with an unknown field appended: not the fixed prefix + payload shape, still valid protobuf
    with_unknown_field = good + b"\xa0\x06\x01"
    stats = DecodeStats()
    matrix, found = decode_vectors(
        [good, None, b"", short, other_type, with_unknown_field], ValueType.FLOAT_LIST, 3, stats
    )
    assert found.tolist() == [True, False, False, False, False, True]
    np.testing.assert_array_equal(matrix[[0, 5]], [[1.5, -2.0, 3.25]] * 2)
    assert not matrix[[1, 2, 3, 4]].any()
    assert stats.fallback == 3 and stats.unusable == 2

    # no missing rows: the one-join fast path, and its exit to the row-by-row path on any odd row
    matrix, found = decode_vectors([good, good], ValueType.FLOAT_LIST, 3)
    assert found.all() and matrix.dtype == np.float32 and matrix.flags.c_contiguous
    np.testing.assert_array_equal(matrix, [[1.5, -2.0, 3.25]] * 2)
    matrix, found = decode_vectors([good, with_unknown_field, short], ValueType.FLOAT_LIST, 3)
    assert found.tolist() == [True, True, False]
    np.testing.assert_array_equal(matrix[:2], [[1.5, -2.0, 3.25]] * 2)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), max_size=30))
def test_int64_decoder_matches_protobuf(values: list[int | None]) -> None:
    from feast.protos.feast.types.Value_pb2 import Value
    from feast.value_type import ValueType

    from derm.serving.embedding_reader import DecodeStats, decode_scalars

    stored = [None if v is None else Value(int64_val=v).SerializeToString() for v in values]
    stats = DecodeStats()
    column, found = decode_scalars(stored, ValueType.INT64, stats)
    assert found.tolist() == [v is not None for v in values]
    assert column.tolist() == [0 if v is None else v for v in values]
    assert stats.fallback == 0


# ---------------------------------------------------------------------------------------------
# Training/serving consistency: what the model gets online == get_historical_features at that time
# ---------------------------------------------------------------------------------------------


def _is_null(value: object) -> bool:
    import pandas as pd

    return not isinstance(value, list | np.ndarray) and bool(pd.isna(value))


def test_served_features_equal_historical_features_at_that_time(platform: BenchPlatform, store, service) -> None:
    import pandas as pd

    rng = np.random.default_rng(5)
    ranker = service.rankers["ctr"]
    t0 = platform.serving_time
    # fresh, one day later, embeddings past their 3-day TTL (counting features still within 7 days), all stale
    times = [t0, t0 + timedelta(days=1, hours=3), t0 + timedelta(days=4), t0 + timedelta(days=8)]
    checked = 0
    for when in times:
        user = int(rng.integers(USERS))
        pins = np.concatenate([rng.choice(PINS, size=6, replace=False), [UNKNOWN]]).astype(np.int64)
        frames, _ = service.model_inputs(user, pins, now=when)
        served = frames["ctr"]
        entity_df = pd.DataFrame({"user_id": user, "pin_id": pins, "event_timestamp": pd.Timestamp(when)})
        historical = (
            store.get_historical_features(entity_df=entity_df, features=ranker.feature_refs)
            .to_df()
            .set_index("pin_id")
            .loc[pins]
        )
        for ref in ranker.feature_refs:
            name = ref.split(":")[1]
            for row, pin in enumerate(pins):
                offline = historical[name].iloc[row]
                online = served[name][row]
                if _is_null(offline):
                    assert np.all(np.isnan(online)), f"{name} user {user} pin {pin} at {when}: offline null"
                else:
                    np.testing.assert_array_equal(
                        np.asarray(online, dtype=np.float64),
                        np.asarray(offline, dtype=np.float64),
                        err_msg=f"{name} user {user} pin {pin} at {when}",
                    )
                checked += 1
    assert checked == len(times) * 7 * len(ranker.feature_refs)
    # the stale times really exercised the missing path
    late, _ = service.model_inputs(0, np.array([1]), now=times[2])
    assert np.isnan(late["ctr"]["ctr_pin_emb"]).all() and not np.isnan(late["ctr"]["pin_clicks_7d"]).any()


# ---------------------------------------------------------------------------------------------
# The Pins' context (advertiser, category) comes from the feature store, as of their newest event
# ---------------------------------------------------------------------------------------------


def _latest_attributes_oracle(events_dir: Path) -> dict[int, tuple[int, int]]:
    """Each Pin's (advertiser, category) of its newest event, ties to the higher event_id: plain pandas."""
    import pandas as pd

    events = pd.concat(pd.read_parquet(p) for p in sorted(events_dir.glob("date=*/*.parquet")))
    newest = events.sort_values(["event_timestamp", "event_id"]).groupby("pin_id").tail(1)
    return {int(row.pin_id): (int(row.advertiser_id), int(row.category_id)) for row in newest.itertuples()}


def _context(frame: dict) -> list[tuple[int, int]]:
    return list(zip(frame["advertiser_id"].tolist(), frame["category_id"].tolist(), strict=True))


def test_pin_context_equals_the_oracle_including_ties(platform: BenchPlatform, service) -> None:
    oracle = _latest_attributes_oracle(platform.paths.events_dir)
    assert {pin: oracle[pin] for pin in TIED} == TIED, "the constructed ties are the Pins' newest events"
    known = sorted(oracle)
    frames, _ = service.model_inputs(0, np.array([*known, UNKNOWN], dtype=np.int64))
    for objective, frame in frames.items():
        assert _context(frame) == [*(oracle[pin] for pin in known), (-1, -1)], objective
        assert frame["advertiser_id"].dtype == np.int64


def test_pin_context_needs_no_event_log_and_lasts_the_views_ttl(platform: BenchPlatform, store, tmp_path: Path) -> None:
    from derm.serving.service import build_service

    # a data folder without any event log (or catalog): the context can only come from Redis
    lone = build_service(PlatformPaths(tmp_path), store, untrained_rankers(store, ("ctr",)))
    pins = np.array([*TIED, UNKNOWN], dtype=np.int64)
    t0 = platform.serving_time
    frames, _ = lone.model_inputs(0, pins, now=t0)
    assert _context(frames["ctr"]) == [*TIED.values(), (-1, -1)]
    # 90 days: a Pin that pauses keeps its catalogue entry for the upstream active window, then it is unknown
    frames, _ = lone.model_inputs(0, pins, now=t0 + timedelta(days=80))
    assert _context(frames["ctr"]) == [*TIED.values(), (-1, -1)]
    frames, _ = lone.model_inputs(0, pins, now=t0 + timedelta(days=92))
    assert _context(frames["ctr"]) == [(-1, -1)] * len(pins)


# ---------------------------------------------------------------------------------------------
# The ranking service (no HTTP): distinct candidates, best first, limits
# ---------------------------------------------------------------------------------------------


def test_service_ranks_distinct_candidates_best_first(service) -> None:
    distinct = np.array([5, 1, UNKNOWN, 9, 30], dtype=np.int64)
    ranked = service.rank(3, [5, 1, UNKNOWN, 9, 5, 30, 1], surface="search", sort_by="cvr")
    scored = service.score(3, distinct, surface="search", now=service.clock())
    order = np.argsort(-scored.scores["cvr"], kind="stable")
    assert ranked.sort_by == "cvr" and ranked.pin_ids.tolist() == distinct[order].tolist()
    assert np.all(np.diff(ranked.score) <= 0)
    np.testing.assert_allclose(ranked.scores["ctr"], scored.scores["ctr"][order], rtol=1e-6)
    assert ranked.pins_missing == 1 and ranked.pin_found.tolist() == (distinct[order] != UNKNOWN).tolist()
    assert ranked.retrieved is None and ranked.embedding_versions["cvr"]["cvr_pin"] == "v1"
    assert service.rank(3, distinct.tolist()).sort_by == "ctr", "ctr orders by default"

    retrieved = service.rank(4, k=7)
    assert retrieved.retrieved is not None and retrieved.retrieved.k == 7 and len(retrieved.pin_ids) == 7
    assert sorted(retrieved.pin_ids.tolist()) == sorted(retrieved.retrieved.pin_ids.tolist())
    assert np.all(np.diff(retrieved.score) <= 0)


@pytest.mark.parametrize(
    ("request_", "status", "message"),
    [
        ({"pin_ids": []}, 422, "pin_ids is empty"),
        ({}, 422, "give either pin_ids"),
        ({"pin_ids": [1], "k": 3}, 422, "not both"),
        ({"pin_ids": [1], "surface": "tv"}, 422, "unknown surface"),
        ({"pin_ids": [1], "sort_by": "ltv"}, 422, "loaded rankers are"),
        ({"pin_ids": [1] * 101}, 413, "101 candidate Pins is above the limit of 100"),
        ({"k": 51}, 413, "above the limit of 50"),
    ],
)
def test_service_refuses_with_a_status_and_a_message(service, request_: dict, status: int, message: str) -> None:
    from derm.serving.service import ServingError

    with pytest.raises(ServingError, match=message) as refused:
        service.rank(1, **request_)
    assert refused.value.status == status


# ---------------------------------------------------------------------------------------------
# The HTTP API
# ---------------------------------------------------------------------------------------------


def test_rank_scores_candidates_and_reports_versions(server, service) -> None:
    pins = [5, 1, UNKNOWN, 9, 5, 30]
    status, body = post_json(server, "/rank", {"user_id": 3, "pin_ids": pins, "surface": "search"})
    assert status == 200, body
    ranked = [item["pin_id"] for item in body["items"]]
    assert sorted(ranked) == sorted(set(pins)), "every distinct candidate is ranked once"
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    assert set(body["items"][0]["scores"]) == {"ctr", "cvr"}
    assert body["embedding_versions"]["ctr"] == {f: "v1" for f in ("ctr_pin", "ctr_user", "cvr_pin", "cvr_user")}
    assert body["user_missing"] == [] and body["pins_missing"] == 1
    assert [i["embedding_found"] for i in body["items"] if i["pin_id"] == UNKNOWN] == [False]

    # the scores are the rankers' own on the served features
    expected = service.score(3, np.array([5, 1, UNKNOWN, 9, 30]), surface="search")
    by_pin = {item["pin_id"]: item["scores"]["cvr"] for item in body["items"]}
    np.testing.assert_allclose([by_pin[p] for p in [5, 1, UNKNOWN, 9, 30]], expected.scores["cvr"], rtol=1e-6)

    status, body = post_json(server, "/rank", {"user_id": UNKNOWN, "pin_ids": [1, 2], "sort_by": "cvr"})
    assert status == 200 and body["sort_by"] == "cvr"
    assert "ctr_user_emb_v1:ctr_user_emb" in body["user_missing"] and len(body["items"]) == 2


def test_retrieve_and_rank_with_k(server, service, platform: BenchPlatform) -> None:
    from derm.serving.ann import read_partition

    status, body = post_json(server, "/retrieve", {"user_id": 4, "k": 10})
    assert status == 200, body
    assert body["retrieval"]["version"] == "v1" and body["retrieval"]["user_found"]
    assert 0.0 <= body["retrieval"]["recall_at_k"] <= 1.0 and body["index"]["pins"] == PINS
    ids, vectors = read_partition(service.index_manager.catalog, "ctr_pin", "v1", platform.embedding_day)
    users, user_vectors = read_partition(service.index_manager.catalog, "ctr_user", "v1", platform.embedding_day)
    exact = ids[np.argsort(-(vectors @ user_vectors[users == 4][0]))[:10]]
    assert len(set(exact.tolist()) & {item["pin_id"] for item in body["items"]}) >= 9

    status, body = post_json(server, "/rank", {"user_id": 4, "k": 10})
    assert status == 200 and len(body["items"]) == 10 and body["retrieval"]["k"] == 10

    status, body = post_json(server, "/retrieve", {"user_id": UNKNOWN, "k": 3})
    assert status == 200 and not body["retrieval"]["user_found"] and len(body["items"]) == 3


def test_health(server) -> None:
    server.request("GET", "/health")
    response = server.getresponse()
    body = json.loads(response.read())
    assert response.status == 200 and body["status"] == "ok" and body["redis"] == "ok"
    assert body["retrieval"]["index"]["version"] == "v1" and body["feature_service_drift"] == {}


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"user_id": 1, "pin_ids": []}, 422, "pin_ids is empty"),
        ({"user_id": 1}, 422, "give either pin_ids"),
        ({"user_id": 1, "pin_ids": [1], "k": 3}, 422, "not both"),
        ({"user_id": 1, "pin_ids": [1], "surface": "tv"}, 422, "unknown surface"),
        ({"user_id": 1, "pin_ids": [1], "sort_by": "ltv"}, 422, "loaded rankers are"),
        ({"user_id": 2**64, "pin_ids": [1]}, 422, "less than or equal"),
        ({"user_id": 1, "pin_ids": list(range(101))}, 413, "above the limit of 100"),
        ({"user_id": 1, "k": 51}, 413, "above the limit of 50"),
        ({"user_id": 1, "pin_ids": list(range(10**6, 10**6 + 3000))}, 413, "request body of"),
    ],
)
def test_bad_requests_are_refused_with_a_clear_message(server, body, status, message) -> None:
    got, answer = post_json(server, "/rank", body)
    assert got == status, answer
    assert message in json.dumps(answer)


# ---------------------------------------------------------------------------------------------
# Redis faults: 503 within a bounded time, never a hang
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never answers (a hung Redis)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    listener.close()


@pytest.mark.parametrize("redis_state", ["down", "hung"])
def test_redis_down_or_hung_gives_503_within_the_timeout(store, platform, silent_server, redis_state) -> None:
    from derm.infra.redis_server import free_port
    from derm.serving.embedding_reader import RedisHashReader, RedisTimeouts
    from derm.serving.http_api import create_app
    from derm.serving.service import RankingService

    port = free_port() if redis_state == "down" else silent_server
    redis_reader = RedisHashReader(f"127.0.0.1:{port}", timeouts=RedisTimeouts(connect=0.3, read=0.3, cooldown=0.2))
    broken = RankingService(store, untrained_rankers(store, ("ctr",)), redis_reader=redis_reader)
    with serve_in_thread(create_app(broken)) as app_port:
        connection = http.client.HTTPConnection("127.0.0.1", app_port, timeout=10)
        for _ in range(3):  # the first pays the timeout, the next ones fail fast during the cooldown
            started = time.monotonic()
            status, body = post_json(connection, "/rank", {"user_id": 1, "pin_ids": [1, 2]})
            assert status == 503 and "unavailable" in body["detail"], body
            assert time.monotonic() - started < 2.0
        connection.request("GET", "/health")
        response = connection.getresponse()
        assert response.status == 503 and json.loads(response.read())["status"] == "unavailable"
        connection.close()


# ---------------------------------------------------------------------------------------------
# Feast's own feature server serves the same features
# ---------------------------------------------------------------------------------------------


def test_feast_feature_server_serves_the_same_features(store, service) -> None:
    from feast.feature_server import get_app

    refs = ["ctr_pin_emb_v1:ctr_pin_emb", "pin_daily_stats:pin_clicks_7d"]
    pins = [2, UNKNOWN, 11]
    with serve_in_thread(get_app(store)) as port:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        status, body = post_json(connection, "/get-online-features", {"features": refs, "entities": {"pin_id": pins}})
        connection.close()
    assert status == 200, body
    served = dict(zip(body["metadata"]["feature_names"], body["results"], strict=True))
    features = service.reader.read({"pin_id": np.array(pins)}, now=service.clock())
    for ref in refs:
        name = ref.split(":")[1]
        for row, value in enumerate(served[name]["values"]):
            if value is None:
                assert not features.found[ref][row]
            else:
                np.testing.assert_allclose(features.columns[ref][row], value, rtol=1e-7)


# ---------------------------------------------------------------------------------------------
# ANN: recall against exact search, and the index follows promote / rollback
# ---------------------------------------------------------------------------------------------


def test_hnsw_recall_against_exact_search(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from derm.materialization.catalog import Catalog
    from derm.serving.ann import AnnSettings, build_pin_index

    catalog = Catalog(tmp_path)
    rng = np.random.default_rng(0)
    day = date(2026, 1, 5)
    for family, n in (("ctr_pin", 3000), ("ctr_user", 300)):
        folder = catalog.partition_dir(family, "v1", day)
        folder.mkdir(parents=True)
        key = "pin_id" if family.endswith("pin") else "user_id"
        vectors = unit_vectors(rng, n, 32)
        table = pa.table({key: np.arange(n), f"{family}_emb": pa.array(list(vectors), pa.list_(pa.float32()))})
        pq.write_table(table, folder / "data.parquet")
    index = build_pin_index(catalog, "ctr_pin", "v1", day, AnnSettings(recall_k=10, recall_queries=200))
    assert index.recall_queries.endswith("ctr_user v1 vectors")
    assert index.recall_at_k >= 0.9, index.describe()
    ids, scores = index.search(unit_vectors(rng, 2, 32), 5)
    assert ids.shape == (2, 5) and np.all(np.diff(scores, axis=1) <= 1e-6)


def test_index_is_rebuilt_when_a_new_version_is_promoted(server, service, platform: BenchPlatform) -> None:
    from derm.core.feast_repo import FeatureRepo
    from derm.materialization.promotion import promote, rollback

    rng = np.random.default_rng(9)
    day = platform.embedding_day
    for family, count in (("ctr_user", USERS), ("ctr_pin", PINS)):
        version = publish_embeddings(platform.paths, family, day, np.arange(count), unit_vectors(rng, count, DIM), "b")
        assert version == "v2"
    manager = service.index_manager
    assert manager.refresh().version == "v1", "publishing alone does not move what is served"

    promote(platform.paths, "ctr", "v2", repo=FeatureRepo())
    try:
        time.sleep(0.01)
        assert manager.refresh().version == "v2"
        status, body = post_json(server, "/retrieve", {"user_id": 4, "k": 5})
        assert status == 200 and body["retrieval"]["version"] == "v2" and body["retrieval"]["user_found"]
        # the ranker still reads the versions it was trained on, and health says the service moved on
        status, ranked = post_json(server, "/rank", {"user_id": 4, "pin_ids": [1, 2]})
        assert status == 200 and ranked["embedding_versions"]["ctr"]["ctr_pin"] == "v1"
        assert service.health()["feature_service_drift"]["ctr"]["ctr_pin"] == "v1 -> v2"
    finally:
        rollback(platform.paths, "ctr", repo=FeatureRepo())
    assert manager.refresh().version == "v1"


# ---------------------------------------------------------------------------------------------
# Benchmarks: smoke runs (not timed)
# ---------------------------------------------------------------------------------------------


def test_online_read_benchmark_smoke(platform: BenchPlatform) -> None:
    from bench.online_read import measure

    result = measure(platform, requests=3, pins=30, stock_requests=2)
    for method in ("reader", "raw", "stock", "rank"):
        assert result[method]["n"] >= 2 and result[method]["p99_ms"] > 0
    assert result["pins"] == 30 and result["families"] == 4


def test_load_benchmark_smoke(server) -> None:
    from bench.load_rank import load

    result = load(
        "127.0.0.1", server.port, requests=12, duration=20, concurrency=2, pins=10, users=USERS, pin_pool=PINS
    )
    assert result["requests"] == 12 and result["ok"] == 12 and result["errors"] == 0, result
