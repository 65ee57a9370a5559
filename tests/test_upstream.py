"""DERM upstream: loss math, determinism, point-in-time snapshots, EMA, versions, resumability, learning."""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from derm.core.paths import PlatformPaths
from derm.core.snapshot import DATA_FILE, SnapshotManifest, file_sha256, list_snapshots, read_manifest, snapshot_dir
from derm.events.synthetic import SyntheticConfig, generate_event_log
from derm.training.upstream.config import RefreshConfig, TrainConfig, UpstreamConfig
from derm.training.upstream.export import aggregate, aggregate_batches, embed_batches, write_snapshot
from derm.training.upstream.features import FeatureConfig, entity_feature_batches, training_arrays
from derm.training.upstream.losses import derm_loss, impression_loss, sampled_softmax_loss
from derm.training.upstream.model import DermConfig, DermModel
from derm.training.upstream.refresh import RefreshGapError, refresh, refresh_day
from derm.training.upstream.train import checkpoint_path, load_checkpoint, score_day

torch.set_num_threads(1)

SMALL_MODEL = DermConfig(
    dim=8,
    token_dim=8,
    mlp_hidden=16,
    user_id_buckets=512,
    pin_id_buckets=128,
    category_buckets=16,
    advertiser_buckets=16,
    interaction_hidden=(16,),
)
SMALL = UpstreamConfig(
    model=SMALL_MODEL,
    features=FeatureConfig(count_window_days=7, seq_len=5),
    train=TrainConfig(epochs=1, batch_size=256),
    # Several batches per family exercise the merge; re-embedding idle entities without re-normalising
    # keeps the moving average checkable as written (carry-forward and unit norm: tests/test_paper.py).
    refresh=RefreshConfig(inference_batch_size=64, idle_entities="reembed", renormalize=False),
)
TINY = SyntheticConfig.preset("tiny", n_users=120, n_pins=50, n_days=4, events_per_day=800)


def _events(root: Path, cfg: SyntheticConfig = TINY) -> PlatformPaths:
    paths = PlatformPaths(root)
    generate_event_log(cfg, paths.events_dir)
    return paths


def _read(directory: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(directory / DATA_FILE)
    ids = table.column(key).to_numpy()
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    return ids, emb


def _manifest(family: str, dim: int) -> SnapshotManifest:
    end_of_day = datetime(2026, 1, 2, tzinfo=UTC)
    return SnapshotManifest(
        family=family,
        model_version="v1",
        config_hash="",
        weights_sha256="",
        dim=dim,
        snapshot_date=TINY.days[0],
        event_timestamp=end_of_day,
        data_window_start=end_of_day - timedelta(days=1),
        data_window_end=end_of_day - timedelta(seconds=1),
        row_count=0,
        aggregation="ema",
        ema_weight=0.8,
        created_at=end_of_day,
    )


@pytest.fixture(scope="module")
def refreshed(tmp_path_factory: pytest.TempPathFactory) -> PlatformPaths:
    """Three days of DERM-CTR and DERM-CVR refreshed with the small config."""
    paths = _events(tmp_path_factory.mktemp("upstream"))
    refresh(paths, ("ctr", "cvr"), SMALL, through_date=TINY.days[2])
    return paths


# --------------------------------------------------------------------------- loss


def test_sampled_softmax_equals_hand_computation() -> None:
    user = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
    pin = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]
    logq = [math.log(0.5), math.log(0.3), math.log(0.2)]
    tau = 0.5
    expected = 0.0
    for i in range(3):
        logits = [sum(a * b for a, b in zip(user[i], pin[j], strict=True)) / tau - logq[j] for j in range(3)]
        expected += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
    expected /= 3
    got = sampled_softmax_loss(torch.tensor(user), torch.tensor(pin), torch.tensor(logq), tau)
    assert got.item() == pytest.approx(expected, rel=1e-6)

    # A duplicate of the positive Pin is not a negative: its term leaves the denominator.
    ids = torch.tensor([7, 7, 9])
    with_dup = sampled_softmax_loss(torch.tensor(user), torch.tensor(pin), torch.tensor(logq), tau, ids)
    expected_dup = 0.0
    for i in range(3):
        logits = [sum(a * b for a, b in zip(user[i], pin[j], strict=True)) / tau - logq[j] for j in range(3)]
        keep = [j for j in range(3) if j == i or ids[j] != ids[i]]
        expected_dup += -(logits[i] - math.log(sum(math.exp(logits[j]) for j in keep)))
    assert with_dup.item() == pytest.approx(expected_dup / 3, rel=1e-6)


def test_derm_loss_adds_weighted_contrastive_on_positives_only() -> None:
    torch.manual_seed(0)
    logit = torch.randn(6)
    label = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    user = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    pin = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    logq = torch.log(torch.tensor([0.2, 0.0, 0.3, 0.5, 0.0, 0.0]).clamp_min(1e-9))
    out = derm_loss(logit, label, user, pin, logq, temperature=0.2, contrastive_weight=0.5)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logit, label)
    positive = label > 0
    contrastive = sampled_softmax_loss(user[positive], pin[positive], logq[positive], 0.2)
    assert out.total.item() == pytest.approx((bce + 0.5 * contrastive).item(), rel=1e-6)
    one_positive = derm_loss(logit, torch.tensor([1.0, 0, 0, 0, 0, 0]), user, pin, logq)
    assert one_positive.contrastive.item() == 0.0


def test_impression_loss_makes_non_clicked_impressions_negatives() -> None:
    """Logistic loss of u.p / tau plus the batch's label log-odds, on every row; its gradient pulls a clicked
    pair's dot product up and pushes a non-clicked one's down, which the softmax (positives only) never does."""
    torch.manual_seed(0)
    user = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1).requires_grad_()
    pin = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    label = torch.tensor([1.0, 0.0, 0.0, 0.0])
    tau = 0.5
    got = impression_loss(user, pin, label, tau)
    offset = math.log(0.25 / 0.75)
    expected = 0.0
    for i in range(4):
        z = sum(float(a) * float(b) for a, b in zip(user[i].detach(), pin[i], strict=True)) / tau + offset
        p = 1 / (1 + math.exp(-z))
        expected -= math.log(p) if label[i] else math.log(1 - p)
    assert got.item() == pytest.approx(expected / 4, rel=1e-6)

    got.backward()
    toward_pin = (user.grad * pin).sum(dim=1)  # d loss / d step along the row's own Pin vector
    assert toward_pin[0] < 0 and (toward_pin[1:] > 0).all()

    logit = torch.zeros(4)
    off = derm_loss(logit, label, user.detach(), pin, torch.zeros(4))
    on = derm_loss(logit, label, user.detach(), pin, torch.zeros(4), temperature=tau, impression_weight=2.0)
    assert off.impression.item() == 0.0
    assert on.total.item() == pytest.approx(off.total.item() + 2.0 * expected / 4, rel=1e-6)


def test_training_settings_added_later_keep_the_hashes_of_earlier_versions() -> None:
    """``impression_weight`` and ``first_day_epochs`` at their "as before" values are left out of the version
    payload: the default config hashes as it did before they existed (the constant below was computed then),
    so a data directory's versions keep their names; set, they are part of the version."""
    assert UpstreamConfig().config_hash("ctr") == "36e0b5c3a9f114bb3efa8de92975c1fefdc33c044f431eef5b7092137e06642e"
    assert "impression_weight" not in UpstreamConfig().version_payload("ctr")["train"]
    for train in (TrainConfig(impression_weight=1.0), TrainConfig(first_day_epochs=8), TrainConfig(epochs=4)):
        cfg = UpstreamConfig(train=train)
        assert cfg.config_hash("ctr") != UpstreamConfig().config_hash("ctr")
        stored = json.loads(json.dumps(cfg.version_payload("ctr")))
        assert UpstreamConfig.from_version_payload(stored) == cfg
    with pytest.raises(ValueError, match="impression_weight"):
        TrainConfig(impression_weight=-1.0)
    with pytest.raises(ValueError, match="first_day_epochs"):
        TrainConfig(first_day_epochs=0)


def test_first_day_epochs_train_only_the_cold_start_day_longer(tmp_path: Path) -> None:
    """``first_day_epochs=3, epochs=1`` trains the chain's first day as ``epochs=3`` does (same weights, bit for
    bit) and the second day with one pass (other weights than three passes on top of the same first day)."""
    paths = _events(tmp_path / "data")
    warm_up = dataclasses.replace(SMALL, train=dataclasses.replace(SMALL.train, epochs=1, first_day_epochs=3))
    three = dataclasses.replace(SMALL, train=dataclasses.replace(SMALL.train, epochs=3))
    versions = {}
    for name, cfg in (("warm_up", warm_up), ("three", three)):
        versions[name] = refresh(paths, ("ctr",), cfg, max_days=2)["ctr"][0].model_version
    first, second = TINY.days[0], TINY.days[1]

    def weights(name: str, day) -> dict[str, torch.Tensor]:
        path = checkpoint_path(paths.models_dir, "ctr", versions[name], day)
        return torch.load(path, map_location="cpu", weights_only=True)["model"]

    for key, value in weights("warm_up", first).items():
        torch.testing.assert_close(value, weights("three", first)[key], rtol=0, atol=0)
    assert any(not torch.equal(v, weights("three", second)[k]) for k, v in weights("warm_up", second).items())


def test_entity_outputs_are_unit_norm_and_context_free() -> None:
    torch.manual_seed(0)
    for modules in (("mlp", "attention"), ("masknet", "attention", "mlp")):
        model = DermModel(dataclasses.replace(SMALL_MODEL, dhen_modules=modules))
        batch = {
            "user_id": torch.tensor([1, 2]),
            "user_counts": torch.rand(2, 3),
            "user_seq": torch.tensor([[3, 4, -1], [-1, -1, -1]]),
            "pin_id": torch.tensor([5, 6]),
            "category_id": torch.tensor([0, 1]),
            "advertiser_id": torch.tensor([2, 3]),
            "pin_counts": torch.rand(2, 3),
            "surface": torch.tensor([0, 1]),
            "day_of_week": torch.tensor([2, 3]),
        }
        logit, user, pin = model(batch)
        assert logit.shape == (2,) and user.shape == pin.shape == (2, SMALL_MODEL.dim)
        assert torch.allclose(user.norm(dim=-1), torch.ones(2)) and torch.allclose(pin.norm(dim=-1), torch.ones(2))
        other_context = {**batch, "surface": torch.tensor([2, 2]), "day_of_week": torch.tensor([6, 0])}
        assert torch.equal(model.embed("user", other_context), user)  # context never enters the towers
    with pytest.raises(ValueError, match="dhen_modules"):
        DermConfig(dhen_modules=("mlp",))


# --------------------------------------------------------------------------- features


def test_training_features_use_only_earlier_days(refreshed: PlatformPaths) -> None:
    first = training_arrays(refreshed.events_dir, TINY.days[0], "ctr", SMALL.features)
    assert np.all(first["user_counts"] == 0) and np.all(first["pin_counts"] == 0)
    assert np.all(first["user_seq"] == -1)
    day = TINY.days[2]
    arrays = training_arrays(refreshed.events_dir, day, "ctr", SMALL.features)
    glob = str(refreshed.events_dir / "*" / "*.parquet")
    expected = dict(
        duckdb.sql(
            f"SELECT user_id, ln(1 + count(*)) FROM read_parquet('{glob}') "
            f"WHERE event_timestamp < TIMESTAMPTZ '{day} 00:00:00+00' GROUP BY user_id"
        ).fetchall()
    )
    got = arrays["user_counts"][:, 0]
    want = np.array([expected.get(u, 0.0) for u in arrays["user_id"]], dtype=np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert set(np.unique(arrays["label"])) <= {0.0, 1.0}
    cvr = training_arrays(refreshed.events_dir, day, "cvr", SMALL.features)
    assert 0 < len(cvr["label"]) < len(arrays["label"])  # clicks only


# --------------------------------------------------------------------------- snapshots


def test_snapshot_available_after_newest_event_used(refreshed: PlatformPaths) -> None:
    # Version 1 only: other tests of the module add versions to the shared refresh, in any order.
    snapshots = [p for p in list_snapshots(refreshed.snapshots_dir) if p.parts[-2] == "v1"]
    assert {p.parts[-3] for p in snapshots} == {"ctr_user", "ctr_pin", "cvr_user", "cvr_pin"}
    assert len(snapshots) == 4 * 3
    glob = str(refreshed.events_dir / "*" / "*.parquet")
    for directory in snapshots:
        manifest = read_manifest(directory)
        end_of_day = (
            SMALL.refresh.publish_delay
            + manifest.data_window_end.replace(hour=0, minute=0, second=0, microsecond=0)
            + timedelta(days=1)
        )
        newest = duckdb.sql(
            f"SELECT max(event_timestamp) FROM read_parquet('{glob}') "
            f"WHERE event_timestamp < TIMESTAMPTZ '{manifest.snapshot_date + timedelta(days=1)} 00:00:00+00'"
        ).fetchall()[0][0]
        assert manifest.data_window_end == newest
        assert manifest.event_timestamp == end_of_day >= newest
        table = pq.read_table(directory / DATA_FILE)
        assert table.num_rows == manifest.row_count > 0
        assert set(table.column("event_timestamp").to_pylist()) == {manifest.event_timestamp}
        assert set(table.column("model_version").to_pylist()) == {manifest.model_version}
        assert {len(v) for v in table.column("embedding").to_pylist()} == {manifest.dim}
        ids = table.column(manifest.join_key).to_numpy()
        assert np.all(np.diff(ids) > 0)  # one row per entity
        assert manifest.data_sha256 == file_sha256(directory / DATA_FILE)


def test_ema_math_and_overwrite() -> None:
    daily = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=np.float32)
    previous = np.array([[0.0, 1.0], [9.0, 9.0], [1.0, 1.0]], dtype=np.float32)
    has_previous = np.array([True, False, True])
    got = aggregate(daily, previous, has_previous, "ema", 0.8)
    np.testing.assert_allclose(got, [[0.2, 0.8], [0.0, 1.0], [1.2, 1.2]], rtol=1e-6)
    np.testing.assert_array_equal(aggregate(daily, previous, has_previous, "overwrite", 0.8), daily)
    np.testing.assert_array_equal(aggregate(daily, None, None, "ema", 0.8), daily)


def test_ema_merge_against_previous_snapshot(tmp_path: Path) -> None:
    """The streaming merge finds yesterday's rows across batch boundaries; new ids start from daily."""
    rng = np.random.default_rng(0)
    manifest = _manifest("ctr_user", dim=3)
    old_ids = np.arange(0, 100, 2)
    old = rng.normal(size=(len(old_ids), 3)).astype(np.float32)
    write_snapshot(tmp_path / "old", [(old_ids[:7], old[:7]), (old_ids[7:], old[7:])], manifest, row_group_rows=5)
    new_ids = np.arange(1, 120, 3)
    daily = rng.normal(size=(len(new_ids), 3)).astype(np.float32)
    batches = [(new_ids[i : i + 4], daily[i : i + 4]) for i in range(0, len(new_ids), 4)]
    out = list(aggregate_batches(batches, tmp_path / "old" / DATA_FILE, "user_id", 3, "ema", 0.8))
    got = np.concatenate([e for _, e in out])
    lookup = dict(zip(old_ids.tolist(), old, strict=True))
    want = np.stack([0.8 * lookup[i] + 0.2 * d if i in lookup else d for i, d in zip(new_ids, daily, strict=True)])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(ValueError, match="ascending"):
        list(aggregate_batches([(np.array([3, 1]), daily[:2])], None, "user_id", 3, "ema", 0.8))


def test_refresh_snapshot_is_ema_of_daily_embeddings(refreshed: PlatformPaths) -> None:
    day, previous_day = TINY.days[2], TINY.days[1]
    manifest = read_manifest(snapshot_dir(refreshed.snapshots_dir, "ctr_pin", "v1", day))
    model, _ = load_checkpoint(checkpoint_path(refreshed.models_dir, "ctr", "v1", day), SMALL)
    features = entity_feature_batches(refreshed.events_dir, "pin", day, SMALL.features)
    daily_ids, daily = zip(*embed_batches(model, "pin", features), strict=True)
    daily_ids, daily = np.concatenate(daily_ids), np.concatenate(daily)
    ids, emb = _read(snapshot_dir(refreshed.snapshots_dir, "ctr_pin", "v1", day), "pin_id")
    prev_ids, prev = _read(snapshot_dir(refreshed.snapshots_dir, "ctr_pin", "v1", previous_day), "pin_id")
    np.testing.assert_array_equal(ids, daily_ids)
    previous = dict(zip(prev_ids.tolist(), prev, strict=True))
    want = np.stack([0.8 * previous[i] + 0.2 * d if i in previous else d for i, d in zip(ids, daily, strict=True)])
    np.testing.assert_allclose(emb, want, rtol=1e-5, atol=1e-6)
    assert manifest.weights_sha256 == file_sha256(checkpoint_path(refreshed.models_dir, "ctr", "v1", day))


# --------------------------------------------------------------------------- versions, resume, determinism


def test_rerun_is_noop_and_gap_is_an_error(refreshed: PlatformPaths) -> None:
    directory = snapshot_dir(refreshed.snapshots_dir, "ctr_user", "v1", TINY.days[1])
    before = (directory / "manifest.json").read_text(), (directory / DATA_FILE).stat().st_mtime_ns
    manifests = refresh_day("ctr", TINY.days[1], refreshed, SMALL)
    assert [m.family for m in manifests] == ["ctr_user", "ctr_pin"]
    assert ((directory / "manifest.json").read_text(), (directory / DATA_FILE).stat().st_mtime_ns) == before
    # Another version has only its first day: asking for its third day names the missing one.
    overwrite = dataclasses.replace(SMALL, refresh=dataclasses.replace(SMALL.refresh, aggregation="overwrite"))
    refresh_day("cvr", TINY.days[0], refreshed, overwrite)
    with pytest.raises(RefreshGapError, match=rf"cvr v2: no snapshot for {TINY.days[1]}; run the refresh"):
        refresh_day("cvr", TINY.days[2], refreshed, overwrite)
    with pytest.raises(ValueError, match="outside the event log"):
        refresh_day("ctr", TINY.days[-1] + timedelta(days=1), refreshed, SMALL)


def test_new_config_gets_new_version(refreshed: PlatformPaths) -> None:
    wider = dataclasses.replace(SMALL, model=dataclasses.replace(SMALL_MODEL, dim=12))
    manifests = refresh_day("ctr", TINY.days[0], refreshed, wider)
    assert {m.model_version for m in manifests} == {"v2"} and {m.dim for m in manifests} == {12}
    assert read_manifest(snapshot_dir(refreshed.snapshots_dir, "ctr_user", "v1", TINY.days[0])).dim == 8
    # Publish delay and batch size do not change embeddings, so they keep the version.
    same = dataclasses.replace(SMALL, refresh=dataclasses.replace(SMALL.refresh, inference_batch_size=7))
    assert same.config_hash("ctr") == SMALL.config_hash("ctr") != wider.config_hash("ctr")
    assert SMALL.config_hash("ctr") != SMALL.config_hash("cvr")
    ctr = read_manifest(snapshot_dir(refreshed.snapshots_dir, "ctr_user", "v1", TINY.days[0]))
    assert ctr.config_hash == SMALL.config_hash("ctr")


def test_seeded_runs_are_deterministic(tmp_path: Path) -> None:
    results = []
    for name in ("a", "b"):
        paths = _events(tmp_path / name)
        out = refresh(paths, ("ctr",), SMALL, max_days=2)
        last = out["ctr"][-2:]
        results.append(
            (
                [m.weights_sha256 for m in last],
                [m.data_sha256 for m in last],
                _read(snapshot_dir(paths.snapshots_dir, "ctr_user", "v1", TINY.days[1]), "user_id")[1],
            )
        )
    assert results[0][0] == results[1][0]
    assert results[0][1] == results[1][1]
    np.testing.assert_array_equal(results[0][2], results[1][2])


def test_interrupted_export_leaves_no_half_snapshot(tmp_path: Path) -> None:
    manifest = _manifest("cvr_pin", dim=2)

    def batches():
        yield np.array([1, 2]), np.ones((2, 2), np.float32)
        raise KeyboardInterrupt

    target = tmp_path / "cvr_pin" / "v1" / "date=2026-01-01"
    with pytest.raises(KeyboardInterrupt):
        write_snapshot(target, batches(), manifest)
    assert not target.exists() and list(target.parent.iterdir()) == []


# --------------------------------------------------------------------------- learning


def test_ctr_model_beats_popularity_on_held_out_day(tmp_path: Path) -> None:
    """Planted user-Pin affinity: the model must rank better than the Pin's past click rate."""
    from sklearn.metrics import roc_auc_score

    synthetic = SyntheticConfig.preset("tiny", n_days=6, events_per_day=4_000)
    paths = _events(tmp_path, synthetic)
    cfg = dataclasses.replace(
        SMALL,
        model=dataclasses.replace(SMALL_MODEL, dim=16, token_dim=16, mlp_hidden=32, interaction_hidden=(32,)),
        features=FeatureConfig(),
        train=TrainConfig(epochs=3, batch_size=256, learning_rate=5e-3),
        refresh=RefreshConfig(),
    )
    train_days, held_out = synthetic.days[:-1], synthetic.days[-1]
    refresh(paths, ("ctr",), cfg, through_date=train_days[-1])
    model, _ = load_checkpoint(checkpoint_path(paths.models_dir, "ctr", "v1", train_days[-1]), cfg)
    labels, logits = score_day(model, paths.events_dir, held_out, "ctr", cfg.features)
    arrays = training_arrays(paths.events_dir, held_out, "ctr", cfg.features)
    glob = str(paths.events_dir / "*" / "*.parquet")
    pin_ctr = dict(
        duckdb.sql(
            f"SELECT pin_id, (count(*) FILTER (WHERE clicked) + 1.0) / (count(*) + 10.0) FROM read_parquet('{glob}') "
            f"WHERE event_timestamp < TIMESTAMPTZ '{held_out} 00:00:00+00' GROUP BY pin_id"
        ).fetchall()
    )
    popularity = np.array([pin_ctr.get(p, 0.0) for p in arrays["pin_id"]])
    model_auc, popularity_auc = roc_auc_score(labels, logits), roc_auc_score(labels, popularity)
    print(f"held-out AUC: DERM-CTR {model_auc:.4f} vs popularity {popularity_auc:.4f}")
    assert model_auc > popularity_auc + 0.03


# --------------------------------------------------------------------------- CLI and benchmark


def test_train_upstream_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from derm.cli.upstream import train_upstream
    from derm.core.paths import DATA_DIR_ENV

    paths = _events(tmp_path, dataclasses.replace(TINY, n_days=2))
    monkeypatch.setenv(DATA_DIR_ENV, str(paths.data_dir))
    args = ["--objective", "cvr", "--dim", "8", "--days", "1", "--aggregation", "overwrite", "--threads", "1"]
    result = CliRunner().invoke(train_upstream, args)
    assert result.exit_code == 0, result.output
    assert [p.parts[-3] for p in list_snapshots(paths.snapshots_dir)] == ["cvr_pin", "cvr_user"]
    again = CliRunner().invoke(train_upstream, args)  # resumable: nothing left to do
    assert again.exit_code == 0, again.output


def test_export_benchmark_smoke() -> None:
    from bench.export_throughput import run

    result = run(entities=2_000, repeats=1, dim=16, batch_rows=512)
    assert result["entities"] == 2_000
    assert result["user_embeddings_per_s"] > 0 and result["pin_embeddings_per_s"] > 0


def test_day_without_events_keeps_weights_and_still_exports(tmp_path: Path) -> None:
    """A calendar day missing from the log is refreshed (no training), so later days have no gap."""
    import shutil

    paths = _events(tmp_path, dataclasses.replace(TINY, n_days=3))
    shutil.rmtree(paths.events_dir / f"date={TINY.days[1]}")
    out = refresh(paths, ("ctr",), SMALL)
    assert [m.snapshot_date for m in out["ctr"]] == [d for d in TINY.days[:3] for _ in range(2)]
    quiet = out["ctr"][2]
    assert quiet.row_count > 0 and quiet.data_window_end < datetime(2026, 1, 2, tzinfo=UTC)
    first, second = (torch.load(checkpoint_path(paths.models_dir, "ctr", "v1", d)) for d in TINY.days[:2])
    assert all(torch.equal(first["model"][k], second["model"][k]) for k in first["model"])


def test_concurrent_registrations_get_distinct_versions(tmp_path: Path) -> None:
    """Refreshes of different configs started at once must not both become v<N+1>."""
    from concurrent.futures import ThreadPoolExecutor

    from derm.core.model_versions import ModelVersions

    def resolve_version(directory: Path, objective: str, config_hash: str) -> str:
        return ModelVersions(directory).resolve(objective, config_hash)

    hashes = [f"{i:064x}" for i in range(12)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        versions = list(pool.map(lambda h: resolve_version(tmp_path, "ctr", h), hashes))
    assert sorted(versions, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(1, 13)]
    assert [resolve_version(tmp_path, "ctr", h) for h in hashes] == versions, "a given version never changes"


def test_the_aggregation_sweep_varies_only_the_aggregation_of_the_promoted_upstream(tmp_path: Path) -> None:
    """A version's ``config.json`` gives its config back (same hash), and the sweep's points are the promoted
    DERM-CTR version's config with another aggregation, not the defaults: a 2-epoch upstream sweeps 2-epoch
    versions (which re-use its daily weights) instead of training 1-epoch ones."""
    from derm.experiments.ablation import aggregation_config, promoted_upstream_config
    from derm.materialization.catalog import Catalog, CatalogState
    from derm.training.upstream.train import version_dir

    promoted = UpstreamConfig(
        model=dataclasses.replace(DermConfig(), dhen_modules=("mlp", "masknet"), interaction_hidden=(32,)),
        train=TrainConfig(epochs=2, learning_rate=0.01),
        refresh=RefreshConfig(aggregation="overwrite", idle_entities="reembed"),
    )
    for objective in ("ctr", "cvr"):
        stored = json.loads(json.dumps(promoted.version_payload(objective)))  # tuples come back as lists
        assert UpstreamConfig.from_version_payload(stored).config_hash(objective) == promoted.config_hash(objective)

    paths = PlatformPaths(tmp_path / "data")
    assert promoted_upstream_config(paths) is None  # nothing promoted: the sweep keeps the defaults
    folder = version_dir(paths.models_dir, "ctr", "v3")
    folder.mkdir(parents=True)
    payload = {"model_version": "v3", "config_hash": promoted.config_hash("ctr"), **promoted.version_payload("ctr")}
    (folder / "config.json").write_text(json.dumps(payload))
    paths.embeddings_offline_dir.mkdir(parents=True, exist_ok=True)
    Catalog(paths.embeddings_offline_dir).write_state(CatalogState(promoted={"ctr_user": "v3"}))

    base = promoted_upstream_config(paths)
    assert base is not None and base.config_hash("ctr") == promoted.config_hash("ctr")
    point = aggregation_config(0.5, base)
    assert (point.model, point.features, point.train) == (promoted.model, promoted.features, promoted.train)
    assert (point.refresh.aggregation, point.refresh.ema_weight, point.refresh.idle_entities) == ("ema", 0.5, "reembed")
    assert aggregation_config(None, base).refresh.aggregation == "overwrite"
    assert aggregation_config(0.5).train == TrainConfig()  # without a base: the defaults, as before
