"""Every ``derm`` command through click's runner, on the tiny preset, in data-flow order.

One data directory and the module's own redis-server. The :func:`flow` fixture runs the commands in
the order an operator would (generate, stats, train-upstream, validate, publish --all with a refused
day, accept, discard, apply, materialize, lookup, train-downstream, audit-leakage, ablation, promote,
rollback, retire, freshness, run-all) and keeps each result; the tests read them, so they pass or
fail independently of the order they run in. Refusals end with exit code 1 (2 for bad usage or a bad
event log) and one clear message, never a traceback. ``serve`` is tested in test_serving.py.

The gate holds on the project's own output: every snapshot the refresh wrote (four families) passes
``derm validate``, and both objectives' training sets pass the training-set gate.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from derm.core.naming import FAMILIES
from derm.core.paths import DATA_DIR_ENV, REDIS_CONNECTION_ENV, REDIS_TYPE_ENV, PlatformPaths
from derm.core.snapshot import file_sha256, list_snapshots, read_manifest, snapshot_dir

DAYS = 4
TODAY = datetime.now(UTC).date()
START = TODAY - timedelta(days=DAYS)  # the log ends yesterday, so every day up to yesterday can be fresh
LAST = TODAY - timedelta(days=1)
REASON = "checked by hand (test)"
FAST = ["--epochs", "1", "--eval-days", "1", "--bootstrap", "10", "--threads", "1"]


@dataclass
class Flow:
    paths: PlatformPaths
    results: dict[str, Result] = field(default_factory=dict)
    notes: dict[str, object] = field(default_factory=dict)

    def output(self, step: str) -> str:
        result = self.results[step]
        return result.output + (result.stderr if result.stderr_bytes else "")


def _break(source: Path, seed: int = 77) -> None:
    """Every vector replaced by an unrelated unit vector: a broken export whose manifest agrees with its data."""
    data = source / "embeddings.parquet"
    table = pq.read_table(data)
    dim = len(table.column("embedding")[0].as_py())
    vectors = np.random.default_rng(seed).normal(size=(table.num_rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    table = table.set_column(2, "embedding", pa.array(list(vectors), pa.list_(pa.float32())))
    pq.write_table(table, data)
    manifest = replace(read_manifest(source), row_count=table.num_rows, data_sha256=file_sha256(data))
    (source / "manifest.json").write_text(manifest.to_json())


def _day(paths: PlatformPaths, family: str, day, version: str = "v1") -> Path:
    return snapshot_dir(paths.snapshots_dir, family, version, day)


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory, redis_server) -> Flow:
    from derm.cli.main import cli
    from derm.training.upstream.export import write_precomputed_snapshot

    paths = PlatformPaths(tmp_path_factory.mktemp("commands") / "data")
    flow = Flow(paths)
    runner = CliRunner()

    def run(step: str, *args: object) -> Result:
        flow.results[step] = runner.invoke(cli, [str(a) for a in args])
        return flow.results[step]

    with pytest.MonkeyPatch.context() as env:
        env.setenv(DATA_DIR_ENV, str(paths.data_dir))
        env.setenv(REDIS_CONNECTION_ENV, redis_server.connection_string)
        env.setenv(REDIS_TYPE_ENV, "redis")
        run("generate", "generate", "--preset", "tiny", "--days", DAYS, "--start-date", START)
        run("stats", "stats")
        run("train-upstream", "train-upstream", "--dim", 8, "--threads", 1)
        every_snapshot = [s for family in FAMILIES for s in list_snapshots(paths.snapshots_dir, family)]
        flow.notes["snapshots"] = every_snapshot
        docs = ["--docs-dir", paths.validation_dir]
        run("validate", "validate", *every_snapshot, *docs)  # the refresh's own output, all four families
        run("validate-default-docs", "validate", every_snapshot[0])

        # Broken exports: ctr_user's third day (the fourth is blocked behind it), cvr_user's last day.
        refused, blocked = _day(paths, "ctr_user", START + timedelta(days=2)), _day(paths, "ctr_user", LAST)
        accepted = _day(paths, "cvr_user", LAST)
        _break(refused)
        _break(accepted, seed=78)
        flow.notes.update(refused=refused, blocked=blocked, accepted=accepted)
        run("validate-refused", "validate", refused, *docs)
        run("publish-refused", "publish", "--all")
        run("freshness-missing", "freshness")
        # Ways on: the ctr_user chain is discarded and re-derived, cvr_user's last day accepted as it is.
        run("discard-published", "discard", _day(paths, "ctr_user", START))
        run("discard", "discard", refused)
        run("accept-no-reason", "accept", accepted, "--reason", " ")
        run("accept", "accept", accepted, "--reason", REASON)
        run("train-upstream-again", "train-upstream", "--dim", 8, "--threads", 1)  # re-exports, no retraining
        run("publish", "publish", "--all")
        run("publish-nothing", "publish", "--all")
        run("freshness", "freshness")
        run("docs", "docs")

        run("apply", "apply")
        run("materialize", "materialize", "--end", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"))
        served = pq.read_table(_day(paths, "ctr_user", LAST) / "embeddings.parquet").to_pylist()[0]
        flow.notes["served"] = served
        run("lookup", "lookup", "--user-id", served["user_id"], "--pin-id", 2, "--pin-id", 10**9)

        run("train-downstream", "train-downstream", "--objective", "both", "--run", "cli", *FAST)
        training_sets = sorted((paths.data_dir / "training_sets").rglob("*.parquet"))
        flow.notes["training_sets"] = training_sets
        ctr_set = next((p for p in training_sets if "ctr" in p.parts), None)
        if ctr_set is not None:
            from derm.training.downstream.leakage import build_leaky_training_set

            run("audit-leakage", "audit-leakage", ctr_set)
            leaky = build_leaky_training_set(ctr_set, paths.data_dir / "leaky.parquet", paths)
            run("audit-leakage-leaky", "audit-leakage", leaky, "--show", 2)
        run("ablation", "ablation", "--objective", "ctr", "--skip-aggregation", *FAST)

        # A second ctr_user version (another config): published, never promoted implicitly.
        v1_last = pq.read_table(_day(paths, "ctr_user", LAST) / "embeddings.parquet")
        ids = v1_last.column("user_id").to_numpy()
        vectors = np.stack(v1_last.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
        write_precomputed_snapshot(paths, "ctr_user", LAST, ids, vectors, config_hash="f" * 64)
        run("publish-v2", "publish", "--all")
        run("promote-unknown", "promote", "ctr", "v9")
        run("promote-model-half", "promote", "ctr", "v2")  # only ctr_user has a v2
        run("promote-family-no-reason", "promote", "ctr_user", "v2", "--family-only")
        run("promote", "promote", "ctr_user", "v2", "--family-only", "--reason", REASON)
        run("retire-promoted", "retire", "ctr_user", "v2", "--family-only", "--reason", REASON)
        run("rollback", "rollback", "ctr_user", "--family-only", "--reason", REASON)
        # a retry of that rollback (as after a kill): a no-op, where a plain retry would look for a v0
        run("rollback-retry", "rollback", "ctr_user", "--from", "v2", "--family-only", "--reason", REASON)
        run("retire", "retire", "ctr_user", "v2", "--family-only", "--reason", REASON)
        from derm.core.feast_repo import feature_store

        flow.notes["views"] = sorted(v.name for v in feature_store().list_feature_views())

        bad_log = paths.data_dir.parent / "bad_log" / f"date={START}"
        bad_log.mkdir(parents=True)
        shutil.copy(next((paths.events_dir / f"date={START}").glob("*.parquet")), bad_log / "part-0.parquet")
        table = pq.read_table(bad_log / "part-0.parquet")
        pq.write_table(table.drop_columns(["clicked"]), bad_log / "part-0.parquet")
        events_before = sorted(p.stat().st_mtime_ns for p in paths.events_dir.rglob("*.parquet"))
        run("run-all-refused", "run-all", "--events", bad_log.parent)
        flow.notes["events_untouched"] = events_before == sorted(
            p.stat().st_mtime_ns for p in paths.events_dir.rglob("*.parquet")
        )
    return flow


def expect(flow: Flow, step: str, exit_code: int) -> str:
    result = flow.results[step]
    output = flow.output(step)
    assert result.exit_code == exit_code, f"{step}: exit {result.exit_code}\n{output}\n{result.exception!r}"
    assert "Traceback" not in output, output
    if exit_code in (0, 1) and result.exception is not None:
        assert isinstance(result.exception, SystemExit), f"{step}: {result.exception!r}"
    return output


def test_generate_stats_and_train_upstream_write_every_family(flow: Flow) -> None:
    assert "wrote" in expect(flow, "generate", 0) and f"in {DAYS} days" in flow.output("generate")
    assert "counting features" in expect(flow, "stats", 0)
    expect(flow, "train-upstream", 0)
    days = {
        family: [s.name for s in list_snapshots(flow.paths.snapshots_dir, family) if s.parent.name == "v1"]
        for family in FAMILIES
    }
    expected = [f"date={START + timedelta(days=i)}" for i in range(DAYS)]
    assert days == dict.fromkeys(FAMILIES, expected)


def test_the_gate_passes_the_refresh_output_of_all_four_families(flow: Flow) -> None:
    output = expect(flow, "validate", 0)
    assert len(flow.notes["snapshots"]) == 4 * DAYS
    passed = [line for line in output.splitlines() if line.startswith("PASS ")]
    assert len(passed) == 4 * DAYS and "FAIL " not in output, output
    for family in FAMILIES:
        assert sum(f"/snapshots/{family}/v1/date=" in line for line in passed) == DAYS, output


def test_validate_defaults_to_the_data_dirs_validation_folder(flow: Flow) -> None:
    expect(flow, "validate-default-docs", 0)


def test_validate_refuses_a_broken_export(flow: Flow) -> None:
    output = expect(flow, "validate-refused", 1)
    assert f"FAIL {flow.notes['refused']}" in output and "cosine_to_previous" in output
    assert f"ctr_user v1 {START + timedelta(days=2)}: " in output and "Data Docs: " in output


def test_publish_all_refuses_one_day_blocks_its_chain_and_publishes_the_rest(flow: Flow) -> None:
    output = expect(flow, "publish-refused", 1)
    refused, blocked = flow.notes["refused"], flow.notes["blocked"]
    # 16 snapshots: ctr_user day 3 refused, day 4 blocked behind it, cvr_user day 4 refused.
    assert "published 13, refused 2, blocked 1" in output, output
    assert f"REFUSED    ctr_user v1   {START + timedelta(days=2)}  {refused}" in output
    assert f"blocked    ctr_user v1   {LAST}  behind refused {START + timedelta(days=2)}" in output
    assert str(blocked) not in output.split("blocked")[0]
    assert "derm accept SNAPSHOT_DIR --reason TEXT" in output and "derm discard SNAPSHOT_DIR" in output


def test_freshness_exits_1_while_days_are_missing_then_0(flow: Flow) -> None:
    missing = " ".join(expect(flow, "freshness-missing", 1).split())
    assert f"ctr_user v1: newest {START + timedelta(days=1)}" in missing
    assert f"MISSING 2 days: {START + timedelta(days=2)}..{LAST} (2 days)" in missing, missing
    assert f"cvr_user v1: newest {LAST - timedelta(days=1)}" in missing and f"MISSING 1 days: {LAST}" in missing
    fresh = expect(flow, "freshness", 0)
    assert "MISSING" not in fresh and f"accepted {LAST}: {REASON}" in fresh
    assert all(f"{family} v1: newest {LAST}" in fresh for family in FAMILIES), fresh


def test_discard_refuses_a_published_day_and_moves_a_refused_one_aside(flow: Flow) -> None:
    refused = expect(flow, "discard-published", 1)
    assert f"ctr_user v1: {START}, {START + timedelta(days=1)} already published" in refused, refused
    assert "a published day is never discarded" in refused
    moved = expect(flow, "discard", 0)
    assert "derm train-upstream" in moved
    discarded = sorted(p.name for p in (flow.paths.data_dir / "discarded").glob("*/ctr_user/v1/date=*"))
    assert discarded == [f"date={START + timedelta(days=2)}", f"date={LAST}"]


def test_accept_needs_a_reason_then_publishes_and_unblocks(flow: Flow) -> None:
    result = flow.results["accept-no-reason"]
    assert result.exit_code != 0 and "reason" in flow.output("accept-no-reason")
    assert "ACCEPTED despite the gate" in expect(flow, "accept", 0)
    # The discarded days, re-derived by train-upstream, are published by the next run.
    expect(flow, "train-upstream-again", 0)
    published = expect(flow, "publish", 0)
    assert "published 2, refused 0, blocked 0" in published, published
    assert f"published  ctr_user v1   {LAST}" in published
    assert expect(flow, "publish-nothing", 0).strip() == "nothing to publish"
    assert "Data Docs: " in expect(flow, "docs", 0)


def test_apply_materialize_and_lookup_serve_what_was_published(flow: Flow) -> None:
    expect(flow, "apply", 0)
    expect(flow, "materialize", 0)
    output = " ".join(expect(flow, "lookup", 0).split())  # rich wraps long lines
    for family in FAMILIES:
        assert f"{family}_emb: [" in output, output
    # The user's vector of the newest day, as published (three values shown); an unknown Pin has none.
    shown = ", ".join(f"{x:.3f}" for x in flow.notes["served"]["embedding"][:3])
    assert f"[{shown}, ... (8 values)]" in output, output
    assert "None" in output


def test_train_downstream_gates_both_training_sets_and_they_pass(flow: Flow) -> None:
    from derm.core.training_set import read_training_set
    from derm.training.downstream.training_sets import gate_training_set

    output = expect(flow, "train-downstream", 0)
    assert output.count("expectations passed") >= 2, output
    objectives = set()
    for path in flow.notes["training_sets"]:
        table, info = read_training_set(path)
        report = gate_training_set(table, info, flow.paths.validation_dir, events_dir=flow.paths.events_dir)
        assert report.success, report.failures
        assert set(info.embedding_versions) == set(FAMILIES)  # both ranker services hold all four families
        objectives.add(info.objective)
    assert objectives == {"ctr", "cvr"}


def test_audit_leakage_passes_the_point_in_time_set_and_flags_a_leaky_one(flow: Flow) -> None:
    expect(flow, "audit-leakage", 0)
    output = expect(flow, "audit-leakage-leaky", 1)
    assert "future" in output


def test_ablation_runs_and_reports(flow: Flow) -> None:
    output = expect(flow, "ablation", 0)
    written = [line.split()[1] for line in output.splitlines() if line.startswith("wrote ")]
    assert written and all(Path(path).is_file() for path in written), output
    assert "ctr leakage audit of the ablation's rows: PASS" in output, output


def test_promote_rollback_retire_and_their_refusals(flow: Flow) -> None:
    assert "published 1, refused 0, blocked 0" in expect(flow, "publish-v2", 0)
    assert "v9" in expect(flow, "promote-unknown", 1)
    assert "v2" in expect(flow, "promote-model-half", 1)
    assert flow.results["promote-family-no-reason"].exit_code in (1, 2), flow.output("promote-family-no-reason")
    assert "reason" in flow.output("promote-family-no-reason")
    assert "promoted v2 for ctr_user" in expect(flow, "promote", 0)
    assert "is promoted" in expect(flow, "retire-promoted", 1)
    assert "ctr_user -> v1" in expect(flow, "rollback", 0)
    assert "ctr_user -> v1" in expect(flow, "rollback-retry", 0)
    assert "retired v2 of ctr_user" in expect(flow, "retire", 0)
    assert "ctr_user_emb_v2" not in flow.notes["views"] and "ctr_user_emb_v1" in flow.notes["views"]


def test_run_all_refuses_a_log_that_breaks_the_contract_and_writes_nothing(flow: Flow) -> None:
    output = expect(flow, "run-all-refused", 2)
    assert "event log refused" in output and "clicked" in output, output
    assert flow.notes["events_untouched"]
