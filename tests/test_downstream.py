"""Downstream rankers: Feast training sets vs a pandas oracle, training/evaluation, the saved-ranker contract,
the leakage audit, bootstrap CIs and the DataLoader.

The module runs on its own tiny platform (own data directory, same session Redis) so the
embeddings it publishes never meet the other modules' catalogs.
"""

from __future__ import annotations

import itertools
import os
import zlib
from datetime import date, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from derm.core.naming import EMBEDDING_TTL, FAMILIES, all_counting_features, feature_name, join_key
from derm.core.paths import DATA_DIR_ENV, PlatformPaths
from derm.core.snapshot import read_manifest
from derm.materialization.catalog import OFFLINE_DATA_FILE, Catalog, CatalogState
from derm.materialization.publish import write_offline_partition
from derm.training.upstream.export import write_precomputed_snapshot

START = date(2026, 1, 1)
DAYS = 6
DIM = 8
USERS, PINS = 200, 80
# family -> days with a snapshot; ctr_pin has a gap longer than the TTL, cvr_user's day 2 covers even users only.
SNAPSHOT_DAYS = {"ctr_user": range(DAYS), "ctr_pin": (0, 4), "cvr_user": range(DAYS), "cvr_pin": range(DAYS)}


def _vectors(family: str, day: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(f"{family}/{day}".encode()))
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _publish_offline(paths: PlatformPaths, family: str, day: date, ids: np.ndarray, vectors: np.ndarray) -> None:
    """A snapshot written by the refresh's writer, landed in the offline store by the publisher's own writer."""
    model = family.split("_")[0]
    source = write_precomputed_snapshot(paths, family, day, ids, vectors, config_hash=model * 32)
    write_offline_partition(Catalog(paths.embeddings_offline_dir), read_manifest(source), source)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, redis_server, feast_env):
    """Tiny event log, counting features and four embedding families (v1, promoted), applied to Feast."""
    from derm.core.feast_repo import apply_repo, export_feast_environment
    from derm.events.synthetic import SyntheticConfig, generate_event_log
    from derm.materialization.counting_features import build_counting_features

    paths = PlatformPaths(tmp_path_factory.mktemp("downstream"))
    previous = os.environ.get(DATA_DIR_ENV)
    export_feast_environment(paths, redis_server.connection_string)
    generate_event_log(SyntheticConfig.preset("tiny", start_date=START, n_days=DAYS), paths.events_dir)
    build_counting_features(paths.events_dir, paths.stats_dir)
    for family, days in SNAPSHOT_DAYS.items():
        n = USERS if FAMILIES[family] == "user" else PINS
        for day in days:
            ids = np.arange(n, dtype=np.int64)
            if family == "cvr_user" and day == 2:
                ids = ids[::2]
            _publish_offline(paths, family, START + timedelta(days=day), ids, _vectors(family, day, len(ids)))
    Catalog(paths.embeddings_offline_dir).write_state(CatalogState(promoted=dict.fromkeys(FAMILIES, "v1")))
    apply_repo()
    yield paths
    if previous is not None:
        os.environ[DATA_DIR_ENV] = previous


@pytest.fixture(scope="module")
def ctr_set(platform: PlatformPaths):
    """The CTR training set of the registered ctr_ranker service."""
    from derm.core.feast_repo import feature_store
    from derm.training.downstream.training_sets import (
        build_training_set,
        default_window,
        ranker_service,
        service_families,
    )

    store = feature_store()
    service = ranker_service(store, "ctr")
    window = default_window(platform, service_families(store, service))
    path = platform.data_dir / "training_sets" / "ctr" / "pit.parquet"
    info = build_training_set(store, platform, "ctr", service, window, path)
    return path, info, window


def _oracle(events: pd.DataFrame, source: pd.DataFrame, key: str, columns: list[str], ttl: timedelta) -> pd.DataFrame:
    source = source.assign(event_timestamp=source["event_timestamp"].dt.tz_convert("UTC")).sort_values(
        "event_timestamp"
    )
    left = events[["event_id", "event_timestamp", key]].sort_values("event_timestamp")
    joined = pd.merge_asof(
        left, source[[key, "event_timestamp", *columns]], on="event_timestamp", by=key, tolerance=ttl
    )
    return joined.set_index("event_id").sort_index()


def test_training_set_equals_merge_asof_oracle(platform: PlatformPaths, ctr_set) -> None:
    from derm.core.training_set import read_training_set
    from derm.training.downstream.training_sets import labelled_events

    path, info, window = ctr_set
    table, stored = read_training_set(path)
    assert stored == info and info.feature_service == "ctr_ranker"
    assert info.embedding_versions == dict.fromkeys(["ctr_pin", "ctr_user", "cvr_pin", "cvr_user"], "v1")
    got = table.to_pandas().set_index("event_id").sort_index()
    events = labelled_events(platform.events_dir, "ctr", *window)
    assert len(got) == len(events) and got["label"].to_numpy().sum() == events["label"].sum()

    views = [
        (
            f"stats/{name}/*/*.parquet",
            f"{prefix}_id",
            [c for c in all_counting_features() if c.startswith(prefix)],
            timedelta(days=7),
        )
        for name, prefix in (("user_daily_stats", "user"), ("pin_daily_stats", "pin"))
    ]
    views += [
        (
            f"embeddings/{family}/v1/date=*/{OFFLINE_DATA_FILE}",
            join_key(family),
            [feature_name(family)],
            EMBEDDING_TTL,
        )
        for family in FAMILIES
    ]
    for pattern, key, columns, ttl in views:
        source = duckdb.sql(f"SELECT * FROM read_parquet('{platform.offline_dir / pattern}')").df()
        expected = _oracle(events, source, key, columns, ttl)
        for column in columns:
            exp, found = expected[column], got[column]
            assert (exp.isna() == found.isna()).all(), f"{column}: different missing rows"
            present = exp.notna()
            if column.endswith("_emb"):
                np.testing.assert_array_equal(np.stack(found[present]), np.stack(exp[present]), err_msg=column)
            else:
                np.testing.assert_allclose(found[present].astype(float), exp[present].astype(float), err_msg=column)
    # The fixture's traps were exercised: a TTL gap, and an entity missing from the newest snapshot.
    assert got["ctr_pin_emb"].isna().sum() > 100
    gap = (got.event_timestamp >= pd.Timestamp("2026-01-05 01:00", tz="UTC")) & (
        got.event_timestamp < pd.Timestamp("2026-01-06 01:00", tz="UTC")
    )
    assert got.loc[gap, "ctr_pin_emb"].isna().all() and got.loc[~gap, "ctr_pin_emb"].notna().all()
    odd_day3 = (got.user_id % 2 == 1) & (got.event_timestamp.dt.day == 4) & (got.event_timestamp.dt.hour >= 1)
    day1_vectors = _vectors("cvr_user", 1, USERS)
    np.testing.assert_array_equal(
        np.stack(got.loc[odd_day3, "cvr_user_emb"]), day1_vectors[got.loc[odd_day3, "user_id"].to_numpy()]
    )


def test_gate_refuses_the_registered_ctr_set_for_the_planted_gap_alone(platform: PlatformPaths, ctr_set) -> None:
    """All four families: ctr_pin's one-day gap, longer than its TTL, leaves a third of its warm rows
    without an embedding (more than max_missing_embedding_rate), and that is the one failure; the
    same set without ctr_pin passes."""
    import pyarrow.compute as pc

    from derm.core.training_set import read_training_set
    from derm.training.downstream.training_sets import gate_training_set

    path, info, _ = ctr_set
    table, _ = read_training_set(path)
    report = gate_training_set(table, info, docs_dir=platform.validation_dir, events_dir=platform.events_dir)
    assert [(f.expectation, f.column) for f in report.failures] == [
        ("expect_column_values_to_not_be_null", "ctr_pin_emb")
    ], report.failures
    assert "warm_ctr_pin_emb" in report.failures[0].description and not report.success

    # Positive control: the gap's rows given day 0's vectors (as if the gap were filled) pass the gate.
    column = table.column("ctr_pin_emb")
    filled = pc.if_else(pc.is_null(column), pa.scalar(_vectors("ctr_pin", 0, 1)[0].tolist(), column.type), column)
    table = table.set_column(table.schema.get_field_index("ctr_pin_emb"), "ctr_pin_emb", filled)
    report = gate_training_set(table, info, docs_dir=platform.validation_dir, events_dir=platform.events_dir)
    assert report.success, report.failures


@pytest.fixture(scope="module")
def trained(platform: PlatformPaths, tmp_path_factory: pytest.TempPathFactory):
    from derm.core.feast_repo import feature_store
    from derm.training.downstream.train import DownstreamConfig, run_downstream

    store = feature_store()
    cfg = DownstreamConfig(epochs=2, eval_days=2, batch_size=512, bootstrap=200)
    ctr = run_downstream(platform, "ctr", cfg, store=store, families=["ctr_user", "cvr_user"], run="test-ctr")  # gated
    # The registered cvr_ranker service holds all four families, ctr_pin with its planted gap (which the gate
    # refuses, see above): every other check runs as shipped, ctr_pin_emb may miss up to 40% of warm rows.
    tolerant = tmp_path_factory.mktemp("thresholds") / "gap.yaml"
    tolerant.write_text("training_set:\n  max_missing_rate_by_feature: {ctr_pin_emb: 0.4}\n")
    cvr_cfg = DownstreamConfig(epochs=2, bootstrap=200, gate_thresholds=tolerant)
    cvr = run_downstream(platform, "cvr", cvr_cfg, store=store, run="test-cvr")  # gated
    return ctr, cvr


def test_ctr_and_cvr_rankers_train_evaluate_and_save(platform: PlatformPaths, trained) -> None:
    from sklearn.metrics import roc_auc_score

    from derm.core.training_set import read_training_set
    from derm.training.downstream.ranker import load_ranker

    ctr, cvr = trained
    for result in (ctr, cvr):
        passed, total = result.gate_summary.rsplit(": ", 1)[1].split(" ")[0].split("/")
        assert passed == total and int(total) > 0, result.gate_summary
        assert result.rows_train > 0 and result.rows_eval > 0
        for name, metric in result.metrics.items():
            assert np.isfinite([metric.value, metric.lo, metric.hi]).all(), name
            assert metric.lo <= metric.value <= metric.hi, name
        # The AUC is the eval rows' own (labels read back from the training set by event id), and the
        # ranker beats the baselines: chance (a constant score, AUC 0.5) and the training label rate.
        table, _ = read_training_set(result.training_set)
        labels = table.to_pandas().set_index("event_id").loc[result.eval_event_ids, "label"].to_numpy()
        auc = result.metrics["roc_auc"]
        assert auc.value == pytest.approx(roc_auc_score(labels, result.eval_scores), abs=1e-9), result.objective
        assert result.no_harm, f"{result.objective}: {result.describe()}"
        selection = load_ranker(result.ranker_dir).spec.extra["selection"]
        if result.objective == "cvr" and selection["fallback_to_base_rate"]:
            # With delayed conversions (issue 17) the tiny CVR set (~900 train rows, ~450 validation)
            # may be too small for the out-of-sample "no harm" check to trust the model: it then
            # predicts the base rate, keeping the model's order (ROC-AUC 0.54 [0.497, 0.580] here;
            # without delays the same ranker's CI lies above 0.5). Its log loss must equal the base rate's.
            assert auc.value > 0.5, f"{result.objective}: {result.describe()}"
            assert abs(result.metrics["log_loss_vs_base_rate"].value) < 1e-4, result.describe()
        else:
            assert auc.lo > 0.5, f"{result.objective}: {result.describe()}"
        ranker_dir = platform.models_dir / "downstream" / result.objective / result.run
        assert result.ranker_dir == ranker_dir and (ranker_dir / "model.pt").exists()
    ranker = load_ranker(ctr.ranker_dir)
    assert ranker.embedding_versions == {"ctr_user": "v1", "cvr_user": "v1"}
    assert "ctr_user_emb_v1:ctr_user_emb" in ranker.feature_refs
    assert "user_daily_stats:user_ctr_7d" in ranker.feature_refs
    assert not any(ref.startswith("ctr_pin") for ref in ranker.feature_refs)
    assert load_ranker(cvr.ranker_dir).spec.feature_service == "cvr_ranker"


def test_ranker_scores_online_shaped_dict_like_training_frame(trained) -> None:
    from derm.core.training_set import read_training_set
    from derm.training.downstream.ranker import load_ranker

    ctr, _ = trained
    ranker = load_ranker(ctr.ranker_dir)
    table, _ = read_training_set(ctr.training_set)
    frame = table.to_pandas().set_index("event_id").loc[ctr.eval_event_ids[:300]].reset_index()
    # What get_online_features(...).to_dict() returns (lists, None for missing) plus request context;
    # day of week derived from the timestamp here, as a server may do.
    online = {
        column: [None if v is None or (isinstance(v, float) and np.isnan(v)) else v for v in frame[column]]
        for column in ranker.input_columns
        if column != "day_of_week"
    }
    online["ctr_user_emb"] = [None if v is None else [float(x) for x in v] for v in frame["ctr_user_emb"]]
    online["event_timestamp"] = frame["event_timestamp"].tolist()
    np.testing.assert_allclose(ranker.score(online), ctr.eval_scores[:300], rtol=1e-5, atol=1e-6)
    # (B, D) arrays with NaN rows for missing are accepted too, and mean the same.
    matrix = np.stack([np.full(8, np.nan, np.float32) if v is None else v for v in frame["cvr_user_emb"]])
    np.testing.assert_allclose(ranker.score({**online, "cvr_user_emb": matrix}), ctr.eval_scores[:300], rtol=1e-5)
    missing = {**online, "ctr_user_emb": [None] * 300}
    zeros = {**online, "ctr_user_emb": np.zeros((300, 8), np.float32)}
    # Raw logits: a ranker that fell back to the base rate keeps only a vanishing slope in its scores.
    # A ranker whose validation switched the families off (embedding dropout 1.0) reads the learned cold
    # vector for every row, so there the flag must change nothing.
    families_off = ranker.spec.extra["selection"]["embedding_dropout"] >= 1.0
    same = np.allclose(ranker.logits(missing), ranker.logits(zeros))
    assert same if families_off else not same, "the missing flag must reach the model (unless families are off)"


def test_leakage_audit_passes_point_in_time_and_flags_leaky(platform: PlatformPaths, ctr_set, tmp_path) -> None:
    from click.testing import CliRunner

    from derm.cli.downstream import audit_leakage
    from derm.training.downstream.leakage import audit_training_set, build_leaky_training_set

    path, _, _ = ctr_set
    report = audit_training_set(path, platform)
    assert report.ok, report.describe()
    assert set(report.checked) == {feature_name(f) for f in FAMILIES} | {"label", *CONVERSION_COUNTS}

    leaky = build_leaky_training_set(path, tmp_path / "leaky.parquet", platform)
    report = audit_training_set(leaky, platform)
    assert not report.ok and report.violation_counts["ctr_user_emb"] > 0
    first = report.violations[0]
    assert first.kind == "future" and first.found_snapshot > first.event_timestamp

    runner = CliRunner()
    assert runner.invoke(audit_leakage, [str(path), "--no-gate"]).exit_code == 0
    result = runner.invoke(audit_leakage, [str(leaky), "--show", "3", "--no-gate"])
    assert result.exit_code == 1 and "row 0 " in result.output and "future" in result.output
    # With the gate (the default), the planted one-day gap of ctr_pin refuses the point-in-time-correct set.
    result = runner.invoke(audit_leakage, [str(path)])
    assert result.exit_code == 1 and "PASS: every embedding, label and conversion count" in result.output, result.output
    assert "gate: REFUSED" in result.output and "[ctr_pin_emb]" in result.output and "Data Docs: " in result.output
    assert runner.invoke(audit_leakage, [str(path), "--thresholds", str(_relaxed(tmp_path))]).exit_code == 0

    # One tampered row is named precisely: the vector of a snapshot published after the event.
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    column = table.column("cvr_pin_emb").to_pylist()
    row = len(column) // 2
    pin = table.column("pin_id")[row].as_py()
    column[row] = _vectors("cvr_pin", DAYS - 1, PINS)[pin].tolist()
    tampered = tmp_path / "tampered.parquet"
    index = table.schema.get_field_index("cvr_pin_emb")
    pq.write_table(table.set_column(index, "cvr_pin_emb", pa.array(column, table.schema.field(index).type)), tampered)
    report = audit_training_set(tampered, platform)
    embeddings = {f: n for f, n in report.violation_counts.items() if f.endswith("_emb")}
    assert embeddings == {"ctr_user_emb": 0, "ctr_pin_emb": 0, "cvr_user_emb": 0, "cvr_pin_emb": 1}
    assert report.violations[0].row == row and report.violations[0].kind == "future"


CONVERSION_COUNTS = ("user_conversions_1d", "pin_conversions_1d")


def test_leakage_audit_checks_labels_and_conversion_counts(platform: PlatformPaths, trained, tmp_path) -> None:
    """The CVR set's labels and conversion counts are those known at their time; a set that takes
    conversions as known at the click (labels after the cut-off, counts on the click's day) is refused."""
    from derm.core.training_set import read_training_set
    from derm.training.downstream.leakage import audit_training_set, build_label_leaky_training_set

    path = trained[1].training_set
    table, info = read_training_set(path)
    report = audit_training_set(path, platform)
    assert report.ok, report.describe()
    assert {"label", *CONVERSION_COUNTS} <= set(report.checked)
    stamps = table.column("label_timestamp").to_pylist()
    assert all(s is None or s < datetime.fromisoformat(info.window_end) for s in stamps)

    leaky = build_label_leaky_training_set(path, tmp_path / "label-leaky.parquet", platform)
    # The tiny log's conversions come hours to days after their clicks: some are known only after the
    # set's cut-off, so the honest set has fewer positives than the log has conversions.
    assert sum(read_training_set(leaky)[0].column("label").to_pylist()) > sum(table.column("label").to_pylist())
    report = audit_training_set(leaky, platform)
    assert not report.ok
    assert report.violation_counts["label"] > 0 and report.violation_counts["user_conversions_1d"] > 0
    kinds = {(v.column, v.kind) for v in report.timing_violations}
    assert ("label", "future") in kinds and ("user_conversions_1d", "future") in kinds, report.describe()


def _relaxed(tmp_path: Path) -> Path:
    """The shipped thresholds with missing embeddings tolerated: what an operator passes with --thresholds."""
    import yaml

    from derm.validation.thresholds import DEFAULT_THRESHOLDS_PATH

    thresholds = yaml.safe_load(DEFAULT_THRESHOLDS_PATH.read_text())
    thresholds["training_set"]["max_missing_embedding_rate"] = 0.5
    path = tmp_path / "relaxed.yaml"
    path.write_text(yaml.safe_dump(thresholds))
    return path


def test_bootstrap_ci_math_on_known_cases() -> None:
    from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

    from derm.training.downstream.train import bootstrap_metrics, weighted_metrics

    rng = np.random.default_rng(0)
    n = 4000
    labels = (rng.random(n) < 0.3).astype(float)
    scores = np.round(np.clip(0.3 + 0.2 * (labels - 0.3) + rng.normal(0, 0.2, n), 0.01, 0.99), 2)  # many ties
    point = {k: v[0] for k, v in weighted_metrics(labels, scores, np.ones((1, n))).items()}
    assert point["roc_auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert point["pr_auc"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert point["log_loss"] == pytest.approx(log_loss(labels, scores), abs=1e-12)

    # Log loss is a mean of per-row losses: its bootstrap CI is the normal one, mean +- 1.96 sd / sqrt(n).
    estimates, deltas = bootstrap_metrics(labels, {"a": scores, "b": scores}, resamples=2000, seed=1, baseline="a")
    rows = -(labels * np.log(scores) + (1 - labels) * np.log(1 - scores))
    half = 1.96 * rows.std() / np.sqrt(n)
    ll = estimates["a"]["log_loss"]
    assert ll.lo == pytest.approx(rows.mean() - half, abs=0.1 * half)
    assert ll.hi == pytest.approx(rows.mean() + half, abs=0.1 * half)
    # Paired: a model compared with itself differs by exactly 0 on every resample.
    assert (deltas["b"]["roc_auc"].lo, deltas["b"]["roc_auc"].hi) == (0.0, 0.0)
    # Perfect separation stays perfect on every resample.
    perfect, _ = bootstrap_metrics(labels, {"m": labels * 0.5 + 0.25}, resamples=200)
    assert (perfect["m"]["roc_auc"].lo, perfect["m"]["roc_auc"].hi) == (1.0, 1.0)


def test_sigmoid_keeps_the_hand_written_bits_and_never_warns_on_extreme_logits() -> None:
    import warnings

    from derm.training.downstream.ranker import sigmoid

    rng = np.random.default_rng(0)
    for dtype, finite in ((np.float64, 700.0), (np.float32, 80.0)):
        x = np.clip(rng.normal(0, 30, 10_000), -finite, finite).astype(dtype)
        expected = 1.0 / (1.0 + np.exp(-x))  # where exp(-x) is finite: the same bits as before
        assert sigmoid(x).dtype == dtype
        assert np.array_equal(sigmoid(x), expected)
        extreme = np.array([-1e4, -1e3, 1e3, 1e4], dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the hand-written form warned "overflow encountered in exp"
            p = sigmoid(extreme)
        assert np.all(p[:2] >= 0) and np.all(p[:2] < 1e-37) and np.all(p[2:] == 1.0)


def test_dataloader_yields_the_same_tensors_as_in_memory(ctr_set) -> None:
    import torch

    from derm.core.training_set import read_training_set
    from derm.training.downstream.dataset import RankerDataset
    from derm.training.downstream.ranker import FeatureTransform, RankerSpec

    path, info, _ = ctr_set
    table, _ = read_training_set(path)
    spec = RankerSpec("ctr", info.feature_service, info.feature_refs, info.embedding_versions, info.embedding_dims)
    spec = spec.with_counting_stats({name: table.column(name) for name in table.column_names})
    data = RankerDataset(table, FeatureTransform(spec))
    direct = FeatureTransform(spec)(table.to_pandas(), label="label")  # the same transform from pandas columns
    for key in direct:
        torch.testing.assert_close(data.tensors[key], direct[key])

    batches = list(data.loader(batch_size=700, shuffle=False))
    assert [len(b["label"]) for b in batches[:-1]] == [700] * (len(batches) - 1)
    for key, tensor in data.tensors.items():
        torch.testing.assert_close(torch.cat([b[key] for b in batches]), tensor)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(3))
    shuffled = list(data.loader(batch_size=700, shuffle=True, seed=3))
    for key, tensor in data.tensors.items():
        torch.testing.assert_close(torch.cat([b[key] for b in shuffled]), tensor[order])


def test_dataloader_benchmark_smoke() -> None:
    from bench.dataloader import run

    result = run(rows=3000, repeats=1, batch_size=512)
    assert result["rows"] == 3000
    assert result["loader_samples_per_s"] > 0 and result["in_memory_samples_per_s"] > 0 and result["ratio"] > 0


def test_saved_rankers_appear_whole_and_the_newest_is_served(tmp_path: Path) -> None:
    import json

    from derm.training.downstream.ranker import (
        SPEC_FILE,
        Ranker,
        RankerSpec,
        latest_ranker_dirs,
        load_ranker,
        load_rankers,
        ranker_dir,
    )

    def spec(objective: str, run: str) -> RankerSpec:
        return RankerSpec(objective, f"{objective}_ranker", [], {}, {}, extra={"run": run})

    with pytest.raises(ValueError, match="no saved ranker"):
        load_rankers(tmp_path)
    first = Ranker(spec("ctr", "first")).save(ranker_dir(tmp_path, "ctr", "first"))
    second = Ranker(spec("ctr", "second")).save(ranker_dir(tmp_path, "ctr", "second"))
    Ranker(spec("ctr", "again")).save(first)  # replacing a run leaves one complete folder
    assert load_ranker(first).spec.extra == {"run": "again"}
    assert sorted(p.name for p in first.parent.iterdir()) == ["first", "second"]

    # A save killed before its rename leaves a hidden staging folder: never a candidate.
    staging = first.parent / ".third.staging-1"
    staging.mkdir()
    (staging / SPEC_FILE).write_text(json.dumps({"objective": "ctr"}))
    assert latest_ranker_dirs(tmp_path) == {"ctr": first}
    assert set(load_rankers(tmp_path)) == {"ctr"}
    with pytest.raises(ValueError, match="two ctr rankers"):
        load_rankers(tmp_path, [first, second])
    legacy = json.loads((second / SPEC_FILE).read_text())
    legacy["task"] = legacy.pop("objective")  # a 0.1 spec
    (second / SPEC_FILE).write_text(json.dumps(legacy))
    assert load_ranker(second).spec.objective == "ctr"


def test_embedding_ablation_selects_nested_rankers_on_validation_and_audits_its_rows(platform: PlatformPaths) -> None:
    """The real ablation pipeline (Feast training sets per variant, training, nested selection, report) on the
    CVR ranker: every step keeps the ranker with the lower validation log loss, a kept smaller ranker's scores
    stand for the variant (lift exactly 0), and the compared rows pass the leakage audit, labels included."""
    from derm.core.feast_repo import FeatureRepo
    from derm.experiments.ablation import AblationConfig, embedding_ablation
    from derm.experiments.reports import comparison_markdown, comparison_record
    from derm.training.downstream.train import DownstreamConfig

    train = DownstreamConfig(
        epochs=1, bootstrap=50, batch_size=512, weight_decay=(1e-4,), embedding_dropout=(0.0, 1.0), gate=False
    )
    variants = (("none", ()), ("cvr_user", ("cvr_user",)), ("cvr_user + cvr_pin", ("cvr_user", "cvr_pin")))
    cfg = AblationConfig(objectives=("cvr",), variants=variants, train=train, run_prefix="nested")
    (comparison,) = embedding_ablation(platform, FeatureRepo(), cfg)

    results = dict(zip(comparison.labels, comparison.results, strict=True))
    for (previous, _), (label, _) in itertools.pairwise(variants):
        decision, before = results[label].nested_selection, results[previous]
        assert decision["compared_with"] == previous and decision["validation_rows"] > 0
        assert np.array_equal(results[label].validation_event_ids, before.validation_event_ids)
        assert decision["kept_own"] == (decision["validation_log_loss"] < decision["previous_validation_log_loss"])
        assert decision["previous_validation_log_loss"] == before.validation_log_loss
        if decision["kept_own"]:
            assert str(results[label].ranker_dir) == decision["own_ranker_dir"]
            assert results[label].validation_log_loss == decision["validation_log_loss"]
        else:
            np.testing.assert_array_equal(results[label].eval_scores, before.eval_scores)
            assert results[label].ranker_dir == before.ranker_dir != Path(decision["own_ranker_dir"])
            assert comparison.deltas[label]["roc_auc"].value == comparison.deltas[previous]["roc_auc"].value
            assert f"`{label}`: validation kept the `{previous}` ranker" in " ".join(comparison.notes)
    assert comparison.audit_ok is True, comparison.audit
    assert "label: ok" in comparison.audit and "user_conversions_1d: ok" in comparison.audit
    assert "cvr_pin_emb: ok" in comparison.audit  # the largest variant's training set
    markdown = comparison_markdown(comparison)
    assert "Leakage audit" in markdown and "PASS: every embedding, label and conversion count" in markdown
    assert comparison_record(comparison)["audit"]["ok"] is True
