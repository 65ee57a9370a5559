"""Bad input: a data directory named with quotes, a space and glob characters; manifests that carry SQL or paths.

Real DuckDB, real Feast (apply, materialize, get_historical_features) and the module's own real
redis-server. Every path reaches DuckDB as a bound parameter (``derm.core.sql``), so a quote in a
folder name is just a character; a manifest is validated against its schema when read, so a
``data_file`` that is not a plain file name inside the snapshot folder is refused before any SQL runs.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, date, datetime
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derm.core.feast_repo import FeatureRepo, export_feast_environment
from derm.core.paths import DATA_DIR_ENV, REDIS_CONNECTION_ENV, REDIS_TYPE_ENV, PlatformPaths
from derm.core.snapshot import MANIFEST_FILE, ManifestError, ManifestSchema, read_manifest
from derm.training.upstream.export import write_precomputed_snapshot

START = date(2026, 1, 1)
DAYS = 4
DIM = 8
NOW = datetime(2026, 1, 8, tzinfo=UTC)


def _vectors(n: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def quoted(tmp_path_factory: pytest.TempPathFactory, redis_server):
    """A data directory named ``it's a "[derm]" *dir]``, with the Feast environment pointing at it.

    The glob characters matter as much as the quotes: DuckDB reads a path holding ``[``, ``*`` or ``?`` as a
    glob pattern, so a Feast folder source under it matched nothing (or, worse, the sibling folders the
    pattern also matches). A sibling ``it's a "d" *dir]`` folder (which ``[derm]`` and ``*`` match) holds a
    decoy Parquet file that must never be read. (No ``?`` here: the SQLite registry's URL cannot hold one,
    and ``derm`` refuses such a data dir by name; ``?`` is covered by the DuckDB-level test below.)
    """
    root = tmp_path_factory.mktemp("bad input")
    paths = PlatformPaths(root / 'it\'s a "[derm]" *dir]')
    saved = {name: os.environ.get(name) for name in (DATA_DIR_ENV, REDIS_CONNECTION_ENV, REDIS_TYPE_ENV)}
    export_feast_environment(paths, redis_server.connection_string)
    yield paths
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def test_the_main_data_path_runs_in_a_data_dir_named_with_a_quote_and_a_space(quoted: PlatformPaths) -> None:
    from feast.infra.offline_stores.duckdb import DuckDBOfflineStore
    from ibis.common.exceptions import IbisTypeError

    from derm.core.feast_repo import feature_store
    from derm.events.schema import import_event_log
    from derm.events.synthetic import SyntheticConfig, generate_event_log
    from derm.feast_plugins.asof_offline_store import AsofDuckDBOfflineStore
    from derm.materialization.counting_features import build_counting_features
    from derm.materialization.publish import publish_snapshot
    from derm.training.downstream.training_sets import (
        build_training_set,
        default_window,
        ranker_service,
        service_families,
    )

    # ingest + stats
    raw = quoted.data_dir / "their 'log'"
    generate_event_log(SyntheticConfig.preset("tiny", start_date=START, n_days=DAYS), raw)
    events = import_event_log(raw, quoted.events_dir)
    assert len(events) == DAYS
    counts = build_counting_features(quoted.events_dir, quoted.stats_dir)
    assert min(counts.values()) > 0

    # publish one snapshot: gate, offline Parquet, feast apply, Redis
    users = 1 + max(pq.read_table(events[0], columns=["user_id"]).column(0).to_pylist())
    vectors = _vectors(users, 1)
    source = write_precomputed_snapshot(
        quoted, "ctr_user", START + date.resolution, np.arange(users), vectors, config_hash="q" * 64
    )
    # The decoy: the same view folder under a sibling data dir that the unescaped path, read as a glob, matches.
    decoy_root = PlatformPaths(quoted.data_dir.parent / 'it\'s a "d" *dir]').embeddings_offline_dir
    decoy = decoy_root / "ctr_user" / read_manifest(source).model_version / f"date={START.isoformat()}"
    decoy.mkdir(parents=True)
    pq.write_table(pa.table({"decoy": [1]}), decoy / "data.parquet")
    result = publish_snapshot(source, quoted, repo=FeatureRepo(), now=NOW)
    assert result.offline_written and result.promoted and result.snapshot_rows == users
    store = feature_store()
    online = store.get_online_features(features=["ctr_user_emb_v1:ctr_user_emb"], entity_rows=[{"user_id": 3}])
    np.testing.assert_array_equal(np.asarray(online.to_dict()["ctr_user_emb"][0], np.float32), vectors[3])

    # Feast's own DuckDB store hands the folder path to DuckDB as is, which reads it as a glob: it finds the
    # decoy's file, not the view's. The platform's store (a subclass) reads the folder as itself.
    view_source = store.get_feature_view("ctr_user_emb_v1").batch_source
    pull = ["user_id"], ["ctr_user_emb"], "event_timestamp"
    with pytest.raises((IbisTypeError, duckdb.IOException), match=r"decoy|it's a \"d\" \*dir\]"):
        DuckDBOfflineStore.pull_all_from_table_or_query(store.config, view_source, *pull).to_arrow()
    pulled = AsofDuckDBOfflineStore.pull_all_from_table_or_query(store.config, view_source, *pull).to_arrow()
    assert sorted(pulled.column("user_id").to_pylist()) == list(range(users))

    # a point-in-time training set through Feast
    service = ranker_service(store, "ctr")
    window = default_window(quoted, service_families(store, service))
    out = quoted.data_dir / "training sets" / "ctr's.parquet"
    info = build_training_set(store, quoted, "ctr", service, window, out)
    table = pq.read_table(out)
    assert info.rows == table.num_rows > 0
    assert table.column("ctr_user_emb").null_count < table.num_rows, "embeddings joined from the quoted folder"
    assert table.column("user_clicks_7d").null_count < table.num_rows, "counting features joined too"


@pytest.mark.parametrize("name", ["it's a [derm] dir?", "a*b", "[", "]x[", "q?"])
def test_a_folder_named_with_glob_characters_is_read_as_itself_by_duckdb(tmp_path: Path, name: str) -> None:
    """``parquet_source`` (what the offline store hands ``read_parquet``) reads the folder, not what it matches."""
    from derm.feast_plugins.duckdb_sql import connect, parquet_source

    folder = tmp_path / name / "view"
    (folder / "date=2026-01-01").mkdir(parents=True)
    pq.write_table(pa.table({"x": [1, 2]}), folder / "date=2026-01-01" / "data.parquet")
    # Siblings the unescaped name matches as a glob ("?" and "*" match any character, "[derm]" one of d, e, r, m).
    for sibling in {name.replace("?", "Q").replace("*", "S"), name.replace("[derm]", "d"), "qa", "ab"} - {name}:
        (tmp_path / sibling / "view" / "date=2026-01-01").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"x": [99]}), tmp_path / sibling / "view" / "date=2026-01-01" / "data.parquet")
    with connect() as con:
        read = lambda path: sorted(v for (v,) in con.execute("SELECT x FROM read_parquet($p)", {"p": path}).fetchall())  # noqa: E731
        assert read(parquet_source(str(folder))) == [1, 2]
        assert read(parquet_source(str(folder / "date=2026-01-01" / "data.parquet"))) == [1, 2]
        try:
            unescaped = read(str(folder))
        except duckdb.IOException:  # "No files found that match the pattern", or "Is a directory"
            unescaped = None
        assert unescaped != [1, 2], "unescaped, DuckDB reads the folder as a pattern (stock Feast does that)"
    assert parquet_source(str(tmp_path / "plain")) == str(tmp_path / "plain"), "plain paths are left alone"


@pytest.mark.parametrize(
    "data_file",
    ["../x.parquet", "/etc/passwd", "x.parquet' ; COPY (SELECT 1) TO '/tmp/derm-pwned.parquet", "sub/x.parquet", ""],
)
def test_a_manifest_whose_data_file_is_not_a_plain_name_is_refused_and_nothing_written(
    tmp_path: Path, redis_server, data_file: str
) -> None:
    from derm.materialization.publish import PublishError, publish_snapshot

    paths = PlatformPaths(tmp_path / "data")
    source = write_precomputed_snapshot(paths, "ctr_pin", START, np.arange(5), _vectors(5, 2), config_hash="b" * 64)
    manifest_path = source / MANIFEST_FILE
    raw = json.loads(manifest_path.read_text())
    raw["data_file"] = data_file
    manifest_path.write_text(json.dumps(raw))
    before = _tree(paths.data_dir)

    with pytest.raises(ManifestError, match="data_file") as refused:
        read_manifest(source)
    assert str(manifest_path) in str(refused.value) and refused.value.key == "data_file"
    with pytest.raises(PublishError, match=f"{manifest_path}.*'data_file'"):
        publish_snapshot(source, paths, repo=FeatureRepo(), now=NOW)
    assert _tree(paths.data_dir) == before, "a refused manifest writes nothing"
    assert not Path("/tmp/derm-pwned.parquet").exists()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("family", "ctr_user'; DROP"),
        ("model_version", "../v1"),
        ("dim", "8"),
        ("dim", True),
        ("row_count", 5.0),
        ("event_timestamp", "2026-01-01T01:00:00"),  # no time zone
        ("aggregation", "mean"),
        ("unexpected", 1),
    ],
)
def test_a_manifest_is_validated_against_its_schema(tmp_path: Path, key: str, value: object) -> None:
    paths = PlatformPaths(tmp_path / "data")
    source = write_precomputed_snapshot(paths, "ctr_pin", START, np.arange(5), _vectors(5, 3), config_hash="c" * 64)
    manifest_path = source / MANIFEST_FILE
    read_manifest(source)  # the one the exporter wrote is valid
    raw = json.loads(manifest_path.read_text())
    raw[key] = value
    manifest_path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=f"{manifest_path}: malformed manifest: key '{key}'"):
        read_manifest(source)
    del raw[key]
    if key != "unexpected":
        manifest_path.write_text(json.dumps(raw))
        with pytest.raises(ManifestError, match=f"key '{key}': Field required"):
            read_manifest(source)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
_KEYS = st.sampled_from(sorted(ManifestSchema.model_fields)) | st.text(min_size=1, max_size=12)
_NAMES = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]) | st.sampled_from("./\\'\";*[]?"), max_size=30
)


def test_fuzzed_manifests_are_read_or_refused_by_name_never_anything_else(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Random edits of a valid manifest (values, deletions, unknown keys, odd data_file names) through read_manifest.

    Every outcome is either a manifest whose data file lies inside the snapshot folder or a ManifestError
    naming the file and a key; the snapshot folder is never written to.
    """
    paths = PlatformPaths(tmp_path_factory.mktemp("fuzz") / "data")
    source = write_precomputed_snapshot(paths, "cvr_user", START, np.arange(4), _vectors(4, 4), config_hash="f" * 64)
    manifest_path = source / MANIFEST_FILE
    valid = json.loads(manifest_path.read_text())
    outcomes = {"read": 0, "refused": 0}

    @settings(max_examples=200, deadline=None, derandomize=True, database=None)
    @given(edits=st.lists(st.tuples(_KEYS, _JSON | st.just(_DELETE)), max_size=3), data_file=st.none() | _NAMES)
    def read_edited(edits: list[tuple[str, object]], data_file: str | None) -> None:
        raw = dict(valid)
        for key, value in edits:
            if value is _DELETE:
                raw.pop(key, None)
            else:
                raw[key] = value
        if data_file is not None:
            raw["data_file"] = data_file
        manifest_path.write_text(json.dumps(raw))
        before = _tree(source)
        try:
            manifest = read_manifest(source)
        except ManifestError as refused:
            outcomes["refused"] += 1
            assert str(refused).startswith(f"{manifest_path}: malformed manifest: key {refused.key!r}")
        else:
            outcomes["read"] += 1
            assert (source / manifest.data_file).resolve().parent == source.resolve()
        assert _tree(source) == before

    read_edited()
    assert outcomes["read"] > 0 and outcomes["refused"] > 0, outcomes
    print(f"manifest fuzz: {sum(outcomes.values())} inputs, {outcomes}")


_DELETE = object()
