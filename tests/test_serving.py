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

import contextlib
import http.client
import json
import os
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

pytestmark = pytest.mark.heavy  # minutes of CI: scheduled first (tests/conftest.py)

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
    )
    # The log's own schema: columns it has that these rows do not set (is_ad, conversion_timestamp...) are
    # ads impressions / null, as the generator writes them.
    schema = pq.read_schema(next(folder.glob("*.parquet")))
    defaults = {"is_ad": pa.array([True] * n)}
    for field in schema:
        if field.name not in table.column_names:
            table = table.append_column(field.name, defaults.get(field.name, pa.nulls(n, field.type)))
    table = table.select(schema.names).cast(schema)
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


class _KeepAlive(http.client.HTTPConnection):
    """A client connection that reconnects when idle past uvicorn's 5 s keep-alive (tests run in random order)."""

    _used = 0.0

    def request(self, *args, **kwargs) -> None:
        if time.monotonic() - self._used > 2.0:
            self.close()  # the next request opens a new connection
        super().request(*args, **kwargs)

    def getresponse(self) -> http.client.HTTPResponse:
        response = super().getresponse()
        self._used = time.monotonic()
        return response


@pytest.fixture(scope="module")
def server(service):
    from derm.serving.http_api import create_app

    service.index_manager.refresh(wait=True)  # as `derm serve` does before taking traffic
    with serve_in_thread(create_app(service)) as port:
        connection = _KeepAlive("127.0.0.1", port, timeout=30)
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


def _active_user(store, candidates=range(40)) -> int:
    """A user with every user feature of the CTR ranker online (so no default is involved)."""
    refs = [ref for ref in _ranker_refs(store) if ref.startswith(("user_", "ctr_user", "cvr_user"))]
    rows = [{"user_id": u} for u in candidates]
    values = store.get_online_features(features=refs, entity_rows=rows).to_dict()
    names = [ref.split(":")[1] for ref in refs]
    return next(u for i, u in enumerate(candidates) if all(values[n][i] is not None for n in names))


def _independent_scores(
    store, service, when, user: int, pins: list[int], surface: str, folder: Path, extra: dict | None = None
) -> dict:
    """Each ranker's scores recomputed without the serving code: Feast's stock ``get_online_features``
    for every feature and the Pins' attributes, the rankers saved to disk and loaded back from their weights.
    ``extra``: more columns of the frame (a sequence ranker's ``recent_pins``)."""
    from derm.training.downstream.ranker import load_ranker

    n = len(pins)
    expected = {}
    for objective, ranker in service.rankers.items():
        loaded = load_ranker(ranker.save(folder / objective))
        refs = [*loaded.feature_refs, "pin_attributes:advertiser_id", "pin_attributes:category_id"]
        rows = [{"user_id": user, "pin_id": pin} for pin in pins]
        stock = store.get_online_features(features=refs, entity_rows=rows).to_dict()
        frame: dict = {
            "user_id": np.full(n, user, dtype=np.int64),
            "pin_id": np.asarray(pins, dtype=np.int64),
            "surface": np.full(n, surface, dtype=object),
            "day_of_week": np.full(n, when.weekday(), dtype=np.int64),
        }
        for name in ("advertiser_id", "category_id"):
            frame[name] = np.array([-1 if v is None else v for v in stock[name]], dtype=np.int64)
        for ref in loaded.feature_refs:
            name = ref.split(":")[1]
            if name.endswith("_emb"):
                frame[name] = list(stock[name])  # vectors, None where missing
            else:
                frame[name] = np.array([np.nan if v is None else v for v in stock[name]], dtype=np.float64)
        expected[objective] = loaded.score({**frame, **(extra or {})})
    return expected


def test_rank_scores_candidates_and_reports_versions(server, service, store, platform, tmp_path) -> None:
    user = _active_user(store)
    pins = [5, 1, UNKNOWN, 9, 5, 30]
    status, body = post_json(server, "/rank", {"user_id": user, "pin_ids": pins, "surface": "search"})
    assert status == 200, body
    ranked = [item["pin_id"] for item in body["items"]]
    assert sorted(ranked) == sorted(set(pins)), "every distinct candidate is ranked once"
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    assert set(body["items"][0]["scores"]) == {"ctr", "cvr"}
    assert body["embedding_versions"]["ctr"] == {f: "v1" for f in ("ctr_pin", "ctr_user", "cvr_pin", "cvr_user")}
    assert set(body["rankers"]) == {"ctr", "cvr"} and body["rankers"]["ctr"].startswith("ctr@")
    assert body["user_missing"] == [] and body["pins_missing"] == 1
    assert [i["embedding_found"] for i in body["items"] if i["pin_id"] == UNKNOWN] == [False]

    # the scores equal an independent computation: Feast's own reader and the rankers' saved weights
    distinct = [5, 1, UNKNOWN, 9, 30]
    expected = _independent_scores(store, service, platform.serving_time, user, distinct, "search", tmp_path)
    for objective in ("ctr", "cvr"):
        by_pin = {item["pin_id"]: item["scores"][objective] for item in body["items"]}
        np.testing.assert_allclose([by_pin[p] for p in distinct], expected[objective], rtol=1e-5, err_msg=objective)

    status, body = post_json(server, "/rank", {"user_id": UNKNOWN, "pin_ids": [1, 2], "sort_by": "cvr"})
    assert status == 200 and body["sort_by"] == "cvr"
    assert "ctr_user_emb_v1:ctr_user_emb" in body["user_missing"] and len(body["items"]) == 2


def test_sequence_ranker_is_served_the_recent_pins_training_builds(platform, store, tmp_path) -> None:
    """A CTR ranker with a user-sequence encoder, served: /rank with the user's recent_pins as the training
    set builds them (``with_user_sequences`` over the event log, point in time) scores what the saved ranker
    scores offline from Feast's stock reads and that column; without recent_pins it is a clear 422."""
    import dataclasses

    import torch

    from derm.serving.http_api import create_app
    from derm.serving.service import RECENT_PINS, RankingService
    from derm.training.downstream.dataset import with_user_sequences
    from derm.training.downstream.ranker import SEQUENCE_COLUMN, Ranker, RankerModelConfig

    assert RECENT_PINS == SEQUENCE_COLUMN
    base = untrained_rankers(store, ("ctr",))["ctr"]
    torch.manual_seed(1)
    ranker = Ranker(dataclasses.replace(base.spec, model=RankerModelConfig(sequence_length=4)))
    service = RankingService(store, {"ctr": ranker}, clock=lambda: platform.serving_time)
    assert service.sequence_rankers == {"ctr"}

    users = pa.table(
        {
            "user_id": pa.array(range(USERS), pa.int64()),
            "event_timestamp": pa.array([platform.serving_time] * USERS, pa.timestamp("us", tz="UTC")),
        }
    )
    sequences = with_user_sequences(users, platform.paths.events_dir, length=4).column(SEQUENCE_COLUMN)
    user = next(u for u, seq in enumerate(sequences.to_pylist()) if len(seq) >= 2 and u != 0)
    recent = sequences.to_pylist()[user]
    pins = [5, 1, UNKNOWN, 9, 30]
    with serve_in_thread(create_app(service)) as port:
        connection = _KeepAlive("127.0.0.1", port, timeout=30)
        status, body = post_json(connection, "/rank", {"user_id": user, "pin_ids": pins, "recent_pins": recent})
        assert status == 200, body
        status, empty = post_json(connection, "/rank", {"user_id": user, "pin_ids": pins, "recent_pins": []})
        assert status == 200, empty
        status, refused = post_json(connection, "/rank", {"user_id": user, "pin_ids": pins})
        connection.close()
    assert status == 422 and "recent_pins" in refused["detail"], refused

    # offline: the saved ranker over Feast's stock reads plus the training set's own recent_pins column
    n = len(pins)
    column = pa.array([recent] * n, pa.list_(pa.int64()))
    expected = _independent_scores(
        store, service, platform.serving_time, user, pins, "home_feed", tmp_path, {SEQUENCE_COLUMN: column}
    )["ctr"]
    served = {item["pin_id"]: item["scores"]["ctr"] for item in body["items"]}
    np.testing.assert_allclose([served[p] for p in pins], expected, rtol=1e-5)
    without = {item["pin_id"]: item["scores"]["ctr"] for item in empty["items"]}
    assert not np.allclose([without[p] for p in pins], expected, rtol=1e-5), "recent_pins changes the scores"


def test_retrieve_and_rank_with_k(server, service, platform: BenchPlatform) -> None:
    from derm.serving.ann import read_partition

    status, body = post_json(server, "/retrieve", {"user_id": 4, "k": 10})
    assert status == 200, body
    assert body["retrieval"]["version"] == "v1" and body["retrieval"]["user_found"]
    assert body["embedding_versions"] == {"ctr_pin": "v1", "ctr_user": "v1"}
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
        # a ranker trained on v1 does not score once v2 is promoted without a compatibility record (issue 15)
        status, refused = post_json(server, "/rank", {"user_id": 4, "pin_ids": [1, 2]})
        assert status == 409 and "ctr_pin trained on v1, promoted v2" in refused["detail"]
        assert service.health()["version_skew"]["ctr"]["ctr_pin"] == {"trained": "v1", "promoted": "v2"}
        # ... and does once the gate's record of the promotion lets rankers of v1 serve v2
        allowed = {"against": "v1", "verdict": "compatible", "serve_older_rankers": True}
        promote(platform.paths, "ctr", "v2", repo=FeatureRepo(), compat=allowed)
        status, ranked = post_json(server, "/rank", {"user_id": 4, "pin_ids": [1, 2]})
        assert status == 200 and ranked["embedding_versions"]["ctr"]["ctr_pin"] == "v1"
        assert service.health()["feature_service_drift"]["ctr"]["ctr_pin"] == "v1 -> v2"
    finally:
        rollback(platform.paths, "ctr", repo=FeatureRepo())
    assert manager.refresh().version == "v1"


# ---------------------------------------------------------------------------------------------
# Hostile input (issue 12 item 6): bodies capped while streaming, ids strictly int64, no 500s
# ---------------------------------------------------------------------------------------------


def _post_chunked(port: int, path: str, chunks: list[bytes]) -> tuple[int, dict, int]:
    """POST ``chunks`` with ``Transfer-Encoding: chunked`` (no Content-Length) over a raw socket, stopping
    as soon as the server answers; returns (status, JSON body, chunks sent)."""
    import select

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        sent = 0
        for chunk in [*chunks, b""]:  # the empty chunk ends the body
            if select.select([sock], [], [], 0.02)[0]:
                break  # answered before the body was complete
            try:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(
            next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        )
        while len(body) < length:
            body += sock.recv(65536)
        return int(head.split(b" ")[1]), json.loads(body[:length]), sent


def test_chunked_bodies_are_capped_while_streaming(server) -> None:
    # 1.5M ids (about 11 MB), far above the 20 kB limit, never announced in a Content-Length
    chunks = [b'{"user_id": 1, "pin_ids": [']
    chunks += [(",".join(map(str, range(i, i + 10_000))) + ",").encode() for i in range(0, 1_500_000, 10_000)]
    chunks.append(b"1]}")
    status, body, sent = _post_chunked(server.port, "/rank", chunks)
    assert status == 413 and "above the limit of 20000 bytes" in body["detail"], body
    assert sent < len(chunks) // 2, f"the server read {sent} of {len(chunks)} chunks before refusing"
    status, body, sent = _post_chunked(server.port, "/rank", [b'{"user_id": 1, ', b'"pin_ids": [1, 2]}'])
    assert status == 200 and len(body["items"]) == 2 and sent == 3, body


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"user_id": True, "pin_ids": [1]}, "user_id"),
        ({"user_id": "7", "pin_ids": [1]}, "user_id"),
        ({"user_id": 7.0, "pin_ids": [1]}, "user_id"),
        ({"user_id": 1, "pin_ids": [1, True]}, "pin_ids"),
        ({"user_id": 1, "pin_ids": ["7"]}, "pin_ids"),
        ({"user_id": 1, "pin_ids": [7.0]}, "pin_ids"),
        ({"user_id": 1, "pin_ids": [-(2**63) - 1]}, "greater than or equal"),
        ({"user_id": 1, "k": True}, "k"),
    ],
)
def test_ids_are_json_integers_in_int64_range(server, body, where) -> None:
    status, answer = post_json(server, "/rank", body)
    assert status == 422 and where in json.dumps(answer), answer
    retrieve = {"user_id": body["user_id"], "k": 1} if where == "user_id" else {"user_id": 1, "k": 7.0}
    status, answer = post_json(server, "/retrieve", retrieve)
    assert status == 422, answer


def test_pin_ids_are_counted_before_any_id_is_parsed(server) -> None:
    # 101 entries that are not even ids: refused for their number, not for their content
    status, answer = post_json(server, "/rank", {"user_id": 1, "pin_ids": [{"x": [1, 2, 3]}] * 101})
    assert status == 413 and "101 candidate Pins" in answer["detail"], answer
    status, answer = post_json(server, "/rank", {"user_id": 1, "pin_ids": 5})
    assert status == 422, answer
    server.request("POST", "/rank", body=b"{not json", headers={"content-type": "application/json"})
    response = server.getresponse()
    assert response.status == 422 and "not valid JSON" in json.loads(response.read())["detail"]


def test_a_vector_with_null_elements_is_a_named_error_not_a_null_score(server, store, platform) -> None:
    import pandas as pd

    corrupt_pin = 10**8 + 7  # a Pin no other test reads
    vector = np.ones(DIM, dtype=np.float32)
    vector[3] = np.nan  # what a NULL element of the published list becomes once written as floats
    frame = pd.DataFrame(
        {
            "pin_id": [corrupt_pin],
            "ctr_pin_emb": [vector.tolist()],
            "event_timestamp": [pd.Timestamp(platform.serving_time) - pd.Timedelta(hours=1)],
        }
    )
    store.write_to_online_store("ctr_pin_emb_v1", frame)
    status, body = post_json(server, "/rank", {"user_id": 1, "pin_ids": [1, corrupt_pin]})
    assert status == 502, body
    assert "ctr_pin_emb_v1:ctr_pin_emb" in body["detail"] and f"pin_id={corrupt_pin}" in body["detail"]
    status, body = post_json(server, "/rank", {"user_id": 1, "pin_ids": [1, 2]})
    assert status == 200 and all(item["score"] is not None for item in body["items"])


def test_redis_error_replies_give_503_not_500(store, platform, tmp_path) -> None:
    """A real error reply from a real Redis: a user whose ACL forbids HMGET (NOPERM). LOADING after a
    restart, OOM and READONLY after a failover are error replies too and take the same path."""
    from derm.infra.redis_server import LocalRedisServer
    from derm.serving.embedding_reader import RedisHashReader, RedisTimeouts
    from derm.serving.http_api import create_app
    from derm.serving.service import RankingService

    with LocalRedisServer(tmp_path / "acl-redis", persist=False) as redis_server:
        redis_server.client().execute_command(
            "ACL", "SETUSER", "reader", "on", ">secret-pass-1234", "~*", "+@all", "-hmget"
        )
        reader = RedisHashReader(
            f"127.0.0.1:{redis_server.port},username=reader,password=secret-pass-1234",
            timeouts=RedisTimeouts(connect=0.3, read=0.3, cooldown=0.0),
        )
        refused = RankingService(store, untrained_rankers(store, ("ctr",)), redis_reader=reader)
        app = create_app(refused)
        with serve_in_thread(app) as port:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", "/metrics")
            before = _samples(connection.getresponse().read().decode())
            for _ in range(2):  # the connection stays in step: the second request gets the same answer
                status, body = post_json(connection, "/rank", {"user_id": 1, "pin_ids": [1, 2]})
                assert status == 503 and "NOPERM" in body["detail"], body
            connection.request("GET", "/metrics")
            after = _samples(connection.getresponse().read().decode())
            connection.close()
    # A delta: `import feast` sets PROMETHEUS_MULTIPROC_DIR, so every app in this process shares the
    # counter files, and other tests' apps may have counted error replies before this one.
    error_replies = ("derm_redis_errors_total", (("kind", "error_reply"),))
    assert after[error_replies] - before.get(error_replies, 0.0) == 2.0


def test_a_failed_index_build_is_backed_off(tmp_path) -> None:
    from derm.materialization.catalog import Catalog
    from derm.serving.ann import PinIndexManager

    catalog = Catalog(tmp_path)
    day = date(2026, 1, 5)
    folder = catalog.partition_dir("ctr_pin", "v1", day)
    folder.mkdir(parents=True)
    (folder / "data.parquet").write_bytes(b"not parquet")
    catalog.state_path.parent.mkdir(parents=True, exist_ok=True)
    catalog.state_path.write_text(
        json.dumps({"promoted": {"ctr_pin": "v1"}, "online": {"ctr_pin": {"v1": day.isoformat()}}})
    )
    manager = PinIndexManager(catalog, "ctr_pin", check_interval=0.0, retry_seconds=30.0)
    for _ in range(20):  # every request after the failure: answered at once, no new build
        assert manager.current() is None
    assert manager.build_attempts == 1 and "attempt 1; next in 30 s" in manager.last_error
    manager._failures[("v1", day)] = (1, 0.0)  # the backoff has run out
    assert manager.current() is None and manager.build_attempts == 2 and "next in 60 s" in manager.last_error


def test_openapi_fuzz_never_answers_500(server) -> None:
    """schemathesis generates requests from the OpenAPI document (valid and invalid ones) against the
    real server on loopback: no answer may be a 5xx, and every 2xx must match its response schema."""
    import schemathesis
    from hypothesis import HealthCheck
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import response_schema_conformance

    base = f"http://127.0.0.1:{server.port}"
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    tried: dict[str, dict[int, int]] = {}

    def fuzzer(strategy, counts: dict[int, int]):
        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def fuzz(case) -> None:
            response = case.call(base_url=base, timeout=30)
            counts[response.status_code] = counts.get(response.status_code, 0) + 1
            checks = [not_a_server_error] + ([response_schema_conformance] if response.status_code < 300 else [])
            case.validate_response(response, checks=checks)

        return fuzz

    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.method.upper() == "POST" else [])
        for mode in modes:  # a GET without parameters has nothing to make invalid
            counts = tried.setdefault(f"{operation.method.upper()} {operation.path} {mode.value}", {})
            fuzzer(operation.as_strategy(generation_mode=mode), counts)()
    total = sum(sum(c.values()) for c in tried.values())
    print(f"schemathesis: {total} cases", json.dumps(tried, sort_keys=True))
    assert total >= 150 and all(status < 500 for c in tried.values() for status in c)
    assert any(200 in c for c in tried.values()) and any(422 in c for c in tried.values())


# ---------------------------------------------------------------------------------------------
# Metrics: /metrics is scraped and says what the requests did
# ---------------------------------------------------------------------------------------------


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_are_scraped(service, platform: BenchPlatform) -> None:
    from derm.serving.http_api import create_app

    # An app of its own, whose samples are created inside this test: `import feast` sets PROMETHEUS_MULTIPROC_DIR,
    # so every app of this process writes the same per-process sample files, each from its own in-memory values,
    # and another app's requests (other tests) overwrite the shared server's counts between two scrapes (failed
    # in file order on the code before too: 3 Redis reads counted for 4).
    service.index_manager.refresh(wait=True)
    with serve_in_thread(create_app(service)) as port:
        server = _KeepAlive("127.0.0.1", port, timeout=30)

        def scrape() -> dict:
            server.request("GET", "/metrics")
            response = server.getresponse()
            assert response.status == 200 and response.getheader("content-type").startswith("text/plain")
            return _samples(response.read().decode())

        before = scrape()
        for _ in range(3):
            assert post_json(server, "/rank", {"user_id": 2, "pin_ids": [1, 2, 3, 4]})[0] == 200
        assert post_json(server, "/retrieve", {"user_id": 2, "k": 5})[0] == 200
        assert post_json(server, "/rank", {"user_id": 2, "pin_ids": []})[0] == 422
        after = scrape()
        server.close()

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("derm_http_requests_total", endpoint="/rank", method="POST", status="200") == 3
    assert grew("derm_http_requests_total", endpoint="/rank", method="POST", status="422") == 1
    assert grew("derm_http_request_seconds_count", endpoint="/rank", status="200") == 3
    assert grew("derm_http_request_seconds_bucket", endpoint="/rank", status="200", le="+Inf") == 3
    assert grew("derm_redis_read_seconds_count") == 4  # 3 rank + 1 retrieve
    assert grew("derm_model_seconds_count", objective="ctr") == 3 and grew("derm_ann_seconds_count") == 1
    assert grew("derm_candidates_per_request_sum", endpoint="/rank") == 12
    assert grew("derm_candidates_per_request_sum", endpoint="/retrieve") == 5
    versions = {(dict(k[1])["family"], dict(k[1])["version"]) for k, v in after.items()
                if k[0] == "derm_embedding_version_served" and v == 1}  # fmt: skip
    assert versions == {(f, "v1") for f in ("ctr_user", "ctr_pin", "cvr_user", "cvr_pin")}
    day = platform.embedding_day.isoformat()
    assert after[("derm_retrieval_index_info", (("day", day), ("family", "ctr_pin"), ("version", "v1")))] == 1
    assert after[("derm_retrieval_index_age_seconds", ())] >= 0


# ---------------------------------------------------------------------------------------------
# derm serve --workers N: worker processes sharing one saved index, metrics aggregated
# ---------------------------------------------------------------------------------------------


def test_serve_workers_share_one_saved_index_and_their_metrics(platform: BenchPlatform, service, tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    from derm.infra.redis_server import free_port
    from derm.training.downstream.ranker import ranker_dir

    for objective, ranker in service.rankers.items():  # where `derm serve` looks for the newest rankers
        ranker.save(ranker_dir(platform.paths.models_dir, objective, "workers-test"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    derm = str(Path(sys.executable).with_name("derm"))
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [derm, "serve", "--port", str(port), "--workers", "2"], stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def get(path: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"{base}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()

    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                if get("/health")[0] == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
        pids = set()
        for _ in range(8):  # fresh connections: the kernel hands them to either worker
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            status, body = post_json(connection, "/rank", {"user_id": 2, "pin_ids": [1, 2, 3]})
            connection.close()
            assert status == 200 and body["rankers"]["ctr"] == "ctr/workers-test", body
            health = json.loads(get("/health")[1])
            pids.add(health["process"])
            assert health["retrieval"]["index"]["source"].startswith("loaded"), health["retrieval"]
        saved = list((platform.paths.data_dir / "serving" / "ann-index").glob("*.faiss"))
        assert len(saved) == 1, saved  # built once by `derm serve`, loaded by each worker
        text = get("/metrics")[1]
        print("\n".join(line for line in text.splitlines() if line.startswith(("# HELP derm_", "derm_"))))
        scraped = _samples(text)
        ok = scraped[("derm_http_requests_total", (("endpoint", "/rank"), ("method", "POST"), ("status", "200")))]
        assert ok == 8, "any worker's /metrics counts every worker's requests"
        assert pids and all(pid != process.pid for pid in pids)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# ---------------------------------------------------------------------------------------------
# Feast's web UI on the platform's registry, driven in headless Chromium
# ---------------------------------------------------------------------------------------------

# The README's screenshot; a test run writes its own under tmp_path unless DERM_UPDATE_SCREENSHOTS=1,
# so that running the tests never leaves the checkout modified.
README_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "feast-ui.png"


@contextlib.contextmanager
def _feast_ui(log: Path):
    """``feast ui`` on loopback over the module's registry (the Feast environment is the platform's)."""
    import subprocess
    import sys
    import urllib.request

    from derm.core.feast_repo import FEATURE_REPO_DIR
    from derm.infra.redis_server import free_port

    port = free_port()
    feast = str(Path(sys.executable).with_name("feast"))
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [feast, "ui", "-h", "127.0.0.1", "-p", str(port)],
            cwd=FEATURE_REPO_DIR,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"feast ui exited: {log.read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as page:
                    if page.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, f"feast ui did not answer: {log.read_text()[-2000:]}"
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _chromium():
    """Headless Debian Chromium through its chromedriver (both from apt: chromium, chromium-driver)."""
    import os

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert browser and driver, "the Feast UI test needs Debian's chromium and chromium-driver (apt-get install -y ...)"
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download a browser
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1100"):  # fmt: skip
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_feast_ui_lists_every_view_with_tags_and_every_service(store, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    views = {view.name: view.tags for view in store.list_feature_views()}
    services = [service.name for service in store.list_feature_services()]
    embedding_views = [name for name, tags in views.items() if "family" in tags]
    # the four families at v1, plus any version another test published (tests run in random order)
    assert {f"{family}_emb_v1" for family in ("ctr_user", "ctr_pin", "cvr_user", "cvr_pin")} <= set(embedding_views)
    assert {"ctr_ranker", "cvr_ranker"} <= set(services)

    def page_shows(driver, url: str, texts: list[str]) -> str:
        driver.get(url)
        body = lambda d: d.find_element(By.TAG_NAME, "body").text  # noqa: E731
        try:
            WebDriverWait(driver, 90, poll_frequency=0.5).until(lambda d: all(t in body(d) for t in texts))
        except Exception:
            missing = [t for t in texts if t not in body(driver)]
            raise AssertionError(f"{url} does not show {missing}; it shows: {body(driver)[:1500]}") from None
        return body(driver)

    screenshot = README_SCREENSHOT if os.environ.get("DERM_UPDATE_SCREENSHOTS") == "1" else tmp_path / "feast-ui.png"
    with _feast_ui(tmp_path / "feast-ui.log") as base:
        driver = _chromium()
        try:
            page_shows(driver, f"{base}/p/{store.project}/feature-view", sorted(views))
            screenshot.parent.mkdir(exist_ok=True)
            assert driver.save_screenshot(str(screenshot))
            page_shows(driver, f"{base}/p/{store.project}/feature-service", services)
            promoted = store.get_feature_service("ctr_ranker").tags  # e.g. ctr_user_version: v1
            assert promoted, "the ranker service records the promoted versions as tags"
            page_shows(driver, f"{base}/p/{store.project}/feature-service/ctr_ranker",
                       [*promoted, *promoted.values()])  # fmt: skip
            for name in embedding_views:  # each embedding view's page shows its tags
                tags = views[name]
                page_shows(driver, f"{base}/p/{store.project}/feature-view/{name}",
                           [name, *tags, tags["model_version"], tags["dim"]])  # fmt: skip
        finally:
            driver.quit()
    assert screenshot.read_bytes().startswith(b"\x89PNG")


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
