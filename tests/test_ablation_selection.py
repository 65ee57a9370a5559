"""Nested model selection in the embedding ablation (issue 17): a variant keeps the ranker selected for the
variant before it when that one has the lower validation log loss, and its step lift is then exactly 0.

Real parts at tiny sizes: three training sets written as the pipeline writes them (Parquet with the
training-set metadata), one per nested variant of the same rows, trained and evaluated by the real
``train_on_training_set`` (torch, the grid, calibration, the "no harm" check). ``ctr_user`` carries the
label's signal; ``ctr_pin`` is pure noise.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from derm.core.naming import all_counting_features
from derm.core.training_set import TrainingSetInfo, write_training_set
from derm.training.downstream.ranker import RankerModelConfig

START = datetime(2026, 3, 2, tzinfo=UTC)
DAYS = 6
DIMS = {"ctr_user": 4, "ctr_pin": 16}
VARIANTS = (("none", ()), ("ctr_user", ("ctr_user",)), ("ctr_user + ctr_pin", ("ctr_user", "ctr_pin")))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _frame(n: int = 2_400, seed: int = 0) -> dict[str, pa.Array]:
    """Training-set rows over DAYS days; the label depends on ctr_user's first dimension only."""
    rng = np.random.default_rng(seed)
    user = rng.normal(size=(n, DIMS["ctr_user"])).astype(np.float32)
    noise = rng.normal(size=(n, DIMS["ctr_pin"])).astype(np.float32)
    labels = (rng.random(n) < 1 / (1 + np.exp(-(-0.5 + 2.5 * user[:, 0])))).astype(np.int64)
    offsets = np.sort(rng.integers(0, DAYS * 86_400_000_000, n))
    frame = {
        "event_id": pa.array(np.arange(n, dtype=np.int64) * 7 + 3),
        "event_timestamp": pa.array(int(START.timestamp() * 1e6) + offsets, pa.int64()).cast(
            pa.timestamp("us", tz="UTC")
        ),
        "user_id": pa.array(rng.integers(0, 200, n)),
        "pin_id": pa.array(rng.integers(0, 80, n)),
        "advertiser_id": pa.array(rng.integers(0, 8, n)),
        "category_id": pa.array(rng.integers(0, 5, n)),
        "surface": pa.array(rng.choice(["home_feed", "search", "related_pins"], n)),
        "day_of_week": pa.array(rng.integers(0, 7, n)),
        "label": pa.array(labels),
        "ctr_user_emb": pa.array(list(user), pa.list_(pa.float32())),
        "ctr_pin_emb": pa.array(list(noise), pa.list_(pa.float32())),
    }
    for name in all_counting_features():
        frame[name] = pa.array(rng.poisson(3, n).astype(np.float64))
    return frame


def _training_set(tmp_path: Path, label: str, families: tuple[str, ...], frame: dict) -> Path:
    """The variant's training set: the shared rows with only its families' embedding columns."""
    columns = {k: v for k, v in frame.items() if not k.endswith("_emb") or k[: -len("_emb")] in families}
    info = TrainingSetInfo(
        objective="ctr",
        feature_service=f"ctr_ranker[{label}]",
        feature_refs=[f"{f}_emb_v1:{f}_emb" for f in families],
        embedding_versions=dict.fromkeys(families, "v1"),
        embedding_dims={f: DIMS[f] for f in families},
        window_start=START.isoformat(),
        window_end=(START + timedelta(days=DAYS)).isoformat(),
        rows=len(frame["event_id"]),
    )
    slug = label.replace(" + ", "-")
    return write_training_set(pa.table(columns), info, tmp_path / f"{slug}.parquet")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """Every variant trained on its own grid (embedding dropout 0 or 1.0 = families off)."""
    from derm.training.downstream.train import DownstreamConfig, train_on_training_set

    tmp_path = tmp_path_factory.mktemp("nested")
    cfg = DownstreamConfig(
        epochs=3,
        bootstrap=100,
        batch_size=256,
        learning_rate=1e-2,
        weight_decay=(1e-4,),
        embedding_dropout=(0.0, 1.0),
        model=RankerModelConfig(mlp_hidden=(16,), cross_rank=4, projection_dim=4),
    )
    frame = _frame()
    results = {}
    for label, families in VARIANTS:
        path = _training_set(tmp_path, label, families, frame)
        _, results[label] = train_on_training_set(path, cfg, save_to=tmp_path / "rankers" / path.stem)
    return cfg, results


def test_nested_selection_keeps_a_family_that_helps_and_drops_one_that_does_not(trained) -> None:
    from derm.experiments.ablation import nested_selection_notes, select_nested
    from derm.experiments.reports import compare, comparison_markdown, comparison_record

    cfg, results = trained
    own = {label: results[label] for label, _ in VARIANTS}
    assert all(np.isfinite(r.validation_log_loss) and len(r.validation_event_ids) for r in own.values())
    kept = select_nested([(label, families, own[label]) for label, families in VARIANTS])

    # ctr_user carries the signal: validation keeps its own ranker.
    user = kept["ctr_user"].nested_selection
    assert own["ctr_user"].validation_log_loss < own["none"].validation_log_loss
    assert user["kept"] == "ctr_user" and user["kept_own"] and user["compared_with"] == "none"
    np.testing.assert_array_equal(kept["ctr_user"].eval_scores, own["ctr_user"].eval_scores)

    # ctr_pin is noise: its own ranker is worse on validation, so the ctr_user ranker stands for the variant.
    both = kept["ctr_user + ctr_pin"].nested_selection
    assert own["ctr_user + ctr_pin"].validation_log_loss >= own["ctr_user"].validation_log_loss
    assert both["kept"] == "ctr_user" and not both["kept_own"] and both["added"] == ["ctr_pin"]
    assert both["validation_log_loss"] == own["ctr_user + ctr_pin"].validation_log_loss
    assert both["previous_validation_log_loss"] == own["ctr_user"].validation_log_loss
    assert not np.array_equal(own["ctr_user + ctr_pin"].eval_scores, own["ctr_user"].eval_scores)
    np.testing.assert_array_equal(kept["ctr_user + ctr_pin"].eval_scores, own["ctr_user"].eval_scores)
    assert kept["ctr_user + ctr_pin"].ranker_dir == own["ctr_user"].ranker_dir
    assert kept["ctr_user + ctr_pin"].embedding_versions == {"ctr_user": "v1"}

    # The report: the step lift is exactly 0 with a CI of [0, 0], and it says why.
    comparison = compare("ctr", "CTR ranker", kept, "none", cfg)
    comparison.notes += nested_selection_notes(comparison.results)
    step = compare("ctr", "step", {k: kept[k] for k in ("ctr_user", "ctr_user + ctr_pin")}, "ctr_user", cfg)
    for metric in ("roc_auc", "pr_auc", "log_loss"):
        lift = step.deltas["ctr_user + ctr_pin"][metric]
        assert (lift.value, lift.lo, lift.hi) == (0.0, 0.0, 0.0)
    assert comparison.deltas["ctr_user"]["roc_auc"].lo > 0  # the family that helps shows its lift
    markdown = comparison_markdown(comparison)
    assert "validation kept the `ctr_user` ranker: ctr_pin did not help on held-out days" in markdown
    assert "validation kept the `ctr_user` ranker: ctr_user helped" in markdown
    record = comparison_record(comparison)
    decisions = {v["label"]: v["nested_selection"] for v in record["variants"]}
    assert decisions["ctr_user + ctr_pin"]["kept"] == "ctr_user" and decisions["ctr_user"]["kept_own"]


def test_nested_selection_keeps_the_smaller_ranker_through_a_chain(trained) -> None:
    """A variant whose predecessor itself kept an earlier ranker compares with, and may keep, that ranker."""
    from derm.experiments.ablation import nested_selection_notes, select_nested

    _, results = trained
    # The noise family on top of "none": validation switches it off, and so on down the chain.
    noise = dataclasses.replace(
        results["ctr_user + ctr_pin"], validation_log_loss=1.0 + results["none"].validation_log_loss
    )
    worse = dataclasses.replace(results["ctr_user"], validation_log_loss=results["none"].validation_log_loss)
    kept = select_nested(
        [("none", (), results["none"]), ("ctr_user", ("ctr_user",), worse), ("all", ("ctr_user", "ctr_pin"), noise)]
    )
    assert kept["ctr_user"].nested_selection["kept"] == "none"  # a tie keeps the smaller ranker
    assert kept["all"].nested_selection["kept"] == "none"
    np.testing.assert_array_equal(kept["all"].eval_scores, results["none"].eval_scores)
    notes = nested_selection_notes(list(kept.values()))
    assert "validation kept the `ctr_user` ranker (itself the `none` ranker)" in notes[1]


def test_nested_selection_refuses_variants_on_other_rows(trained) -> None:
    from derm.experiments.ablation import select_nested

    _, results = trained
    none, user = results["none"], results["ctr_user"]
    shifted = dataclasses.replace(user, validation_event_ids=user.validation_event_ids[::-1].copy())
    with pytest.raises(ValueError, match=r"'ctr_user' has other validation rows than 'none' \(row 0: event_id"):
        select_nested([("none", (), none), ("ctr_user", ("ctr_user",), shifted)])
    shorter = dataclasses.replace(user, eval_event_ids=user.eval_event_ids[1:])
    with pytest.raises(ValueError, match="other evaluation rows"):
        select_nested([("none", (), none), ("ctr_user", ("ctr_user",), shorter)])
    with pytest.raises(ValueError, match="does not contain the families"):
        select_nested([("ctr_user", ("ctr_user",), user), ("none", (), none)])


def test_a_variant_whose_grid_switched_its_families_off_never_displaces_the_smaller_ranker(trained) -> None:
    """Embedding dropout 1.0 chosen on validation: the ranker cannot see its families, so a lower validation
    log loss is another training run's noise (the real-shaped log's CVR `ctr_user` step of +0.0104 was one);
    nested selection keeps the smaller ranker and says why."""
    from derm.experiments.ablation import nested_selection_notes, select_nested
    from derm.training.downstream.ranker import load_ranker

    _, results = trained
    for label, families in VARIANTS:  # the flag is what the saved ranker's grid point says
        spec = load_ranker(results[label].ranker_dir).spec
        assert results[label].families_off == (bool(families) and spec.model.embedding_dropout >= 1.0)
    none = results["none"]
    off = dataclasses.replace(
        results["ctr_user"], families_off=True, validation_log_loss=none.validation_log_loss - 0.01
    )
    kept = select_nested([("none", (), none), ("ctr_user", ("ctr_user",), off)])
    decision = kept["ctr_user"].nested_selection
    assert decision["kept"] == "none" and not decision["kept_own"] and decision["families_off"]
    np.testing.assert_array_equal(kept["ctr_user"].eval_scores, none.eval_scores)
    assert "switched its families off (embedding dropout 1.0)" in nested_selection_notes(list(kept.values()))[0]
    on = dataclasses.replace(off, families_off=False)
    assert select_nested([("none", (), none), ("ctr_user", ("ctr_user",), on)])["ctr_user"].nested_selection["kept_own"]
