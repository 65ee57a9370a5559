"""The operator's commands after a refusal (issue 11), through click on the real Redis, Feast and GE.

``publish --all`` publishes every chain it can and prints published / refused / blocked; ``accept``
and ``discard`` are the two ways on; ``freshness`` collapses long gaps; every gating command takes
``--thresholds`` and ends a refusal with its failures and Data Docs link, never a traceback.
"""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from derm.core.paths import PlatformPaths
from derm.core.snapshot import snapshot_dir
from derm.materialization.catalog import Catalog
from derm.training.upstream.export import write_precomputed_snapshot

DIM = 8
START = date(2026, 1, 1)
D1, D2, D3 = START, START + timedelta(days=1), START + timedelta(days=2)
REASON = "upstream fix verified offline (ticket 11)"


def _unit_rows(seed: int, n: int = 40) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _drifted(previous: np.ndarray, seed: int) -> np.ndarray:
    step = previous + 0.1 * _unit_rows(seed, len(previous))
    return (step / np.linalg.norm(step, axis=1, keepdims=True)).astype(np.float32)


def _snapshot(paths: PlatformPaths, family: str, day: date, vectors: np.ndarray) -> Path:
    model = family.split("_")[0]
    return write_precomputed_snapshot(paths, family, day, np.arange(len(vectors)), vectors, config_hash=model * 32)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> PlatformPaths:
    """Its own data directory (tiny log, counting features); its own Redis database in the tests below."""
    from derm.events.synthetic import SyntheticConfig, generate_event_log
    from derm.materialization.counting_features import build_counting_features

    paths = PlatformPaths(tmp_path_factory.mktemp("cli"))
    generate_event_log(SyntheticConfig.preset("tiny", start_date=START, n_days=4), paths.events_dir)
    build_counting_features(paths.events_dir, paths.stats_dir)
    return paths


@pytest.fixture
def env(platform: PlatformPaths, redis_server, monkeypatch: pytest.MonkeyPatch) -> PlatformPaths:
    from derm.core.paths import DATA_DIR_ENV, REDIS_CONNECTION_ENV, REDIS_TYPE_ENV

    monkeypatch.setenv(DATA_DIR_ENV, str(platform.data_dir))
    monkeypatch.setenv(REDIS_CONNECTION_ENV, redis_server.connection_string)  # the module's own server
    monkeypatch.setenv(REDIS_TYPE_ENV, "redis")
    return platform


def _run(command, args: list[str], exit_code: int) -> Result:
    result = CliRunner().invoke(command, [str(a) for a in args])
    output = result.output + (result.stderr if result.stderr_bytes else "")
    assert result.exit_code == exit_code, output
    assert "Traceback" not in output and not isinstance(result.exception, (ValueError, RuntimeError)), output
    return result


def test_publish_all_publishes_other_chains_reports_and_accept_unblocks(env: PlatformPaths, tmp_path: Path) -> None:
    from derm.cli.downstream import train_downstream
    from derm.cli.experiments import ablation
    from derm.cli.publishing import accept_command, freshness_command, publish

    user1 = _unit_rows(1)
    pins = [_unit_rows(2)]
    pins += [_drifted(pins[-1], 3), _drifted(_drifted(pins[-1], 3), 4)]
    bad = _unit_rows(9)  # a sudden drift: unrelated to day 1
    users = [
        _snapshot(env, "ctr_user", D1, user1),
        _snapshot(env, "ctr_user", D2, bad),
        _snapshot(env, "ctr_user", D3, _drifted(bad, 5)),
    ]
    for day, vectors in zip((D1, D2, D3), pins, strict=True):
        _snapshot(env, "cvr_pin", day, vectors)

    first = _run(publish, ["--all"], exit_code=1).output
    assert "published 4, refused 1, blocked 1" in first
    refused_line = f"REFUSED    ctr_user v1   {D2}  {users[1]}"
    assert refused_line in first and "expectations passed; failed: expect_" in first and "Data Docs: " in first
    assert f"blocked    ctr_user v1   {D3}  behind refused {D2}, not validated" in first
    for day in (D1, D2, D3):
        assert f"published  cvr_pin  v1   {day}" in first
    assert "derm accept SNAPSHOT_DIR --reason TEXT" in first

    again = _run(publish, ["--all"], exit_code=1).output
    assert "published 0, refused 1, blocked 1" in again and refused_line in again

    accepted = _run(accept_command, [users[1], "--reason", REASON], exit_code=0).output
    assert "ACCEPTED despite the gate" in accepted and "expectations passed; failed:" in accepted
    state = Catalog(env.embeddings_offline_dir).read_state()
    assert state.accepted["ctr_user"]["v1"][D2.isoformat()]["reason"] == REASON

    fresh = _run(freshness_command, [], exit_code=1).output  # days are missing up to yesterday (real clock)
    lines = fresh.splitlines()
    assert f"  accepted {D2}: {REASON}" in lines
    ctr_user = next(line for line in lines if line.startswith("ctr_user v1"))
    assert f"MISSING {(date.today() - timedelta(days=1) - D2).days} days: {D2 + timedelta(days=1)}.." in ctr_user
    assert len(ctr_user) < 200, "a long gap is one range, not every date"

    final = _run(publish, ["--all"], exit_code=0).output
    assert "published 1, refused 0, blocked 0" in final and f"published  ctr_user v1   {D3}" in final
    assert _run(publish, ["--all"], exit_code=0).output.strip() == "nothing to publish"

    # ctr_user and cvr_pin are promoted now, so the CTR training set builds: a training-set refusal ends
    # cleanly with its failures and Data Docs (here, in this test, so that it never depends on test order).
    strict = tmp_path / "strict.yaml"
    strict.write_text("training_set:\n  label_rate_min: 0.99\n")
    fast = ["--objective", "ctr", "--epochs", "1", "--bootstrap", "10", "--threads", "1", "--thresholds", strict]
    for command, extra in ((train_downstream, []), (ablation, ["--skip-aggregation"])):
        out = _run(command, [*fast, *extra], exit_code=1).output
        assert "validation failed for" in out and "label" in out and "Data Docs: " in out, out


def test_discard_moves_the_refused_chain_aside_never_a_published_day(env: PlatformPaths) -> None:
    from derm.cli.publishing import discard_command, publish

    start = _unit_rows(11)
    days = [
        _snapshot(env, "cvr_user", D1, start),
        _snapshot(env, "cvr_user", D2, _unit_rows(12)),  # sudden drift
        _snapshot(env, "cvr_user", D3, _drifted(_unit_rows(12), 13)),
    ]
    out = _run(publish, ["--all"], exit_code=1).output
    assert "published 1, refused 1, blocked 1" in out and f"REFUSED    cvr_user v1   {D2}" in out

    refused = _run(discard_command, [days[0]], exit_code=1)
    assert f"{D1} already published; a published day is never discarded" in refused.output
    assert all(d.exists() for d in days)

    moved = _run(discard_command, [days[1]], exit_code=0).output
    assert not days[1].exists() and not days[2].exists() and days[0].exists()
    assert "re-derive them with `derm train-upstream`" in moved
    discarded = sorted(p.name for p in (env.data_dir / "discarded").glob("*/cvr_user/v1/date=*"))
    assert discarded == [f"date={D2}", f"date={D3}"]
    assert _run(publish, ["--all"], exit_code=0).output.strip() == "nothing to publish"
    assert snapshot_dir(env.snapshots_dir, "cvr_user", "v1", D1) == days[0]


def _gating_commands():
    from derm.cli.downstream import train_downstream
    from derm.cli.experiments import ablation, leakage_experiment_command
    from derm.cli.publishing import accept_command, publish

    return [publish, accept_command, train_downstream, ablation, leakage_experiment_command]


def test_every_gating_command_takes_the_same_thresholds_option(tmp_path: Path) -> None:
    from derm.cli.downstream import downstream_config

    options = {
        command.name: next(p for p in command.params if p.name == "thresholds") for command in _gating_commands()
    }
    assert {(tuple(o.opts), o.help) for o in options.values()} == {
        (("--thresholds",), "Gate thresholds YAML replacing validation/thresholds.yaml.")
    }
    typo = tmp_path / "typo.yaml"
    typo.write_text("training_set:\n  label_rate_minimum: 0.5\n")
    for command in _gating_commands():
        args = ["--thresholds", typo] if command.name != "accept" else [tmp_path, "--reason", "x", "--thresholds", typo]
        result = _run(command, args, exit_code=2)
        assert "label_rate_minimum" in result.output, result.output
    assert downstream_config(1, 1, 2, 10, 0, thresholds=typo).gate_thresholds == typo
