"""The core every layer stands on: names, atomic files, the version registry, the training-set format,
and the 0.1 import paths of the Feast plugins that a shim keeps for one release."""

from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path

import pyarrow as pa
import pytest

from derm.core.files import atomic_path, atomic_write_text, publish_directory, replace_directory
from derm.core.model_versions import ModelVersions
from derm.core.naming import (
    FAMILIES,
    OBJECTIVES,
    all_counting_features,
    family_name,
    feature_name,
    feature_view_name,
    join_key,
    objective_of,
    ranker_service_name,
)
from derm.core.training_set import TrainingSetInfo, read_training_set, read_training_set_info, write_training_set


def test_names_are_derived_from_one_table() -> None:
    assert set(FAMILIES) == {"ctr_user", "ctr_pin", "cvr_user", "cvr_pin"}
    for family, entity in FAMILIES.items():
        objective = objective_of(family)
        assert objective in OBJECTIVES and family_name(objective, entity) == family
    assert feature_view_name("cvr_pin", "v12") == "cvr_pin_emb_v12" and feature_name("cvr_pin") == "cvr_pin_emb"
    assert join_key("ctr_pin") == "pin_id" and ranker_service_name("cvr") == "cvr_ranker"
    assert len(all_counting_features()) == len(set(all_counting_features())) == 12
    with pytest.raises(ValueError, match="unknown embedding family 'ads_user'"):
        objective_of("ads_user")
    with pytest.raises(ValueError, match="unknown objective 'ads'"):
        ranker_service_name("ads")


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"], "no temporary file is left behind"


def test_replace_directory_swaps_a_whole_folder(tmp_path: Path) -> None:
    target = tmp_path / "user_daily_stats"
    for generation in range(3):
        staging = tmp_path / f"staging-{generation}"
        (staging / "date=2026-01-01").mkdir(parents=True)
        (staging / "date=2026-01-01" / "data_0.parquet").write_text(f"generation {generation}")
        replace_directory(staging, target)
        assert (target / "date=2026-01-01" / "data_0.parquet").read_text() == f"generation {generation}"
        assert not staging.exists(), "the previous generation is removed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user_daily_stats"]


def test_publish_directory_never_replaces_what_was_published(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for staging, content in ((first, "first"), (second, "second")):
        staging.mkdir()
        (staging / "data.parquet").write_text(content)
    target = tmp_path / "ctr_user" / "v1" / "date=2026-01-02"
    publish_directory(first, target)
    with pytest.raises(FileExistsError, match="published folders are never replaced"):
        publish_directory(second, target)
    assert (target / "data.parquet").read_text() == "first" and (second / "data.parquet").exists()


def test_a_reader_never_finds_the_swapped_folder_missing(tmp_path: Path) -> None:
    target = tmp_path / "table"
    (target / "part").mkdir(parents=True)
    stop = threading.Event()
    missing: list[int] = []

    def read() -> None:
        while not stop.is_set():
            if not (target / "part").is_dir():
                missing.append(1)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(200):
            staging = tmp_path / f"s{i}"
            (staging / "part").mkdir(parents=True)
            replace_directory(staging, target)
    finally:
        stop.set()
        reader.join()
    assert not missing


def test_model_versions_are_given_once_and_never_change(tmp_path: Path) -> None:
    registry = ModelVersions(tmp_path)
    assert registry.version_of("ctr", "a" * 64) is None
    assert [registry.resolve("ctr", h) for h in ("a" * 64, "b" * 64, "a" * 64)] == ["v1", "v2", "v1"]
    assert registry.resolve("cvr", "b" * 64) == "v1", "each objective numbers its own versions"
    assert json.loads(registry.path.read_text()) == {"ctr": {"a" * 64: "v1", "b" * 64: "v2"}, "cvr": {"b" * 64: "v1"}}
    registry.path.write_text("{not json")
    with pytest.raises(ValueError, match=r"versions\.json: not a version registry"):
        registry.versions("ctr")


def test_training_set_metadata_round_trips_and_reads_0_1_files(tmp_path: Path) -> None:
    info = TrainingSetInfo(
        objective="ctr",
        feature_service="ctr_ranker",
        feature_refs=["ctr_user_emb_v1:ctr_user_emb"],
        embedding_versions={"ctr_user": "v1"},
        embedding_dims={"ctr_user": 4},
        window_start="2026-01-02T00:00:00+00:00",
        window_end="2026-01-05T00:00:00+00:00",
        rows=2,
    )
    path = write_training_set(pa.table({"event_id": [1, 2], "label": [0, 1]}), info, tmp_path / "set.parquet")
    table, read_back = read_training_set(path)
    assert read_back == info == read_training_set_info(path) and table.num_rows == 2
    legacy = json.loads(info.to_json())
    legacy["task"] = legacy.pop("objective")  # 0.1 called the objective "task"
    assert TrainingSetInfo.from_json(json.dumps(legacy)) == info


@pytest.mark.parametrize(
    ("old_path", "new_class"),
    [
        (
            "materialization.fast_redis.FastRedisOnlineStore",
            "derm.feast_plugins.redis_online_store.FastRedisOnlineStore",
        ),
        (
            "retrieval.asof_offline_store.AsofDuckDBOfflineStore",
            "derm.feast_plugins.asof_offline_store.AsofDuckDBOfflineStore",
        ),
        (
            "materialization.vector_engine.VectorMaterializationEngine",
            "derm.feast_plugins.vector_engine.VectorMaterializationEngine",
        ),
    ],
)
def test_0_1_plugin_paths_still_load_in_feast_with_a_deprecation_warning(
    tmp_path: Path, old_path: str, new_class: str
) -> None:
    import importlib
    import sys

    from feast.repo_config import RepoConfig

    module_name, class_name = old_path.rsplit(".", 1)
    sys.modules.pop(module_name, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(module_name)
    assert any(issubclass(w.category, DeprecationWarning) and "0.3" in str(w.message) for w in caught)
    new_module, new_name = new_class.rsplit(".", 1)
    assert getattr(module, class_name) is getattr(importlib.import_module(new_module), new_name)

    settings: dict = {
        "project": "legacy",
        "provider": "local",
        "registry": str(tmp_path / "registry.db"),
        "entity_key_serialization_version": 3,
        "repo_path": str(tmp_path),
    }
    if "online_store" in new_module or "redis" in new_module:
        settings["online_store"] = {"type": old_path, "connection_string": "localhost:1"}
        config = RepoConfig(**settings).online_store
    elif "offline" in new_module:
        settings["offline_store"] = {"type": old_path}
        config = RepoConfig(**settings).offline_store
    else:
        settings["batch_engine"] = {"type": old_path}
        config = RepoConfig(**settings).batch_engine_config
    assert getattr(config, "type", old_path) == old_path
