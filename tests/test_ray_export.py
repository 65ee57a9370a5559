"""The daily embedding export on Ray Data writes the very snapshot the single-process export writes.

One local Ray (2 CPUs) for the module. Both exports run the same model over the same
id-ordered feature batches (uneven batch sizes, forward passes cut inside a batch), blend
with the same previous snapshot (EMA) and stream through the same snapshot writer; the
Parquet files must hold the same rows and bytes.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")
ray = pytest.importorskip("ray")

from bench.export_throughput import export_snapshot, synthetic_entity_features  # noqa: E402
from derm.core.paths import PROFILE_ENV, RAY_ADDRESS_ENV  # noqa: E402
from derm.core.snapshot import DATA_FILE  # noqa: E402
from derm.training.upstream.export import EXPORT_ENGINE_ENV, RayExport, export_engine  # noqa: E402
from derm.training.upstream.model import DermConfig, DermModel  # noqa: E402

DIM = 16
ENTITIES = 300


def _export(model: DermModel, entity: str, target: Path, previous: Path | None, engine: RayExport | None) -> Path:
    # 37-row feature batches cut into 16-row forward passes: the last pass of each batch is short.
    features = synthetic_entity_features(entity, ENTITIES, batch_rows=37, seed=3)
    written = export_snapshot(
        model,
        entity,
        features,
        target,
        previous,
        now=datetime(2026, 1, 2, 1, tzinfo=UTC),
        model_version="v1",
        batch_rows=16,
        row_group_rows=64,
        ray=engine,
        renormalize=True,
    )
    assert written.row_count == ENTITIES
    return target / DATA_FILE


@pytest.mark.parametrize("entity", ["user", "pin"])
def test_ray_export_writes_the_single_process_snapshot(local_ray: None, tmp_path: Path, entity: str) -> None:
    torch.manual_seed(0)
    model = DermModel(DermConfig(dim=DIM, user_id_buckets=1 << 10, pin_id_buckets=1 << 10))
    previous = _export(model, entity, tmp_path / "previous", None, None)
    for parameter in model.parameters():  # "today's" model: moved, so the EMA blends two different vectors
        parameter.data.add_(0.01)
    local = _export(model, entity, tmp_path / "local", previous, None)
    on_ray = _export(model, entity, tmp_path / "ray", previous, RayExport(workers=2))
    assert pq.read_table(on_ray).equals(pq.read_table(local))
    assert on_ray.read_bytes() == local.read_bytes()


def test_export_engine_follows_the_profile_and_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(EXPORT_ENGINE_ENV, raising=False)
    monkeypatch.setenv(PROFILE_ENV, "local")
    assert export_engine() is None
    monkeypatch.setenv(PROFILE_ENV, "cluster")
    monkeypatch.setenv(RAY_ADDRESS_ENV, "")
    assert export_engine() == RayExport(ray_address=None)
    monkeypatch.setenv(RAY_ADDRESS_ENV, "ray://head:10001")
    assert dataclasses.replace(export_engine(), workers=2).ray_address == "ray://head:10001"
    monkeypatch.setenv(EXPORT_ENGINE_ENV, "local")
    assert export_engine() is None
    monkeypatch.setenv(PROFILE_ENV, "local")
    monkeypatch.setenv(EXPORT_ENGINE_ENV, "ray")
    assert export_engine() == RayExport(ray_address="ray://head:10001")
    monkeypatch.setenv(EXPORT_ENGINE_ENV, "spark")
    with pytest.raises(ValueError, match=EXPORT_ENGINE_ENV):
        export_engine()
