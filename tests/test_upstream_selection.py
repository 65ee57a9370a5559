"""Issue 17: `derm upstream-quality` compares upstream versions on the next-day quality in their manifests.

A real tiny refresh (the synthetic generator, `derm train-upstream` with 1 and 2 epochs a day) writes the
manifests; the table must carry exactly their figures, once per objective, mark the larger mean margin,
show the setting that differs (epochs), keep versions scored on other days out of the choice, and refuse
a range without data with a message naming the snapshots directory and the range.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from derm.core.naming import families_of
from derm.core.paths import DATA_DIR_ENV, PlatformPaths
from derm.core.snapshot import MANIFEST_FILE, read_manifest, snapshot_dir

START = date(2026, 3, 2)
DAYS = 3


def _derm(data_dir: Path, *args: object) -> Result:
    from derm.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args], env={DATA_DIR_ENV: str(data_dir)})


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlatformPaths]:
    """A 3-day log refreshed for CTR twice through the CLI: v1 with 1 epoch a day, v2 with 2."""
    import torch

    from derm.events.synthetic import SyntheticConfig, generate_event_log

    paths = PlatformPaths(tmp_path_factory.mktemp("selection"))
    cfg = SyntheticConfig.preset("tiny", start_date=START, n_days=DAYS, events_per_day=600)
    generate_event_log(cfg, paths.events_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; the CLI's --threads would outlive this module
    try:
        for epochs in (1, 2):
            result = _derm(paths.data_dir, "train-upstream", "--objective", "ctr", "--dim", 16, "--epochs", epochs)
            assert result.exit_code == 0, result.output
    finally:
        torch.set_num_threads(threads)
    yield paths


def _manifest_days(paths: PlatformPaths, version: str) -> dict[date, dict]:
    """Scored snapshot day -> quality, read with the platform's own manifest reader, user and Pin agreeing."""
    out = {}
    for offset in range(DAYS):
        day = START + timedelta(days=offset)
        user, pin = (
            read_manifest(snapshot_dir(paths.snapshots_dir, family, version, day)).quality
            for family in families_of("ctr").values()
        )
        assert user == pin  # measured once per pair: what lets the table count a day once
        if user["evaluated_on"] is not None:
            out[day] = user
    return out


def _rows(paths: PlatformPaths, *args: object) -> dict:
    result = _derm(paths.data_dir, "upstream-quality", "--objective", "ctr", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_table_carries_the_manifests_figures_and_marks_the_larger_margin(two_versions: PlatformPaths) -> None:
    paths = two_versions
    payload = _rows(paths)
    rows = {row["version"]: row for row in payload["rows"]}
    assert sorted(rows) == ["v1", "v2"]
    margins = {}
    for version, row in rows.items():
        days = _manifest_days(paths, version)
        assert len(days) == DAYS - 1  # the last day has no next day to score
        assert row["objective"] == "ctr" and row["days"] == [d.isoformat() for d in sorted(days)]
        q = list(days.values())

        def mean(name: str, q: list[dict] = q) -> float:
            return sum(d[name] for d in q) / len(q)

        assert row["roc_auc"] == pytest.approx(mean("roc_auc"))
        assert row["roc_auc_popularity"] == pytest.approx(mean("roc_auc_popularity"))
        assert row["margin"] == pytest.approx(mean("roc_auc") - mean("roc_auc_popularity"))
        assert row["margin_ci"][0] <= row["margin"] <= row["margin_ci"][1]
        assert row["recall_at_k"] == pytest.approx(mean("recall_at_k"))
        assert row["recall_at_k_popularity"] == pytest.approx(mean("recall_at_k_popularity"))
        assert row["flagged_days"] == sum(d["no_better_than_popularity"] for d in q)
        assert row["comparable"] is True
        margins[version] = mean("roc_auc") - mean("roc_auc_popularity")
    assert margins["v1"] != margins["v2"]
    best = max(margins, key=margins.get)
    assert [v for v, row in rows.items() if row["best"]] == [best]
    other = next(v for v in margins if v != best)
    lead, low, high = rows[best]["lead"]
    assert lead == pytest.approx(margins[best] - margins[other]) and low <= lead <= high
    assert rows[other]["lead"] is None
    # Only what differs from the default config: the epochs (and the test's dim), and the aggregation always.
    assert rows["v2"]["settings"]["epochs"] == 2 and "epochs" not in rows["v1"]["settings"]
    assert rows["v1"]["settings"]["model.dim"] == 16
    assert rows["v1"]["settings"]["aggregation"] == "ema" and rows["v1"]["settings"]["ema_weight"] == 0.8
    assert not [n for n in payload["notes"] if "different days" in n]
    # A 3-day log: every scored day's next day is one of the rankers' validation/evaluation days.
    assert [n for n in payload["notes"] if "validation/evaluation days" in n]

    text = _derm(paths.data_dir, "upstream-quality").output
    marks = {line.split()[1]: line.split()[2] for line in text.splitlines() if line.startswith("ctr ")}
    assert marks[best] == "*" and marks[other] != "*"
    assert "epochs=2" in text


def test_best_is_chosen_only_among_versions_scored_on_the_same_days(two_versions: PlatformPaths, tmp_path) -> None:
    paths = PlatformPaths(tmp_path / "data")
    shutil.copytree(two_versions.data_dir, paths.data_dir)
    # A third version over the first day only (overwrite re-uses v1's trained checkpoint: no training).
    result = _derm(
        paths.data_dir, "train-upstream", "--objective", "ctr", "--dim", 16, "--aggregation", "overwrite", "--days", 1
    )
    assert result.exit_code == 0, result.output

    rows = {row["version"]: row for row in _rows(paths)["rows"]}
    assert rows["v3"]["days"] == [START.isoformat()]
    assert rows["v3"]["comparable"] is False and rows["v3"]["best"] is False
    assert sum(row["best"] for row in rows.values()) == 1
    assert "Left out: v3 (1 day(s)" in _derm(paths.data_dir, "upstream-quality").output

    # On the one day they share, all three compete.
    payload = _rows(paths, "--through-date", START)
    assert all(row["comparable"] and len(row["days"]) == 1 for row in payload["rows"])
    assert len(payload["rows"]) == 3 and sum(row["best"] for row in payload["rows"]) == 1
    assert not [n for n in payload["notes"] if "different days" in n]
    best = max(payload["rows"], key=lambda row: row["margin"])
    assert best["best"]


def test_refuses_a_range_without_data_and_disagreeing_manifests(two_versions: PlatformPaths, tmp_path) -> None:
    paths = two_versions
    for args, wanted in (
        (("--objective", "cvr"), "snapshot days first .. last"),  # only CTR was refreshed
        (("--objective", "ctr", "--from-date", START + timedelta(days=DAYS)), f"{START + timedelta(days=DAYS)}"),
    ):
        result = _derm(paths.data_dir, "upstream-quality", *args)
        assert result.exit_code == 1, result.output
        assert str(paths.snapshots_dir) in result.output and wanted in result.output
    unknown = _derm(paths.data_dir, "upstream-quality", "--objective", "ctx")
    assert unknown.exit_code == 1 and "unknown objective" in unknown.output

    copy = PlatformPaths(tmp_path / "data")
    shutil.copytree(paths.data_dir, copy.data_dir)
    manifest = snapshot_dir(copy.snapshots_dir, "ctr_pin", "v1", START) / MANIFEST_FILE
    payload = json.loads(manifest.read_text())
    payload["quality"]["roc_auc"] = 0.123
    manifest.write_text(json.dumps(payload))
    result = _derm(copy.data_dir, "upstream-quality")
    assert result.exit_code == 1 and "record different quality figures" in result.output
    assert str(manifest) in result.output
