"""Issue 17, the parts that keep the event-log contract: a downstream that does no harm, rankers closer
to the paper's, embeddings kept as the paper keeps them, and the daily upstream quality check.

Everything runs on real parts at tiny sizes: DuckDB over a real day-partitioned log, the real refresh
writing real snapshots, real torch training.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from derm.core.naming import all_counting_features
from derm.core.paths import PlatformPaths
from derm.core.training_set import TrainingSetInfo, write_training_set
from derm.events.schema import EVENT_LOG_SCHEMA
from derm.training.downstream.ranker import (
    SEQUENCE_COLUMN,
    Ranker,
    RankerModel,
    RankerModelConfig,
    RankerSpec,
    load_ranker,
)

START = date(2026, 2, 2)
DIM = 8
SMALL = RankerModelConfig(mlp_hidden=(32,), cross_rank=8, projection_dim=8)  # test-sized; the same code paths


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _frame(n: int, rng: np.random.Generator, start: datetime, days: int, signal: float = 0.0) -> dict:
    """A training-set shaped frame: ids, context, counting features (some null), one embedding family.

    ``signal`` > 0 plants the label in the embedding's first dimension; 0 makes labels pure noise.
    """
    users = rng.integers(0, 300, n)
    emb = rng.normal(size=(n, DIM)).astype(np.float32)
    missing = rng.random(n) < 0.3
    logit = -1.4 + signal * emb[:, 0] * ~missing
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    offsets = np.sort(rng.integers(0, days * 86_400_000_000, n))
    stamps = pa.array(int(start.timestamp() * 1e6) + offsets, pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    frame = {
        "event_id": pa.array(np.arange(n, dtype=np.int64)),
        "event_timestamp": stamps,
        "user_id": pa.array(users),
        "pin_id": pa.array(rng.integers(0, 100, n)),
        "advertiser_id": pa.array(rng.integers(0, 10, n)),
        "category_id": pa.array(rng.integers(0, 5, n)),
        "surface": pa.array(rng.choice(["home_feed", "search", "related_pins"], n)),
        "day_of_week": pa.array(rng.integers(0, 7, n)),
        "label": pa.array(labels),
        "ctr_user_emb": pa.array([None if m else row.tolist() for m, row in zip(missing, emb, strict=True)]),
    }
    for i, name in enumerate(all_counting_features()):
        frame[name] = pa.array([None if (j + i) % 7 == 0 else float(v) for j, v in enumerate(rng.poisson(3, n))])
    return frame


def _spec(**model: object) -> RankerSpec:
    return RankerSpec(
        objective="ctr",
        feature_service="ctr_ranker[test]",
        feature_refs=["ctr_user_emb_v1:ctr_user_emb"],
        embedding_versions={"ctr_user": "v1"},
        embedding_dims={"ctr_user": DIM},
        model=RankerModelConfig(**model),
    )


def _training_set(tmp_path: Path, signal: float, n: int = 3_000, seed: int = 0) -> Path:
    start = datetime(2026, 2, 2, tzinfo=UTC)
    frame = _frame(n, np.random.default_rng(seed), start, days=6, signal=signal)
    info = TrainingSetInfo(
        objective="ctr",
        feature_service="ctr_ranker[test]",
        feature_refs=["ctr_user_emb_v1:ctr_user_emb"],
        embedding_versions={"ctr_user": "v1"},
        embedding_dims={"ctr_user": DIM},
        window_start=start.isoformat(),
        window_end=(start + timedelta(days=6)).isoformat(),
        rows=n,
    )
    return write_training_set(pa.table(frame), info, tmp_path / f"set-{signal}.parquet")


# --------------------------------------------------------------------------- a downstream that does no harm


def test_cold_start_rows_get_the_learned_vector_never_zeros(tmp_path: Path) -> None:
    from derm.training.downstream.train import DownstreamConfig, train_on_training_set

    cfg = DownstreamConfig(
        epochs=2, bootstrap=50, weight_decay=(1e-4,), embedding_dropout=(0.3,), batch_size=512, model=SMALL
    )
    ranker, _ = train_on_training_set(_training_set(tmp_path, signal=2.0), cfg)
    frame = _frame(64, np.random.default_rng(5), datetime(2026, 2, 8, tzinfo=UTC), days=1)
    batch = ranker.transform(frame)
    missing = batch["emb_missing"][:, 0].bool()
    assert missing.any() and (~missing).any()
    ranker.model.eval()
    with torch.no_grad():
        emb, flags = ranker.model.embedding_input(batch)
    cold = ranker.model.cold_start.detach()
    assert cold.abs().sum() > 0, "the cold-start vector must not be zeros"
    torch.testing.assert_close(emb[missing], cold.expand(int(missing.sum()), -1))
    assert (emb[missing].abs().sum(dim=1) > 0).all(), "a cold-start row got zeros"
    torch.testing.assert_close(emb[~missing], batch["emb"][~missing])
    assert torch.equal(flags, batch["emb_missing"]), "the missing indicator reaches the model"
    assert not torch.allclose(cold, RankerModel(ranker.spec).cold_start), "the cold-start vector is learned"


def test_embedding_dropout_one_switches_the_families_off() -> None:
    """Dropout 1.0 (a grid point validation may choose): the embeddings never reach the model, in serving too."""
    frame = _frame(64, np.random.default_rng(3), datetime(2026, 2, 8, tzinfo=UTC), days=1)
    other = dict(frame)
    other["ctr_user_emb"] = pa.array([[9.0] * DIM for _ in range(64)])
    scores = {}
    for dropout in (1.0, 0.3):
        spec = _spec(embedding_dropout=dropout, mlp_hidden=(32,), cross_rank=8, projection_dim=8)
        torch.manual_seed(0)
        ranker = Ranker(spec.with_counting_stats(frame))
        ranker.model.eval()
        scores[dropout] = (ranker.score(frame), ranker.score(other))
    np.testing.assert_array_equal(*scores[1.0])
    assert not np.array_equal(*scores[0.3]), "below 1.0 the embeddings are used at inference"


def test_log_loss_never_worse_than_the_base_rate(tmp_path: Path) -> None:
    """Noise labels: the ranker may learn nothing, but must not do worse than predicting the label rate."""
    from derm.training.downstream.train import DownstreamConfig, train_on_training_set

    cfg = DownstreamConfig(epochs=2, bootstrap=100, batch_size=512, model=SMALL)
    ranker, noise = train_on_training_set(_training_set(tmp_path, signal=0.0), cfg)
    assert noise.rows_validation > 0 and noise.rows_train > 0 and noise.rows_eval > 0
    assert noise.metrics["log_loss"].value <= noise.metrics["base_rate_log_loss"].value + 1e-6
    selection = ranker.spec.extra["selection"]
    assert len(selection["grid"]) == 6  # 2 weight decays x 3 embedding dropouts (1.0 = off), chosen on validation
    assert selection["fallback_to_base_rate"] and not selection["beats_a_constant_on_validation"]
    assert noise.metrics["log_loss_vs_base_rate"].value == pytest.approx(0.0, abs=1e-6)
    learnable = replace(
        cfg, epochs=3, batch_size=256, learning_rate=1e-2, weight_decay=(1e-4,), embedding_dropout=(0.0,)
    )
    _, signal = train_on_training_set(_training_set(tmp_path, signal=3.0), learnable)
    assert signal.no_harm and signal.metrics["log_loss_vs_base_rate"].hi < 0
    assert signal.metrics["roc_auc"].value > 0.6


def test_platt_calibration_recovers_a_known_scale() -> None:
    from derm.training.downstream.train import fit_calibration

    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1.5, 20_000)
    labels = (rng.random(20_000) < 1 / (1 + np.exp(-(0.5 * logits - 1.0)))).astype(float)
    a, b = fit_calibration(logits, labels)
    assert a == pytest.approx(0.5, abs=0.08) and b == pytest.approx(-1.0, abs=0.08)


# --------------------------------------------------------------------------- rankers closer to the paper's


def _write_log(events_dir: Path, rows: list[tuple]) -> None:
    """rows: (event_id, timestamp, user_id, pin_id, clicked); one file per day."""
    by_day: dict[date, list[tuple]] = {}
    for row in rows:
        by_day.setdefault(row[1].date(), []).append(row)
    for day, part in by_day.items():
        folder = events_dir / f"date={day.isoformat()}"
        folder.mkdir(parents=True)
        table = pa.table(
            {
                "event_id": [r[0] for r in part],
                "event_timestamp": pa.array([r[1] for r in part], pa.timestamp("us", tz="UTC")),
                "user_id": [r[2] for r in part],
                "pin_id": [r[3] for r in part],
                "advertiser_id": [0] * len(part),
                "category_id": [0] * len(part),
                "surface": ["home_feed"] * len(part),
                "clicked": [r[4] for r in part],
                "converted": [False] * len(part),
            },
            schema=EVENT_LOG_SCHEMA,
        )
        pq.write_table(table, folder / "part-0.parquet")


def test_user_sequence_is_point_in_time(tmp_path: Path) -> None:
    from derm.training.downstream.dataset import with_user_sequences

    t = datetime(2026, 2, 3, 12, 0, tzinfo=UTC)
    _write_log(
        tmp_path,
        [
            (1, t - timedelta(days=40), 7, 99, True),  # older than the look-back
            (2, t - timedelta(days=1), 7, 10, True),
            (3, t - timedelta(hours=2), 7, 11, True),
            (4, t - timedelta(hours=2), 7, 12, True),  # same time: event_id breaks the tie
            (5, t - timedelta(hours=1), 7, 13, False),  # seen, not engaged
            (6, t - timedelta(microseconds=1), 8, 14, True),  # another user
            (7, t, 7, 15, True),  # the impression itself: its click is the label
            (8, t + timedelta(microseconds=1), 7, 16, True),  # after the impression
            (9, t + timedelta(days=1), 7, 17, True),
        ],
    )
    rows = pa.table(
        {
            "event_id": [7, 100, 101],
            "user_id": [7, 8, 9],
            "event_timestamp": pa.array([t, t, t], pa.timestamp("us", tz="UTC")),
        }
    )
    out = with_user_sequences(rows, tmp_path, length=5)
    assert out.column(SEQUENCE_COLUMN).to_pylist() == [[12, 11, 10], [14], []]
    assert with_user_sequences(rows, tmp_path, length=2).column(SEQUENCE_COLUMN).to_pylist()[0] == [12, 11]


def test_sequence_encoder_and_experts_shapes_and_serving_contract(tmp_path: Path) -> None:
    frame = _frame(32, np.random.default_rng(2), datetime(2026, 2, 2, tzinfo=UTC), days=1)
    spec = _spec(sequence_length=4, experts=3, expert_hidden=16).with_counting_stats(frame)
    ranker = Ranker(spec, RankerModel(spec))
    with pytest.raises(ValueError, match=SEQUENCE_COLUMN):
        ranker.score(frame)
    sequences = [[] if i % 3 == 0 else list(range(i, i + 1 + i % 6)) for i in range(32)]
    batch = ranker.transform({**frame, SEQUENCE_COLUMN: sequences})
    assert batch["seq"].shape == (32, 4) and bool((batch["seq"][0] == -1).all())
    assert ranker.model(batch).shape == (32,)
    assert ranker.model.moe(torch.zeros(5, ranker.model.head.in_features - 16)).shape == (5, 1, 16)
    ranker.spec = RankerSpec.from_json(spec.to_json())
    ranker.spec = type(spec)(**{**vars(ranker.spec), "calibration": [0.5, -0.2]})
    saved = load_ranker(ranker.save(tmp_path / "ranker"))
    assert saved.spec.model.sequence_length == 4 and saved.spec.calibration == [0.5, -0.2]
    np.testing.assert_allclose(
        saved.score({**frame, SEQUENCE_COLUMN: sequences}), ranker.score({**frame, SEQUENCE_COLUMN: sequences})
    )


def test_embedding_dot_products_give_each_user_pin_pair_its_score(tmp_path: Path) -> None:
    """With ``embedding_dot_products``, each upstream model read as a (user, Pin) pair adds one input, its
    user x Pin dot product (cold vectors for missing rows); a family without its partner adds none."""
    rng = np.random.default_rng(4)
    frame = _frame(48, rng, datetime(2026, 2, 2, tzinfo=UTC), days=1)
    for family in ("ctr_pin", "cvr_user"):
        frame[f"{family}_emb"] = pa.array(rng.normal(size=(48, DIM)).astype(np.float32).tolist())
    families = ("ctr_user", "ctr_pin", "cvr_user")
    spec = RankerSpec(
        objective="ctr",
        feature_service="ctr_ranker[test]",
        feature_refs=[f"{f}_emb_v1:{f}_emb" for f in families],
        embedding_versions=dict.fromkeys(families, "v1"),
        embedding_dims=dict.fromkeys(families, DIM),
        model=replace(SMALL, embedding_dot_products=True),
    ).with_counting_stats(frame)
    torch.manual_seed(0)
    with_dots = RankerModel(spec)
    torch.manual_seed(0)
    without = RankerModel(replace(spec, model=replace(SMALL, embedding_dot_products=False)))
    assert with_dots.dot_pairs == [(slice(0, DIM), slice(DIM, 2 * DIM))]  # ctr only: cvr_pin is not read
    assert with_dots.head.in_features == without.head.in_features + 1  # x0 is one wider (the cross keeps its width)

    # The input is u.p of the rows' vectors: capture x0 (the cross network's input) and compare.
    batch = Ranker(spec, with_dots).transform(frame)
    seen = {}
    hook = with_dots.cross.register_forward_pre_hook(lambda _m, args: seen.update(x0=args[0]))
    with_dots.eval()
    with torch.no_grad():
        with_dots(batch)
        emb, _ = with_dots.embedding_input(batch)
    hook.remove()
    expected = (emb[:, :DIM] * emb[:, DIM : 2 * DIM]).sum(dim=1)
    torch.testing.assert_close(seen["x0"][:, -1], expected)

    saved = load_ranker(Ranker(spec, with_dots).save(tmp_path / "ranker"))
    assert saved.spec.model.embedding_dot_products
    np.testing.assert_allclose(saved.score(frame), Ranker(spec, with_dots).score(frame))
    # A ranker saved before the option existed has no such key: it was trained without the input, and loads so.
    legacy = json.loads(replace(spec, model=replace(SMALL, embedding_dot_products=False)).to_json())
    del legacy["model"]["embedding_dot_products"]
    assert not RankerSpec.from_json(json.dumps(legacy)).model.embedding_dot_products
    # Two spaces get no dot product: another width, or another version of the upstream model.
    uneven = replace(spec, embedding_dims={**spec.embedding_dims, "ctr_pin": DIM + 1})
    assert RankerModel(uneven).dot_pairs == []
    other_version = replace(spec, embedding_versions={**spec.embedding_versions, "ctr_pin": "v2"})
    assert RankerModel(other_version).dot_pairs == []
    other_hash = replace(spec, embedding_config_hashes={"ctr_user": "a" * 64, "ctr_pin": "b" * 64})
    assert RankerModel(other_hash).dot_pairs == []


# --------------------------------------------------------------------------- embeddings as the paper keeps them


def test_aggregate_carries_idle_entities_forward_and_renormalises() -> None:
    from derm.training.upstream.export import aggregate

    rng = np.random.default_rng(3)
    daily, previous = rng.normal(size=(4, DIM)), rng.normal(size=(4, DIM))
    previous /= np.linalg.norm(previous, axis=1, keepdims=True)
    has_previous = np.array([True, True, False, True])
    active = np.array([True, False, False, True])
    out = aggregate(daily, previous, has_previous, "ema", 0.8, active=active, renormalize=True)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out[1], previous[1], rtol=1e-6)  # idle: carried forward
    smoothed = 0.8 * previous[0] + 0.2 * daily[0]
    np.testing.assert_allclose(out[0], smoothed / np.linalg.norm(smoothed), rtol=1e-5)
    np.testing.assert_allclose(out[2], daily[2] / np.linalg.norm(daily[2]), rtol=1e-5)  # new entity


@pytest.fixture(scope="module")
def refreshed(tmp_path_factory: pytest.TempPathFactory):
    from derm.events.synthetic import SyntheticConfig, generate_event_log
    from derm.training.upstream.config import UpstreamConfig
    from derm.training.upstream.refresh import refresh

    paths = PlatformPaths(tmp_path_factory.mktemp("paper"))
    generate_event_log(SyntheticConfig.preset("tiny", start_date=START, n_days=3, events_per_day=600), paths.events_dir)
    manifests = refresh(paths, ("ctr",), UpstreamConfig())
    return paths, manifests["ctr"]


def _vectors(paths: PlatformPaths, manifest) -> dict[int, np.ndarray]:
    from derm.core.snapshot import snapshot_dir

    folder = snapshot_dir(paths.snapshots_dir, manifest.family, manifest.model_version, manifest.snapshot_date)
    table = pq.read_table(folder / "embeddings.parquet")
    ids = table.column(manifest.join_key).to_pylist()
    return dict(zip(ids, np.asarray(table.column("embedding").to_pylist(), dtype=np.float32), strict=True))


def test_refresh_carries_idle_entities_forward(refreshed) -> None:
    from derm.training.upstream.refresh import active_entities

    paths, manifests = refreshed
    users = {m.snapshot_date: m for m in manifests if m.family == "ctr_user"}
    day1, day2 = START + timedelta(days=1), START + timedelta(days=2)
    before, after = _vectors(paths, users[day1]), _vectors(paths, users[day2])
    active = set(active_entities(paths.events_dir, "user", day2).tolist())
    idle = [u for u in before if u not in active]
    busy = [u for u in before if u in active]
    assert idle and busy
    for user in idle:
        np.testing.assert_array_equal(after[user], before[user])
    assert all(not np.allclose(after[u], before[u]) for u in busy)
    norms = np.linalg.norm(np.stack(list(after.values())), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)  # what the inner-product Pin index assumes


def test_every_manifest_records_next_day_quality(refreshed) -> None:
    paths, manifests = refreshed
    last = START + timedelta(days=2)
    for manifest in manifests:
        quality = manifest.quality
        assert quality is not None
        if manifest.snapshot_date == last:
            assert quality["evaluated_on"] is None  # no next day in the log yet
            continue
        assert quality["evaluated_on"] == (manifest.snapshot_date + timedelta(days=1)).isoformat()
        assert quality["rows"] > 0 and 0.0 <= quality["roc_auc"] <= 1.0
        assert 0.0 <= quality["recall_at_k"] <= 1.0 and 0.0 <= quality["recall_at_k_popularity"] <= 1.0
        assert isinstance(quality["no_better_than_popularity"], bool)
        if manifest.snapshot_date > START:
            assert quality["roc_auc_previous"] is not None
    from derm.core.snapshot import read_manifest, snapshot_dir

    m = manifests[0]
    on_disk = read_manifest(snapshot_dir(paths.snapshots_dir, m.family, m.model_version, m.snapshot_date))
    assert on_disk.quality == m.quality


def test_upstream_quality_flags_embeddings_no_better_than_popularity(refreshed) -> None:
    """Embeddings that score a Pin by its popularity alone are flagged; ones that know more are not."""
    import duckdb

    from derm.core.snapshot import snapshot_dir
    from derm.training.upstream.refresh import roc_auc, upstream_quality

    paths, manifests = refreshed
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    version = manifests[0].model_version

    def clicks_on(day: date) -> dict[int, int]:
        files = [str(f) for f in (paths.events_dir / f"date={day}").glob("*.parquet")]
        query = "SELECT pin_id, count(*) FILTER (WHERE clicked) FROM read_parquet($files) GROUP BY pin_id"
        return dict(duckdb.execute(query, {"files": files}).fetchall())

    popularity, tomorrow = clicks_on(START), clicks_on(START + timedelta(days=1))
    files = {
        f: snapshot_dir(paths.snapshots_dir, f, version, START) / "embeddings.parquet" for f in ("ctr_user", "ctr_pin")
    }
    kept = {f: path.read_bytes() for f, path in files.items()}

    def quality_of(pin_score) -> dict:
        """Every user (1, 0, ...) and every Pin (pin_score(pin), 0, ...): the dot product is pin_score."""
        for family, path in files.items():
            table = pq.read_table(path)
            vectors = np.zeros((table.num_rows, 64), np.float32)
            ids = table.column(table.column_names[0]).to_pylist()
            vectors[:, 0] = 1.0 if family == "ctr_user" else [pin_score(pin) for pin in ids]
            pq.write_table(table.set_column(2, "embedding", pa.array(list(vectors), pa.list_(pa.float32()))), path)
        try:
            return upstream_quality(paths, "ctr", version, START, k=5)
        finally:
            for family, path in files.items():
                path.write_bytes(kept[family])

    popular = quality_of(lambda pin: float(popularity.get(pin, 0)))
    assert popular["roc_auc"] == pytest.approx(popular["roc_auc_popularity"])
    assert popular["recall_at_k"] == pytest.approx(popular["recall_at_k_popularity"])
    assert popular["no_better_than_popularity"] is True
    knowing = quality_of(lambda pin: float(popularity.get(pin, 0)) + 1_000.0 * (tomorrow.get(pin, 0) > 0))
    assert knowing["roc_auc"] > knowing["roc_auc_popularity"]
    assert knowing["no_better_than_popularity"] is False
    assert upstream_quality(paths, "ctr", version, START, k=5)["roc_auc"] == manifests[0].quality["roc_auc"]


def test_aggregation_sweep_reuses_the_days_weights(refreshed) -> None:
    """Overwrite differs from the moving average only after training: its version copies the checkpoints."""
    from derm.core.snapshot import file_sha256
    from derm.training.upstream.config import RefreshConfig, UpstreamConfig
    from derm.training.upstream.refresh import refresh
    from derm.training.upstream.train import checkpoint_path

    paths, manifests = refreshed
    overwrite = refresh(paths, ("ctr",), UpstreamConfig(refresh=RefreshConfig(aggregation="overwrite")))["ctr"]
    ema_version, new_version = manifests[0].model_version, overwrite[0].model_version
    assert new_version != ema_version
    for day in (START, START + timedelta(days=2)):
        shared = checkpoint_path(paths.models_dir, "ctr", new_version, day)
        assert file_sha256(shared) == file_sha256(checkpoint_path(paths.models_dir, "ctr", ema_version, day))
        # one copy on disk: a hard link of the other version's file
        assert shared.stat().st_ino == checkpoint_path(paths.models_dir, "ctr", ema_version, day).stat().st_ino
    last = next(m for m in overwrite if m.snapshot_date == START + timedelta(days=2) and m.family == "ctr_user")
    ema_last = next(m for m in manifests if m.snapshot_date == last.snapshot_date and m.family == "ctr_user")
    assert last.data_sha256 != ema_last.data_sha256  # same weights, other aggregation
