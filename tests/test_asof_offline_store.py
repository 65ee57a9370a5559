"""The ASOF JOIN offline store returns what Feast's stock DuckDB offline store returns.

Both stores' ``get_historical_features`` classmethods are called directly (what
``FeatureStore.get_historical_features`` calls through the provider) on small
random repositories written to Parquet per case, and their results compared as
Arrow tables and as pandas frames, after putting both results (which come back
in no particular order) in the entity dataframe's row order. A pandas
``merge_asof`` oracle checks a few cases independently of Feast.

Rows that tie on (entity, event timestamp, created timestamp) carry equal
feature values here: between such rows Feast's pick is arbitrary (it varies from
run to run), so only cases where the answer is defined can be compared exactly;
``test_full_tie_picks_one_of_the_tied_rows`` covers the other case.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from derm.feast_plugins.asof_offline_store import STORE_TYPE, AsofDuckDBOfflineStore, AsofRetrievalJob

pytestmark = pytest.mark.heavy  # minutes of CI: scheduled first (tests/conftest.py)

BASE = datetime(2026, 1, 1, tzinfo=UTC)
PROJECT = "asof_test"
EMB_DIM = 4
_case_counter = itertools.count()


# ----------------------------------------------------------------------------- Feast objects, built once


@dataclass
class FeastKit:
    """The Feast modules and objects every case shares (importing Feast costs ~15 s here)."""

    root: Path
    config: object
    registry: object
    stock: type
    user: object
    pin: object
    calls: dict[str, int] = field(default_factory=lambda: {"cases": 0})


@pytest.fixture(scope="session")
def kit(tmp_path_factory: pytest.TempPathFactory) -> FeastKit:
    from feast import Entity, ValueType
    from feast.infra.offline_stores.duckdb import DuckDBOfflineStore
    from feast.infra.registry.registry import Registry
    from feast.repo_config import RepoConfig

    root = tmp_path_factory.mktemp("asof")
    config = RepoConfig(
        project=PROJECT,
        provider="local",
        registry={"registry_type": "file", "path": str(root / "registry.db")},
        offline_store={"type": STORE_TYPE},
        online_store={"type": "sqlite", "path": str(root / "online.db")},
        entity_key_serialization_version=3,
        repo_path=str(root),
    )
    registry = Registry(PROJECT, config.registry, repo_path=root)
    return FeastKit(
        root=root,
        config=config,
        registry=registry,
        stock=DuckDBOfflineStore,
        user=Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64),
        pin=Entity(name="pin", join_keys=["pin_id"], value_type=ValueType.INT64),
    )


# ----------------------------------------------------------------------------- feature data of one case

# Columns as they are in the Parquet files. user_stats renames "clicks_raw" to the feature "user_clicks" by
# field_mapping and has a created timestamp; the embedding view is shaped like the platform's.
SOURCE_SCHEMAS = {
    "ctr_user_emb_v1": pa.schema(
        [
            ("user_id", pa.int64()),
            ("event_timestamp", pa.timestamp("us", tz="UTC")),
            ("ctr_user_emb", pa.list_(pa.float32())),
        ]
    ),
    "user_stats": pa.schema(
        [
            ("user_id", pa.int64()),
            ("event_timestamp", pa.timestamp("us", tz="UTC")),
            ("created", pa.timestamp("us", tz="UTC")),
            ("clicks_raw", pa.int64()),
            ("user_ctr", pa.float64()),
        ]
    ),
    "pin_stats": pa.schema(
        [
            ("pin_id", pa.int64()),
            ("event_timestamp", pa.timestamp("ns", tz="UTC")),
            ("pin_score", pa.float32()),
            ("pin_category", pa.string()),
        ]
    ),
}
KEY_OF = {"ctr_user_emb_v1": "user_id", "user_stats": "user_id", "pin_stats": "pin_id"}
FEATURES_OF = {
    "ctr_user_emb_v1": ["ctr_user_emb"],
    "user_stats": ["user_clicks", "user_ctr"],
    "pin_stats": ["pin_score", "pin_category"],
}


def _value(view: str, column: str, tie_key: tuple) -> object:
    """A feature value that depends only on the row's (entity, event time, created time): tied rows agree."""
    seed = zlib.crc32(repr((view, column, tie_key)).encode())
    rng = np.random.default_rng(seed)
    if seed % 11 == 0:
        return None
    if column == "ctr_user_emb":
        return [float(x) for x in rng.standard_normal(EMB_DIM).astype(np.float32)]
    if column == "clicks_raw":
        return int(rng.integers(0, 1000))
    if column == "user_ctr":
        return float(rng.random())
    if column == "pin_score":
        return float(np.float32(rng.random()))
    return f"cat{seed % 7}"


def write_source(directory: Path, view: str, rows: list[tuple[int, datetime, datetime | None]]) -> Path:
    """Day-partitioned Parquet (``date=YYYY-MM-DD/data.parquet``) like the platform's offline store."""
    schema = SOURCE_SCHEMAS[view]
    key = KEY_OF[view]
    records = []
    for entity_id, ts, created in rows:
        record: dict[str, object] = {key: entity_id, "event_timestamp": ts}
        if "created" in schema.names:
            record["created"] = created
        tie_key = (entity_id, ts, created if "created" in schema.names else None)
        for column in schema.names[len(record) :]:
            record[column] = _value(view, column, tie_key)
        records.append(record)
    folder = directory / view
    by_day: dict[str, list[dict]] = {}
    for record in records:
        by_day.setdefault(record["event_timestamp"].date().isoformat(), []).append(record)
    if not by_day:  # an empty source is still a readable folder with the right columns
        by_day[BASE.date().isoformat()] = []
    for day, day_records in by_day.items():
        (folder / f"date={day}").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(day_records, schema=schema), folder / f"date={day}" / "data.parquet")
    return folder


def make_views(kit: FeastKit, folders: dict[str, Path], ttls: dict[str, timedelta | None]) -> dict[str, object]:
    from feast import FeatureView, Field, FileSource
    from feast.data_format import ParquetFormat
    from feast.types import Array, Float32, Float64, Int64, String

    schemas = {
        "ctr_user_emb_v1": [Field(name="user_id", dtype=Int64), Field(name="ctr_user_emb", dtype=Array(Float32))],
        "user_stats": [
            Field(name="user_id", dtype=Int64),
            Field(name="user_clicks", dtype=Int64),
            Field(name="user_ctr", dtype=Float64),
        ],
        "pin_stats": [
            Field(name="pin_id", dtype=Int64),
            Field(name="pin_score", dtype=Float32),
            Field(name="pin_category", dtype=String),
        ],
    }
    views = {}
    for name, folder in folders.items():
        source = FileSource(
            name=f"{name}_source",
            path=str(folder),
            file_format=ParquetFormat(),
            timestamp_field="event_timestamp",
            created_timestamp_column="created" if name == "user_stats" else "",
            field_mapping={"clicks_raw": "user_clicks"} if name == "user_stats" else None,
        )
        views[name] = FeatureView(
            name=name,
            entities=[kit.pin if name == "pin_stats" else kit.user],
            ttl=ttls.get(name),
            schema=schemas[name],
            source=source,
        )
    return views


# ----------------------------------------------------------------------------- running both stores


def _in_entity_order(table: pa.Table) -> pa.Table:
    return table.take(pc.sort_indices(table, [("idx", "ascending")]))


def retrieve_both(
    kit: FeastKit, views: list, refs: list[str], entity_df: pd.DataFrame, full_feature_names: bool
) -> tuple[pa.Table, pa.Table, pd.DataFrame, pd.DataFrame]:
    """(asof arrow, stock arrow, asof df, stock df), both put in entity order by the ``idx`` column."""
    args = (kit.config, views, refs, entity_df.copy(), kit.registry, PROJECT, full_feature_names)
    asof_job = AsofDuckDBOfflineStore.get_historical_features(*args)
    assert isinstance(asof_job, AsofRetrievalJob)
    asof_table = _in_entity_order(asof_job.to_arrow())
    asof_df = asof_job.to_df().sort_values("idx", kind="stable").reset_index(drop=True)
    stock_job = kit.stock.get_historical_features(
        kit.config, views, refs, entity_df.copy(), kit.registry, PROJECT, full_feature_names
    )
    stock_table = _in_entity_order(stock_job.to_arrow())
    stock_df = stock_job.to_df().sort_values("idx", kind="stable").reset_index(drop=True)
    kit.calls["cases"] += 1
    return asof_table, stock_table, asof_df, stock_df


def assert_same(asof_table: pa.Table, stock_table: pa.Table, asof_df: pd.DataFrame, stock_df: pd.DataFrame) -> None:
    assert asof_table.column("idx").to_pylist() == list(range(asof_table.num_rows)), "every entity row comes back"
    assert asof_table.schema == stock_table.schema, f"\n{asof_table.schema}\n!=\n{stock_table.schema}"
    if not asof_table.equals(stock_table):
        for name in asof_table.column_names:
            a, b = asof_table.column(name).to_pylist(), stock_table.column(name).to_pylist()
            assert a == b, f"column {name}:\nasof  {a}\nstock {b}"
    assert list(asof_df.columns) == list(stock_df.columns)
    assert asof_df.dtypes.to_dict() == stock_df.dtypes.to_dict()
    scalar_columns = [c for c in asof_df.columns if asof_df[c].dtype != object]
    pd.testing.assert_frame_equal(asof_df[scalar_columns], stock_df[scalar_columns])


# ----------------------------------------------------------------------------- the property test

HOURS = 30  # the time axis of a case, in hours from BASE; small so that ties and TTL boundaries are common
TTL_CHOICES = [None, timedelta(0), timedelta(hours=1), timedelta(hours=3), timedelta(hours=7), timedelta(days=1)]
TIME_ZONES = ["UTC", None, "America/New_York"]


def _timestamps(max_minutes: int = HOURS * 60) -> st.SearchStrategy[datetime]:
    # Mostly whole hours (ties, exact TTL boundaries), sometimes odd minutes and microseconds.
    whole_hours = st.integers(0, HOURS).map(lambda h: BASE + timedelta(hours=h))
    odd = st.tuples(st.integers(0, max_minutes), st.sampled_from([0, 1, 999_999])).map(
        lambda mu: BASE + timedelta(minutes=mu[0], microseconds=mu[1])
    )
    return st.one_of(whole_hours, whole_hours, odd)


def _source_rows(view: str) -> st.SearchStrategy[list]:
    key_ids = st.integers(0, 4) if KEY_OF[view] == "user_id" else st.integers(10, 13)
    created = st.one_of(st.none(), st.integers(0, 3).map(lambda h: BASE + timedelta(hours=h)))
    return st.lists(st.tuples(key_ids, _timestamps(), created), max_size=18)


@st.composite
def retrieval_cases(draw: st.DrawFn) -> dict:
    views = draw(st.lists(st.sampled_from(list(SOURCE_SCHEMAS)), min_size=1, max_size=3, unique=True))
    rows = {view: draw(_source_rows(view)) for view in views}
    ttls = {view: draw(st.sampled_from(TTL_CHOICES)) for view in views}
    features = {view: draw(st.lists(st.sampled_from(FEATURES_OF[view]), min_size=1, unique=True)) for view in views}
    # Entity rows: users 0..5 and pins 10..14, so some have no feature rows at all; drawn from a small pool so
    # that duplicate entity rows are common.
    pool = draw(st.lists(st.tuples(st.integers(0, 5), st.integers(10, 14), _timestamps(HOURS * 60 + 120)), min_size=1))
    entity_rows = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=14))
    return {
        "views": views,
        "rows": rows,
        "ttls": ttls,
        "features": features,
        "entity_rows": entity_rows,
        "time_zone": draw(st.sampled_from(TIME_ZONES)),
        "full_feature_names": draw(st.booleans()),
        "pin_join_key": draw(st.sampled_from(["pin_id", "ad_id"])),
        "pin_alias": draw(st.sampled_from([None, "pin_stats_alias"])),
    }


def build_case(kit: FeastKit, case: dict) -> tuple[list, list[str], pd.DataFrame]:
    directory = kit.root / f"case{next(_case_counter)}"
    folders = {view: write_source(directory, view, case["rows"][view]) for view in case["views"]}
    views = make_views(kit, folders, case["ttls"])
    refs = []
    requested = []
    for name in case["views"]:
        view = views[name]
        if name == "pin_stats":
            # As a feature service projects it: an alias and an entity dataframe column of another name.
            if case["pin_alias"]:
                view = view.with_name(case["pin_alias"])
            if case["pin_join_key"] != "pin_id":
                view = view.with_join_key_map({"pin_id": case["pin_join_key"]})
        requested.append(view)
        refs += [f"{view.projection.name_to_use()}:{feature}" for feature in case["features"][name]]
    timestamps = pd.to_datetime([ts for _, _, ts in case["entity_rows"]], utc=True)
    if case["time_zone"] is None:
        timestamps = timestamps.tz_localize(None)
    elif case["time_zone"] != "UTC":
        timestamps = timestamps.tz_convert(case["time_zone"])
    entity_df = pd.DataFrame(
        {
            "user_id": np.array([u for u, _, _ in case["entity_rows"]], dtype=np.int64),
            case["pin_join_key"]: np.array([p for _, p, _ in case["entity_rows"]], dtype=np.int64),
            "event_timestamp": timestamps,
            "idx": np.arange(len(case["entity_rows"]), dtype=np.int64),
            "label": np.arange(len(case["entity_rows"])) % 2 == 0,
        }
    )
    return requested, refs, entity_df


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=retrieval_cases())
def test_asof_store_matches_stock_duckdb_store(kit: FeastKit, case: dict) -> None:
    views, refs, entity_df = build_case(kit, case)
    assert_same(*retrieve_both(kit, views, refs, entity_df, case["full_feature_names"]))


# ----------------------------------------------------------------------------- an oracle independent of Feast


def merge_asof_oracle(
    source: pa.Table, key: str, entity_key: str, entity_df: pd.DataFrame, ttl: timedelta | None, created: str | None
) -> list[int | None]:
    """For each entity row, the index of the source row Feast's semantics pick, by pandas merge_asof."""
    src = pd.DataFrame(
        {
            "key": source.column(key).to_numpy(),
            "ts": source.column("event_timestamp").to_pandas().dt.tz_convert("UTC").astype("datetime64[us, UTC]"),
            "row": np.arange(source.num_rows),
        }
    )
    if created:
        # Newest created timestamp wins among rows at the same event time, a NULL created timestamp last.
        src["created"] = source.column(created).to_pandas()
        src = src.sort_values(["ts", "created"], na_position="first", kind="stable")
        src = src.drop_duplicates(["key", "ts"], keep="last")
    src = src.assign(match_ts=src["ts"]).sort_values("ts", kind="stable")[["key", "ts", "row", "match_ts"]]
    ts = entity_df["event_timestamp"]
    ts = ts.dt.tz_localize("UTC") if ts.dt.tz is None else ts.dt.tz_convert("UTC")
    left = pd.DataFrame({"key": entity_df[entity_key].to_numpy(), "ts": ts.astype("datetime64[us, UTC]")})
    left["position"] = np.arange(len(left))
    merged = pd.merge_asof(left.sort_values("ts", kind="stable"), src, on="ts", by="key", direction="backward")
    if ttl:
        merged.loc[merged["match_ts"] < merged["ts"] - ttl, "row"] = np.nan
    merged = merged.sort_values("position")
    return [None if pd.isna(r) else int(r) for r in merged["row"]]


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=retrieval_cases())
def test_asof_store_matches_merge_asof_oracle(kit: FeastKit, case: dict) -> None:
    views, refs, entity_df = build_case(kit, case)
    result = _in_entity_order(
        AsofDuckDBOfflineStore.get_historical_features(
            kit.config, views, refs, entity_df, kit.registry, PROJECT, case["full_feature_names"]
        ).to_arrow()
    )
    for view in views:
        name = view.name
        folder = Path(view.batch_source.path)
        # Read without the hive partition column, in a stable order, to index rows.
        source = pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("date=*/data.parquet"))]).cast(
            SOURCE_SCHEMAS[name]
        )
        if name == "user_stats":
            source = source.rename_columns(["user_clicks" if c == "clicks_raw" else c for c in source.column_names])
        entity_key = (view.projection.join_key_map or {}).get(KEY_OF[name], KEY_OF[name])
        picked = merge_asof_oracle(
            source, KEY_OF[name], entity_key, entity_df, view.ttl, "created" if name == "user_stats" else None
        )
        prefix = view.projection.name_alias or name
        for feature in case["features"][name]:
            column = f"{prefix}__{feature}" if case["full_feature_names"] else feature
            values = source.column(feature).to_pylist()
            expected = [None if r is None else values[r] for r in picked]
            assert result.column(column).to_pylist() == expected, column


# ----------------------------------------------------------------------------- specific edge cases


def _one_view_case(kit: FeastKit, tmp: str, view: str, rows: list, ttl: timedelta | None) -> object:
    directory = kit.root / tmp
    return make_views(kit, {view: write_source(directory, view, rows)}, {view: ttl})[view]


def _entity_df(rows: list[tuple[int, datetime]], key: str = "user_id") -> pd.DataFrame:
    return pd.DataFrame(
        {
            key: np.array([k for k, _ in rows], dtype=np.int64),
            "event_timestamp": pd.to_datetime([t for _, t in rows], utc=True),
            "idx": np.arange(len(rows), dtype=np.int64),
        }
    )


def test_ttl_boundary_is_inclusive(kit: FeastKit) -> None:
    ttl = timedelta(hours=5)
    view = _one_view_case(kit, "ttl_boundary", "user_stats", [(1, BASE, None)], ttl)
    entity_df = _entity_df([(1, BASE + ttl), (1, BASE + ttl + timedelta(microseconds=1)), (1, BASE)])
    asof, stock, asof_df, stock_df = retrieve_both(kit, [view], ["user_stats:user_ctr"], entity_df, False)
    assert_same(asof, stock, asof_df, stock_df)
    ctr = asof.column("user_ctr").to_pylist()
    assert ctr[0] is not None and ctr[1] is None and ctr[2] is not None


def test_zero_ttl_means_no_limit(kit: FeastKit) -> None:
    view = _one_view_case(kit, "ttl_zero", "user_stats", [(1, BASE, None)], timedelta(0))
    entity_df = _entity_df([(1, BASE + timedelta(days=3650))])
    asof, stock, asof_df, stock_df = retrieve_both(kit, [view], ["user_stats:user_ctr"], entity_df, False)
    assert_same(asof, stock, asof_df, stock_df)
    assert asof.column("user_ctr").to_pylist()[0] is not None


def test_tie_on_event_timestamp_is_broken_by_created_timestamp(kit: FeastKit) -> None:
    rows = [
        (1, BASE, BASE + timedelta(hours=1)),
        (1, BASE, BASE + timedelta(hours=3)),  # newest created: wins
        (1, BASE, None),  # NULL created sorts last under DESC
        (1, BASE, BASE + timedelta(hours=2)),
        (2, BASE, None),
        (2, BASE + timedelta(hours=1), None),  # later event time beats any created time
    ]
    view = _one_view_case(kit, "tie_created", "user_stats", rows, None)
    entity_df = _entity_df([(1, BASE + timedelta(hours=1)), (2, BASE + timedelta(hours=2))])
    asof, stock, asof_df, stock_df = retrieve_both(
        kit, [view], ["user_stats:user_clicks", "user_stats:user_ctr"], entity_df, False
    )
    assert_same(asof, stock, asof_df, stock_df)
    assert asof.column("user_clicks").to_pylist() == [
        _value("user_stats", "clicks_raw", (1, BASE, BASE + timedelta(hours=3))),
        _value("user_stats", "clicks_raw", (2, BASE + timedelta(hours=1), None)),
    ]


def test_full_tie_picks_one_of_the_tied_rows(kit: FeastKit) -> None:
    """Rows equal in entity, event and created time: Feast's pick among them is arbitrary, so is ours."""
    directory = kit.root / "full_tie" / "ctr_user_emb_v1" / "date=2026-01-01"
    directory.mkdir(parents=True)
    embeddings = [[float(i)] * EMB_DIM for i in range(20)]
    pq.write_table(
        pa.Table.from_pydict(
            {"user_id": [1] * 20, "event_timestamp": [BASE] * 20, "ctr_user_emb": embeddings},
            schema=SOURCE_SCHEMAS["ctr_user_emb_v1"],
        ),
        directory / "data.parquet",
    )
    view = make_views(kit, {"ctr_user_emb_v1": directory.parent}, {})["ctr_user_emb_v1"]
    entity_df = _entity_df([(1, BASE + timedelta(hours=1))] * 3)
    asof, stock, _, _ = retrieve_both(kit, [view], ["ctr_user_emb_v1:ctr_user_emb"], entity_df, False)
    for table in (asof, stock):
        assert all(embedding in embeddings for embedding in table.column("ctr_user_emb").to_pylist())


def test_entity_without_any_feature_rows_gets_nulls(kit: FeastKit) -> None:
    view = _one_view_case(kit, "missing", "user_stats", [(1, BASE, None)], None)
    entity_df = _entity_df([(7, BASE + timedelta(hours=1)), (1, BASE + timedelta(hours=1)), (1, BASE - timedelta(1))])
    asof, stock, asof_df, stock_df = retrieve_both(
        kit, [view], ["user_stats:user_clicks", "user_stats:user_ctr"], entity_df, False
    )
    assert_same(asof, stock, asof_df, stock_df)
    # An int64 feature with a missing value becomes float64 NaN in pandas, as in the stock store.
    assert asof_df["user_clicks"].dtype == np.float64
    assert asof_df["user_clicks"].isna().tolist() == [True, False, True]


def test_extra_entity_columns_and_duplicate_rows_pass_through(kit: FeastKit) -> None:
    view = _one_view_case(kit, "extra", "ctr_user_emb_v1", [(1, BASE, None), (2, BASE, None)], timedelta(days=30))
    entity_df = _entity_df([(1, BASE + timedelta(hours=1)), (2, BASE), (1, BASE + timedelta(hours=1))])
    entity_df.insert(0, "label", [1.0, 0.0, 1.0])
    entity_df["request_id"] = ["a", "b", None]
    entity_df["segment"] = pd.Categorical(["x", "y", "x"])
    asof, stock, asof_df, stock_df = retrieve_both(kit, [view], ["ctr_user_emb_v1:ctr_user_emb"], entity_df, False)
    assert_same(asof, stock, asof_df, stock_df)
    assert list(asof_df.columns) == [*entity_df.columns, "ctr_user_emb"]
    emb = asof.column("ctr_user_emb").to_pylist()
    assert emb[0] == emb[2] is not None


def test_full_feature_names_with_alias_and_join_key_map(kit: FeastKit) -> None:
    directory = kit.root / "full_names"
    views = make_views(
        kit,
        {
            "pin_stats": write_source(directory, "pin_stats", [(10, BASE, None), (11, BASE, None)]),
            "ctr_user_emb_v1": write_source(directory, "ctr_user_emb_v1", [(1, BASE, None)]),
        },
        {},
    )
    pins = views["pin_stats"].with_name("ad").with_join_key_map({"pin_id": "ad_id"})
    entity_df = _entity_df([(1, BASE + timedelta(hours=1)), (3, BASE + timedelta(hours=1))])
    entity_df["ad_id"] = np.array([11, 10], dtype=np.int64)
    refs = ["ad:pin_score", "ad:pin_category", "ctr_user_emb_v1:ctr_user_emb"]
    asof, stock, asof_df, stock_df = retrieve_both(kit, [pins, views["ctr_user_emb_v1"]], refs, entity_df, True)
    assert_same(asof, stock, asof_df, stock_df)
    assert asof.column_names[-3:] == ["ad__pin_score", "ad__pin_category", "ctr_user_emb_v1__ctr_user_emb"]


def test_embedding_of_full_width(kit: FeastKit) -> None:
    directory = kit.root / "wide" / "ctr_user_emb_v1" / "date=2026-01-01"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((50, 64)).astype(np.float32)
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array(np.arange(50), pa.int64()),
                "event_timestamp": pa.array([BASE] * 50, pa.timestamp("us", tz="UTC")),
                "ctr_user_emb": pa.FixedSizeListArray.from_arrays(embeddings.ravel(), 64).cast(pa.list_(pa.float32())),
            }
        ),
        directory / "data.parquet",
    )
    view = make_views(kit, {"ctr_user_emb_v1": directory.parent}, {"ctr_user_emb_v1": timedelta(days=30)})
    entity_df = _entity_df([(int(u), BASE + timedelta(hours=int(u) % 3)) for u in rng.integers(0, 60, 40)])
    asof, stock, asof_df, stock_df = retrieve_both(
        kit, [view["ctr_user_emb_v1"]], ["ctr_user_emb_v1:ctr_user_emb"], entity_df, False
    )
    assert_same(asof, stock, asof_df, stock_df)


def test_unsupported_requests_fall_back_to_the_stock_store(kit: FeastKit) -> None:
    view = _one_view_case(kit, "fallback", "user_stats", [(1, BASE, BASE)], None)
    entity_df = _entity_df([(1, BASE + timedelta(hours=1))])
    args = (kit.config, [view], ["user_stats:user_ctr"], entity_df, kit.registry, PROJECT, False)
    job = AsofDuckDBOfflineStore.get_historical_features(*args, filter_by_created_timestamp=True)
    assert not isinstance(job, AsofRetrievalJob)
    assert job.to_df()["user_ctr"].notna().all()
    # A reference no given view serves is an on-demand feature view's.
    job = AsofDuckDBOfflineStore.get_historical_features(
        kit.config, [view], ["user_stats:user_ctr", "odfv:x"], entity_df, kit.registry, PROJECT, False
    )
    assert not isinstance(job, AsofRetrievalJob)


def test_feature_store_uses_the_store_from_its_config(kit: FeastKit, tmp_path: Path) -> None:
    """Through FeatureStore: the config's type selects the store, apply infers join keys, persist works."""
    from feast import FeatureStore, FeatureView, Field, FileSource
    from feast.data_format import ParquetFormat
    from feast.infra.offline_stores.file_source import SavedDatasetFileStorage
    from feast.repo_config import RepoConfig
    from feast.types import Float64

    config = RepoConfig(
        project=PROJECT,
        provider="local",
        registry={"registry_type": "file", "path": str(tmp_path / "registry.db")},
        offline_store={"type": STORE_TYPE, "threads": 1},
        online_store={"type": "sqlite", "path": str(tmp_path / "online.db")},
        entity_key_serialization_version=3,
        repo_path=str(tmp_path),
    )
    folder = write_source(tmp_path, "user_stats", [(1, BASE, None), (2, BASE, None)])
    source = FileSource(name="stats", path=str(folder), file_format=ParquetFormat(), timestamp_field="event_timestamp")
    # No entity column in the schema: FeatureStore.apply infers it, as `feast apply` does.
    stats = FeatureView(
        name="stats", entities=[kit.user], schema=[Field(name="user_ctr", dtype=Float64)], source=source
    )
    store = FeatureStore(config=config)
    assert type(store._get_provider().offline_store).__name__ == "AsofDuckDBOfflineStore"
    store.apply([kit.user, stats])
    entity_df = _entity_df([(2, BASE + timedelta(hours=1)), (1, BASE + timedelta(hours=1)), (3, BASE)])
    job = store.get_historical_features(entity_df=entity_df, features=["stats:user_ctr"])
    assert isinstance(job, AsofRetrievalJob)
    df = job.to_df().set_index("user_id")
    assert df.loc[[2, 1], "user_ctr"].tolist() == [
        _value("user_stats", "user_ctr", (2, BASE, None)),
        _value("user_stats", "user_ctr", (1, BASE, None)),
    ]
    job.persist(SavedDatasetFileStorage(path=str(tmp_path / "saved.parquet")))
    assert pq.read_table(tmp_path / "saved.parquet").num_rows == 3


def test_benchmark_smoke(tmp_path: Path) -> None:
    """The benchmark's measurements on tiny data, in process (a subprocess per measurement costs an import of
    Feast each), plus one real subprocess measurement."""
    from bench.historical_retrieval import _agree, _measure_in_subprocess, measure, write_dataset

    write_dataset(tmp_path, events=300, entities=20, days=3)
    results = {method: measure(tmp_path, method, 300) for method in ("asof_store", "stock_store", "handwritten_asof")}
    for result in results.values():
        assert result["seconds"] > 0 and result["peak_rss_mb"] > 0 and result["rows"] == 300
    assert _agree(results["asof_store"], results["stock_store"])
    assert _agree(results["asof_store"], results["handwritten_asof"])
    assert _agree(_measure_in_subprocess(tmp_path, "handwritten_asof", 300), results["handwritten_asof"])
