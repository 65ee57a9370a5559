"""Issue 11: the experiment commands report a ranker the log gives nothing to learn as skipped, never a crash.

A real single-class log (every impression clicked, no conversion: the conformance suite's
``ALL_CLICKS_NO_CONVERSIONS``, which ``run-all`` is tested on there) is imported, its embeddings published
and promoted by the platform's own writers and applied to a real Feast repo (Redis online store); then
``derm ablation`` and ``derm leakage-experiment`` run on it: each ends with exit code 0, prints the reason
as ``derm train-downstream`` does, and records it in its report, with no traceback and no ranker trained.
The aggregation sweep's skip is checked through its function on the published version (the CLI would
first refresh three more versions, minutes for nothing here).
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.test_conformance import ALL_CLICKS_NO_CONVERSIONS, _platform

FAST = ["--epochs", "1", "--eval-days", "1", "--bootstrap", "10", "--threads", "1"]
DB = 7  # this module's own Redis database


def _publish_v1(paths, days: list[date]) -> None:
    """Every family's snapshot of every day (written by the refresh's writer, landed by the publisher's),
    promoted: the platform as ``derm publish --all`` leaves it, without training upstream models on a log
    that the rankers cannot learn from anyway."""
    from derm.core.naming import FAMILIES
    from derm.core.snapshot import read_manifest
    from derm.materialization.catalog import Catalog, CatalogState
    from derm.materialization.publish import write_offline_partition
    from derm.training.upstream.export import write_precomputed_snapshot

    events = ALL_CLICKS_NO_CONVERSIONS.events
    catalog = Catalog(paths.embeddings_offline_dir)
    for family, entity in FAMILIES.items():
        ids = np.unique(events[f"{entity}_id"].to_numpy()).astype(np.int64)
        vectors = np.random.default_rng(len(family)).normal(size=(len(ids), 8)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        for day in days:
            source = write_precomputed_snapshot(paths, family, day, ids, vectors, config_hash=family[:3] * 21 + "x")
            write_offline_partition(catalog, read_manifest(source), source)
    catalog.write_state(CatalogState(promoted=dict.fromkeys(FAMILIES, "v1")))


@pytest.fixture(scope="module")
def single_class(tmp_path_factory: pytest.TempPathFactory, redis_server):
    from derm.cli.main import cli
    from derm.core.feast_repo import FeatureRepo
    from derm.core.paths import PlatformPaths
    from derm.events.schema import import_event_log
    from derm.experiments.ablation import AblationConfig, aggregation_ablation

    root = tmp_path_factory.mktemp("single-class")
    source = ALL_CLICKS_NO_CONVERSIONS.write(root / "source")
    runner = CliRunner()
    results = {}
    with _platform(root, redis_server, db=DB) as data_dir:
        paths = PlatformPaths.from_env()
        import_event_log(source, paths.events_dir)
        _publish_v1(paths, sorted(ALL_CLICKS_NO_CONVERSIONS.encodings))
        for step in ("stats", "apply"):
            results[step] = runner.invoke(cli, [step])
        results["ablation"] = runner.invoke(cli, ["ablation", "--skip-aggregation", *FAST])
        results["leakage-experiment"] = runner.invoke(
            cli, ["leakage-experiment", "--epochs", "1", "--eval-days", "1", "--bootstrap", "10", "--threads", "1"]
        )
        results["aggregation"] = aggregation_ablation(
            paths, FeatureRepo(), AblationConfig(ema_weights=(None,)), overwrite_version="v1"
        )
    return data_dir, results


def _ok(result) -> str:
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output
    return result.output


def test_ablation_reports_skipped_rankers(single_class) -> None:
    data_dir, results = single_class
    _ok(results["stats"]), _ok(results["apply"])
    output = _ok(results["ablation"])
    skipped = ALL_CLICKS_NO_CONVERSIONS.skipped
    for objective in ("ctr", "cvr"):
        assert f"{objective} ranker skipped: " in output and skipped[objective] in output, output
    reports = data_dir / "reports"
    embeddings = (reports / "ablation_embeddings.md").read_text()
    assert embeddings.count("**Skipped**") == 2 and skipped["cvr"] in embeddings
    record = json.loads((reports / "ablation_embeddings.json").read_text())
    assert [c["objective"] for c in record["comparisons"]] == ["ctr", "cvr"]
    assert all(c["skipped"] and not c["variants"] for c in record["comparisons"])
    aggregation = results["aggregation"]
    assert aggregation.objective == "ctr" and skipped["ctr"] in aggregation.skipped and not aggregation.results
    assert not list((data_dir / "models" / "downstream").glob("*/*/ranker.json")), "no ranker trained"


def test_leakage_experiment_reports_a_skipped_ranker(single_class) -> None:
    data_dir, results = single_class
    output = _ok(results["leakage-experiment"])
    assert "ctr ranker skipped: " in output and ALL_CLICKS_NO_CONVERSIONS.skipped["ctr"] in output
    assert "**Skipped**" in (data_dir / "reports" / "leakage_experiment.md").read_text()
    assert Path(data_dir / "reports" / "leakage_experiment.json").is_file()
