"""Replay window of the upstream refresh: a sparse day also trains on a bounded window of the days before it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from derm.core.paths import PlatformPaths
from derm.events.synthetic import SyntheticConfig, generate_event_log
from derm.training.upstream.config import RefreshConfig, TrainConfig, UpstreamConfig
from derm.training.upstream.features import FeatureConfig, training_arrays
from derm.training.upstream.model import DermConfig
from derm.training.upstream.refresh import refresh
from derm.training.upstream.train import checkpoint_path, replay_arrays

FEATURES = FeatureConfig(count_window_days=7, seq_len=5)
LOG = SyntheticConfig.preset("tiny", n_users=60, n_pins=30, n_days=5, events_per_day=120)
SMALL = UpstreamConfig(
    model=DermConfig(
        dim=8,
        token_dim=8,
        mlp_hidden=16,
        user_id_buckets=128,
        pin_id_buckets=64,
        category_buckets=8,
        advertiser_buckets=16,
        interaction_hidden=(16,),
    ),
    features=FEATURES,
    train=TrainConfig(epochs=1, batch_size=64),
    refresh=RefreshConfig(inference_batch_size=64),
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> PlatformPaths:
    paths = PlatformPaths(tmp_path_factory.mktemp("replay"))
    generate_event_log(LOG, paths.events_dir)
    return paths


def _replay(min_examples: int, max_days: int) -> TrainConfig:
    return dataclasses.replace(SMALL.train, replay_min_examples=min_examples, replay_max_days=max_days)


def test_sparse_day_replays_newest_days_first_until_the_minimum(log: PlatformPaths) -> None:
    days = LOG.days
    own = {d: training_arrays(log.events_dir, d, "ctr", FEATURES) for d in days}
    sizes = {d: len(own[d]["label"]) for d in days}
    last = days[-1]
    assert all(sizes.values())
    # Just more than the last day plus the day before: needs exactly two earlier days.
    need = sizes[last] + sizes[days[-2]] + 1
    arrays, replayed = replay_arrays(log.events_dir, last, "ctr", FEATURES, _replay(need, 7))
    assert replayed == [days[-2], days[-3]]
    assert len(arrays["label"]) == sizes[last] + sizes[days[-2]] + sizes[days[-3]]
    # The rows are the earlier days' own point-in-time examples, oldest first, then the day's.
    expected = {k: np.concatenate([own[d][k] for d in days[-3:]]) for k in own[last] if k != "pin_logq"}
    for key, column in expected.items():
        np.testing.assert_array_equal(arrays[key], column, err_msg=key)
    assert np.all(np.diff(arrays["event_timestamp"]) >= 0)
    # log-Q is the Pin's share of the positives of the union the batches are drawn from.
    positive = arrays["label"] > 0
    pins, counts = np.unique(arrays["pin_id"][positive], return_counts=True)
    share = dict(zip(pins.tolist(), np.log(counts / positive.sum()).tolist(), strict=True))
    np.testing.assert_allclose(arrays["pin_logq"][positive], [share[p] for p in arrays["pin_id"][positive]], rtol=1e-6)
    assert not arrays["pin_logq"][~positive].any()


def test_replay_is_bounded_and_dense_days_replay_nothing(log: PlatformPaths) -> None:
    days = LOG.days
    sizes = [len(training_arrays(log.events_dir, d, "ctr", FEATURES)["label"]) for d in days]
    # A minimum no window reaches: at most max_days earlier days, never before the log's first day.
    arrays, replayed = replay_arrays(log.events_dir, days[-1], "ctr", FEATURES, _replay(10**9, 2))
    assert replayed == [days[-2], days[-3]] and len(arrays["label"]) == sum(sizes[-3:])
    _, replayed = replay_arrays(log.events_dir, days[1], "ctr", FEATURES, _replay(10**9, 7))
    assert len(replayed) == 7  # calendar days looked at; only days[0] had examples
    arrays, _ = replay_arrays(log.events_dir, days[1], "ctr", FEATURES, _replay(10**9, 7))
    assert len(arrays["label"]) == sizes[0] + sizes[1]
    # A day at the minimum, or replay switched off, trains on its own examples only.
    for train in (_replay(sizes[-1], 7), _replay(0, 7), _replay(10**9, 0)):
        arrays, replayed = replay_arrays(log.events_dir, days[-1], "ctr", FEATURES, train)
        assert replayed == [] and len(arrays["label"]) == sizes[-1]
    with pytest.raises(ValueError, match="replay_max_days"):
        TrainConfig(replay_max_days=-1)


def test_refresh_trains_sparse_days_on_the_window_and_versions_it(tmp_path: Path, log: PlatformPaths) -> None:
    """Same seed, same log: replay changes the weights of a sparse day (and gets its own version); a day
    with nothing to replay (the first) trains identically."""
    off = dataclasses.replace(SMALL, train=_replay(0, 0))
    on = dataclasses.replace(SMALL, train=_replay(10_000, 3))
    assert off.config_hash("ctr") != on.config_hash("ctr")
    out = {}
    for name, cfg in (("off", off), ("on", on)):
        paths = PlatformPaths(tmp_path / name)
        paths.events_dir.parent.mkdir(parents=True, exist_ok=True)
        paths.events_dir.symlink_to(log.events_dir, target_is_directory=True)
        refresh(paths, ("ctr",), cfg, max_days=2)
        out[name] = [torch.load(checkpoint_path(paths.models_dir, "ctr", "v1", d))["model"] for d in LOG.days[:2]]
        version_config = json.loads(
            (checkpoint_path(paths.models_dir, "ctr", "v1", LOG.days[0]).parent / "config.json").read_text()
        )
        assert version_config["train"]["replay_min_examples"] == cfg.train.replay_min_examples
    first_off, second_off = out["off"]
    first_on, second_on = out["on"]
    assert all(torch.equal(first_off[k], first_on[k]) for k in first_off)
    assert not all(torch.equal(second_off[k], second_on[k]) for k in second_off)
