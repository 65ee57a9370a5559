"""Planted upstream versions (the ablation's positive control) against an independent replay of the generator.

The oracle below recomputes every family's vectors day by day from the generator's worlds and the event log
(plain numpy and pandas, not the export's ``aggregate``), in the generator's own coordinates. The planted
snapshots are in a rotated space, so they are compared through what rotation keeps: every user x Pin and
user x user dot product, and the set of ids. Logs of other shapes than the presets are drawn by hypothesis:
empty days, bursty users, no daily taste, other seeds, both aggregations and both idle-entity policies.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from derm.core.days import day_end
from derm.core.paths import PlatformPaths
from derm.core.snapshot import DATA_FILE, snapshot_dir
from derm.events.schema import event_files, log_days
from derm.events.synthetic import SyntheticConfig, daily_worlds, generate_event_log
from derm.experiments.planted import PlantedLogMismatch, PlantedUpstream, plant_upstream, planted_config
from derm.training.upstream.config import DermConfig, RefreshConfig, UpstreamConfig

START = date(2026, 3, 1)
SMALL = dict(n_users=40, n_pins=15, n_advertisers=3, n_categories=3, n_days=4, events_per_day=150)


def _taste(world: object, objective: str, entity: str, ids: np.ndarray) -> np.ndarray:
    """The generator's own factors of the family, unrotated, unit norm: ``(n, F)``."""
    factor = getattr(world, f"{entity}_factor")[ids]
    if objective == "ctr":
        taste = np.concatenate([factor, getattr(world, f"{entity}_interest")[ids]], axis=1)
    else:
        taste = np.concatenate([factor[:, : factor.shape[1] // 2], getattr(world, f"{entity}_cvr_factor")[ids]], axis=1)
    return taste / np.linalg.norm(taste, axis=1, keepdims=True)


def _oracle(events: pd.DataFrame, cfg: SyntheticConfig, refresh: RefreshConfig, objective: str, entity: str):
    """``{day: {id: vector}}`` of one family, replayed from the generator's worlds and the log."""
    worlds = {cfg.days[i]: world for i, world, _, _ in daily_worlds(cfg)}
    key = f"{entity}_id"
    days = log_days_of(events)
    state: dict[int, np.ndarray] = {}
    out = {}
    for offset in range((days[-1] - days[0]).days + 1):
        day = days[0] + timedelta(days=offset)
        seen = events[events.event_timestamp < day_end(day)]
        window = sorted(
            set(seen[seen.event_timestamp >= day_end(day) - timedelta(days=refresh.active_window_days)][key])
        )
        active = set(events[events.day == day][key])
        daily = dict(
            zip(window, _taste(worlds[day], objective, entity, np.asarray(window, dtype=np.int64)), strict=True)
        )
        for entity_id in window:
            if entity_id in state and refresh.idle_entities == "carry_forward" and entity_id not in active:
                continue  # idle: yesterday's vector, unchanged
            if entity_id in state and refresh.aggregation == "ema":
                mixed = refresh.ema_weight * state[entity_id] + (1 - refresh.ema_weight) * daily[entity_id]
                state[entity_id] = mixed / np.linalg.norm(mixed)
            else:
                state[entity_id] = daily[entity_id]
        out[day] = {entity_id: state[entity_id] for entity_id in window}
    return out


def log_days_of(events: pd.DataFrame) -> list[date]:
    return sorted(set(events.day))


def _snapshot(paths: PlatformPaths, family: str, version: str, day: date) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(snapshot_dir(paths.snapshots_dir, family, version, day) / DATA_FILE)
    return table.column(0).to_numpy(), np.stack(table.column("embedding").to_numpy(zero_copy_only=False))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 10_000),
    empty_day_share=st.sampled_from([0.0, 0.4]),
    daily_taste_noise=st.sampled_from([0.0, 0.9]),
    user_burst_days=st.sampled_from([None, 2]),
    aggregation=st.sampled_from([("ema", 0.8), ("ema", 0.2), ("overwrite", 0.8)]),
    idle_entities=st.sampled_from(["carry_forward", "reembed"]),
)
def test_planted_snapshots_are_the_generators_tastes(
    tmp_path_factory: pytest.TempPathFactory,
    seed: int,
    empty_day_share: float,
    daily_taste_noise: float,
    user_burst_days: int | None,
    aggregation: tuple[str, float],
    idle_entities: str,
) -> None:
    paths = PlatformPaths(tmp_path_factory.mktemp("planted"))
    cfg = SyntheticConfig(
        **SMALL,
        start_date=START,
        seed=seed,
        empty_day_share=empty_day_share,
        daily_taste_noise=daily_taste_noise,
        user_burst_days=user_burst_days,
    )
    if not generate_event_log(cfg, paths.events_dir):
        return  # every day empty: no log to plant on
    refresh = RefreshConfig(aggregation=aggregation[0], ema_weight=aggregation[1], idle_entities=idle_entities)
    manifests = plant_upstream(paths, PlantedUpstream(cfg, UpstreamConfig(refresh=refresh)))

    events = pq.read_table([str(p) for p in event_files(paths.events_dir)]).to_pandas()
    events["day"] = events.event_timestamp.dt.date
    days = log_days(paths.events_dir)
    calendar = [days[0] + timedelta(days=i) for i in range((days[-1] - days[0]).days + 1)]
    for objective, written in manifests.items():
        assert sorted({m.snapshot_date for m in written}) == calendar  # empty days included, as the refresh does
        assert all(m.quality is not None for m in written)
        version = written[0].model_version
        users = _oracle(events, cfg, refresh, objective, "user")
        pins = _oracle(events, cfg, refresh, objective, "pin")
        for day in calendar:
            user_ids, user_vectors = _snapshot(paths, f"{objective}_user", version, day)
            pin_ids, pin_vectors = _snapshot(paths, f"{objective}_pin", version, day)
            assert user_ids.tolist() == sorted(users[day]) and pin_ids.tolist() == sorted(pins[day])
            expected_users = np.stack([users[day][i] for i in user_ids])
            expected_pins = np.stack([pins[day][i] for i in pin_ids])
            np.testing.assert_allclose(user_vectors @ pin_vectors.T, expected_users @ expected_pins.T, atol=2e-5)
            np.testing.assert_allclose(user_vectors @ user_vectors.T, expected_users @ expected_users.T, atol=2e-5)


def test_planted_version_refuses_another_log_and_round_trips(tmp_path: Path) -> None:
    paths = PlatformPaths(tmp_path)
    cfg = SyntheticConfig(**SMALL, start_date=START)
    generate_event_log(cfg, paths.events_dir)
    other = dataclasses.replace(cfg, seed=cfg.seed + 1)
    with pytest.raises(PlantedLogMismatch, match=r"date=2026-03-01/part-0\.parquet: not what `derm generate` writes"):
        plant_upstream(paths, PlantedUpstream(other))
    assert not paths.snapshots_dir.exists() or not any(paths.snapshots_dir.iterdir())  # nothing half-written
    too_narrow = PlantedUpstream(cfg, UpstreamConfig(model=DermConfig(dim=8)))  # CTR tastes have 16 dimensions
    with pytest.raises(ValueError, match="planted ctr tastes have 16 dimensions; the upstream dim 8 is smaller"):
        plant_upstream(paths, too_narrow)
    assert not paths.snapshots_dir.exists() or not any(paths.snapshots_dir.iterdir())
    assert not paths.models_dir.exists() or not any(paths.models_dir.rglob("config.json"))

    planted = PlantedUpstream(cfg)
    manifests = plant_upstream(paths, planted)
    version = manifests["ctr"][0].model_version
    # What the ablation's aggregation sweep reads back: the same generator and refresh, hence the same version.
    assert planted_config(paths, "ctr", version) == planted
    # Promoted, it is what the ablation's sweep varies: its points are planted, never trained.
    from derm.experiments.ablation import promoted_planted_config, promoted_upstream_config
    from derm.materialization.catalog import Catalog, CatalogState

    assert promoted_planted_config(paths) is None  # nothing promoted yet
    paths.embeddings_offline_dir.mkdir(parents=True, exist_ok=True)
    Catalog(paths.embeddings_offline_dir).write_state(CatalogState(promoted={"ctr_user": version}))
    assert promoted_planted_config(paths) == planted and promoted_upstream_config(paths) is None
    overwrite = planted.with_aggregation("overwrite", 0.8)
    assert overwrite.config_hash("ctr") != planted.config_hash("ctr")
    assert plant_upstream(paths, overwrite, check_log=False)["ctr"][0].model_version != version
    # Next-day quality: the planted pair ranks the next day's clicks well above chance.
    scored = [m.quality["roc_auc"] for m in manifests["ctr"] if m.quality.get("roc_auc") is not None]
    assert scored and min(scored) > 0.6


def test_plant_upstream_command_and_its_settings_in_upstream_quality(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from derm.cli.main import cli
    from derm.core.paths import DATA_DIR_ENV

    def derm(*args: str):
        return CliRunner().invoke(cli, list(args), env={DATA_DIR_ENV: str(tmp_path)})

    generate_event_log(SyntheticConfig.preset("tiny", start_date=START), PlatformPaths(tmp_path).events_dir)
    refused = derm("plant-upstream", "--preset", "tiny", "--start-date", "2026-03-02")
    assert refused.exit_code == 1
    assert "date=2026-03-01/part-0.parquet: not what `derm generate` writes" in refused.output
    planted = derm("plant-upstream", "--preset", "tiny", "--start-date", "2026-03-01", "--dim", "32")
    assert planted.exit_code == 0, planted.output
    assert "ctr v1 (planted): 6 day(s)" in planted.output and "cvr v1 (planted): 6 day(s)" in planted.output
    table = derm("upstream-quality", "--objective", "ctr", "--json")
    assert table.exit_code == 0, table.output
    (row,) = json.loads(table.output)["rows"]
    # Diffed from the generator's defaults: the tiny preset's sizes show, the default seed does not.
    assert row["settings"]["planted"] is True and row["settings"]["planted.n_users"] == 200
    assert "planted.seed" not in row["settings"] and row["settings"]["model.dim"] == 32
