"""Reproduce the paper's downstream ablations, and measure what leakage would fake.

Paper: "Decoupled Entity Representation Learning for Pinterest Ads Ranking",
https://arxiv.org/abs/2509.04337. Reported (secondary summary): adding CTR-user,
then CTR-pin, then the CVR families to the downstream CTR model lifts ROC-AUC by
0.095%, 0.160%, 0.190%; a moving average with w = 0.8 beats overwriting.

Two experiments here (a third, :mod:`derm.experiments.leakage`, measures what leakage would fake),
each reported by :func:`derm.experiments.reports.write_report` into ``<data_dir>/reports/``:

1. :func:`embedding_ablation`: for the CTR and the CVR ranker, training sets from
   feature services built in code (no embeddings / ctr_user / ctr_user + ctr_pin /
   all four families, at the promoted versions), same events and split; metrics
   with paired bootstrap CIs of the lift over "no embeddings";
2. :func:`aggregation_ablation`: the paper's sweep of the aggregation -- overwrite and
   the moving average with w = 0.2, 0.5 and 0.8 -- each an upstream refresh with its
   own ``RefreshConfig`` (a model version of its own), its snapshots published (not
   promoted), and the CTR ranker on all four families of each version, same rows;

Example::

    paths, repo = PlatformPaths.from_env(), FeatureRepo()   # with Redis up: overwrite snapshots go online too
    comparisons = embedding_ablation(paths, repo, AblationConfig())
    write_report(paths, "embedding_ablation", "DERM embedding families", comparisons)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from derm.core.feast_repo import FeatureRepo
from derm.core.naming import FAMILIES
from derm.core.paths import PlatformPaths
from derm.core.snapshot import snapshot_dir
from derm.experiments.planted import PLANTED_KEY, PlantedUpstream, plant_upstream, planted_config
from derm.experiments.reports import Comparison, compare, reports_dir, skipped_comparison
from derm.materialization.catalog import Catalog
from derm.materialization.publish import publish_snapshot
from derm.training.downstream.leakage import audit_training_set
from derm.training.downstream.train import (
    DownstreamConfig,
    DownstreamResult,
    RankerSkipped,
    bootstrap_metrics,
    run_downstream,
)
from derm.training.downstream.training_sets import default_window, ranker_service, service_families
from derm.training.upstream.config import UpstreamConfig
from derm.training.upstream.refresh import refresh
from derm.training.upstream.train import VERSION_CONFIG_FILE, version_dir

Log = Callable[[str], None] | None

EMBEDDING_VARIANTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("none", ()),
    ("ctr_user", ("ctr_user",)),
    ("ctr_user + ctr_pin", ("ctr_user", "ctr_pin")),
    ("all four", ("ctr_user", "ctr_pin", "cvr_user", "cvr_pin")),
)


@dataclass(frozen=True)
class AblationConfig:
    objectives: tuple[str, ...] = ("ctr", "cvr")  # rankers of the embedding ablation
    variants: tuple[tuple[str, tuple[str, ...]], ...] = EMBEDDING_VARIANTS  # (label, families); first = baseline
    train: DownstreamConfig = field(default_factory=DownstreamConfig)  # the same for every variant
    run_prefix: str = "ablation"  # runs are named <prefix>-<variant>
    ema_weights: tuple[float | None, ...] = (None, 0.2, 0.5, 0.8)  # aggregation sweep; None = overwrite
    # [start, end) of the events every ranker sees (None: from the families' first snapshot to the end of the
    # log). A bounded window runs the ablation on a prefix of a long log whose later days are not published.
    window: tuple[datetime, datetime] | None = None
    # Nested model selection (:func:`select_nested`): a variant keeps the ranker selected for the variant
    # before it when that one has the lower validation log loss. False: every variant keeps its own ranker.
    nested_selection: bool = True
    # Run the leakage audit (embeddings, labels and conversion counts against the event log's oracles) on
    # the largest variant's training set: its rows and labels are every variant's, its families a superset.
    audit: bool = True


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-").replace("--", "-") or "run"


# --------------------------------------------------------------------------- 1. embeddings


def embedding_ablation(
    paths: PlatformPaths, repo: FeatureRepo, cfg: AblationConfig | None = None, log: Log = None
) -> list[Comparison]:
    """Per objective: one ranker per embedding variant, same window, same split, paired CIs vs the first variant.

    An objective the log gives nothing to learn (a single label class, too few labelled days:
    :class:`RankerSkipped`) is reported as a skipped comparison with the reason, and the others go on.
    With ``cfg.audit`` the largest variant's training set (every variant's rows and labels, a superset of
    the families) is audited against the oracles (:func:`audit_training_set`); the result is in
    ``comparison.audit`` / ``comparison.audit_ok`` and in the report.
    """
    cfg = cfg or AblationConfig()
    store = repo.store()
    comparisons = []
    for objective in cfg.objectives:
        title = f"{objective.upper()} ranker: DERM embedding families"
        try:
            comparison = _embedding_comparison(paths, store, cfg, objective, title, log)
        except RankerSkipped as exc:
            if log:
                log(f"{objective} ranker skipped: {exc}")
            comparison = skipped_comparison(objective, title, str(exc))
        comparisons.append(comparison)
    return comparisons


def _embedding_comparison(
    paths: PlatformPaths, store: Any, cfg: AblationConfig, objective: str, title: str, log: Log
) -> Comparison:
    window = _window(paths, cfg, service_families(store, ranker_service(store, objective)))
    results = {}
    for label, families in cfg.variants:
        results[label] = run_downstream(
            paths,
            objective,
            cfg.train,
            families=list(families),
            window=window,
            run=f"{cfg.run_prefix}-{_slug(label)}",
            store=store,
            log=log,
        )
        if log:
            log(results[label].describe())
    audited = results[cfg.variants[-1][0]].training_set  # before nested selection: the largest variant's own
    if cfg.nested_selection:
        results = select_nested([(label, families, results[label]) for label, families in cfg.variants])
        if log:
            for note in nested_selection_notes(list(results.values())):
                log(f"{objective}: {note}")
    comparison = compare(objective, title, results, cfg.variants[0][0], cfg.train)
    comparison.notes += nested_selection_notes(comparison.results)
    comparison.notes.append(_ordering_note(comparison, cfg.train.bootstrap))
    if cfg.audit:
        report = audit_training_set(audited, paths, max_reported=5)
        comparison.audit, comparison.audit_ok = report.describe(limit=5), report.ok
        if log:
            log(f"{objective}: {comparison.audit}")
    return comparison


def _same_rows(what: str, label: str, ids: np.ndarray, previous: str, previous_ids: np.ndarray) -> None:
    """Raise unless ``ids`` and ``previous_ids`` are the same event ids in the same order."""
    if np.array_equal(ids, previous_ids):
        return
    if len(ids) != len(previous_ids):
        detail = f"{len(ids):,} rows vs {len(previous_ids):,}"
    else:
        first = int(np.flatnonzero(ids != previous_ids)[0])
        detail = f"row {first}: event_id {ids[first]} vs {previous_ids[first]}"
    raise ValueError(
        f"nested selection: variant {label!r} has other {what} rows than {previous!r} ({detail}); nested "
        "variants must be built from the same events with the same split"
    )


def select_nested(
    variants: Sequence[tuple[str, Sequence[str], DownstreamResult]],
) -> dict[str, DownstreamResult]:
    """Nested model selection over variants whose families grow (none ⊂ ctr_user ⊂ ...), on validation only.

    Each variant's candidates are its own selected ranker (its grid, calibration, "no harm" check) and the
    ranker already selected for the variant before it; the one with the lower validation log loss (as it
    scores: calibrated, or the base-rate fallback) is kept, the smaller on a tie. A variant whose own grid
    switched its families off (embedding dropout 1.0, ``result.families_off``) never displaces the smaller
    ranker, whatever its validation log loss: it is another training run of a ranker that cannot see the
    families, and a lower loss is seed noise. When the smaller is kept, the variant's evaluation scores
    *are* that ranker's, so its step lift is exactly 0. The evaluation rows are never looked at to decide.
    It is what a gate that ships a family only when it helps on held-out days does.

    Args:
        variants: ``(label, families, result)`` in nesting order; each variant's families include the
            previous variant's, and every result shares the validation and evaluation rows (same event
            ids, same order).

    Returns:
        label -> the kept result; each carries its decision in ``result.nested_selection``.

    Raises:
        ValueError: the variants are not nested, their validation or evaluation rows differ, or a
            variant has no validation rows.

    Example::

        kept = select_nested([("none", (), none), ("ctr_user", ("ctr_user",), user)])
        kept["ctr_user"].nested_selection["kept"]   # "none" when ctr_user did not help on validation
    """
    selected: dict[str, DownstreamResult] = {}
    previous: tuple[str, tuple[str, ...], DownstreamResult] | None = None
    for label, families, result in variants:
        families = tuple(families)
        decision: dict[str, Any] = {
            "variant": label,
            "families": list(families),
            "validation_rows": len(result.validation_event_ids),
            "validation_log_loss": result.validation_log_loss,
            "own_ranker_dir": str(result.ranker_dir) if result.ranker_dir else None,
        }
        if previous is None:
            decision.update(compared_with=None, added=list(families), kept=label, kept_own=True)
            selected[label] = dataclasses.replace(result, nested_selection=decision)
            previous = (label, families, selected[label])
            continue
        previous_label, previous_families, before = previous
        if not set(previous_families) <= set(families):
            raise ValueError(
                f"nested selection: variant {label!r} {list(families)} does not contain the families of "
                f"{previous_label!r} {list(previous_families)}"
            )
        _same_rows("validation", label, result.validation_event_ids, previous_label, before.validation_event_ids)
        _same_rows("evaluation", label, result.eval_event_ids, previous_label, before.eval_event_ids)
        own, other = result.validation_log_loss, before.validation_log_loss
        if not (len(result.validation_event_ids) and np.isfinite(own) and np.isfinite(other)):
            raise ValueError(
                f"nested selection: {label!r} or {previous_label!r} has no validation log loss (no validation "
                "rows); train with validation_days >= 1 or turn nested selection off"
            )
        # A tie keeps the smaller ranker (the families did not help); so does a ranker that switched them off.
        keep_own = bool(own < other) and not result.families_off
        decision.update(
            families_off=result.families_off,
            compared_with=previous_label,
            added=[f for f in families if f not in previous_families],
            previous_validation_log_loss=other,
            kept=label if keep_own else before.nested_selection["kept"],
            kept_own=keep_own,
            kept_ranker_dir=str(result.ranker_dir if keep_own else before.ranker_dir),
        )
        # The smaller ranker kept: its result (scores, metrics, versions, ranker folder) stands for this variant.
        kept = result if keep_own else dataclasses.replace(before, run=result.run)
        selected[label] = dataclasses.replace(kept, nested_selection=decision)
        previous = (label, families, selected[label])
    return selected


def nested_selection_notes(results: Sequence[DownstreamResult]) -> list[str]:
    """One report line per nested step: which ranker validation kept, and on which validation log losses."""
    notes = []
    for result in results:
        decision = result.nested_selection
        if not decision or decision.get("compared_with") is None:
            continue
        label, previous, added = decision["variant"], decision["compared_with"], " + ".join(decision["added"])
        losses = (
            f"validation log loss {decision['validation_log_loss']:.4f} with {added} vs "
            f"{decision['previous_validation_log_loss']:.4f} without, on {decision['validation_rows']:,} rows"
        )
        if decision["kept_own"]:
            notes.append(f"`{label}`: validation kept the `{label}` ranker: {added} helped on held-out days ({losses})")
        elif decision.get("families_off"):
            notes.append(
                f"`{label}`: validation kept the `{previous}` ranker: the `{label}` ranker's grid switched its "
                f"families off (embedding dropout 1.0), so it cannot carry {added}, whatever its validation log "
                f"loss ({losses}); its eval scores are the `{previous}` ranker's, so this step's lift is exactly 0"
            )
        else:
            origin = "" if decision["kept"] == previous else f" (itself the `{decision['kept']}` ranker)"
            notes.append(
                f"`{label}`: validation kept the `{previous}` ranker{origin}: {added} did not help on held-out "
                f"days ({losses}); its eval scores are that ranker's, so this step's lift is exactly 0"
            )
    return notes


def _window(paths: PlatformPaths, cfg: AblationConfig, families: list[tuple[str, str]]) -> tuple[datetime, datetime]:
    """``cfg.window`` clipped to start no earlier than every family's first snapshot, or the default window."""
    default = default_window(paths, families)
    if cfg.window is None:
        return default
    start, end = max(cfg.window[0], default[0]), min(cfg.window[1], default[1])
    if start >= end:
        raise ValueError(f"ablation window {cfg.window[0]} .. {cfg.window[1]} is outside the data ({default})")
    return start, end


def _ordering_note(comparison: Comparison, resamples: int = 1000) -> str:
    values = [comparison.estimates[label]["roc_auc"].value for label in comparison.labels]
    ordered = all(a < b for a, b in pairwise(values))
    expected = " < ".join(comparison.labels)
    verdict = "holds" if ordered else "does NOT hold"
    steps = []
    labels = comparison.results[0].eval_labels
    for (previous, before), (label, after) in pairwise(zip(comparison.labels, comparison.results, strict=True)):
        _, deltas = bootstrap_metrics(
            labels, {previous: before.eval_scores, label: after.eval_scores}, resamples=resamples, baseline=previous
        )
        steps.append(f"{previous} -> {label}: ROC-AUC {deltas[label]['roc_auc']}")
    return f"paper's ordering {expected} on ROC-AUC point estimates {verdict}; paired step lifts: {'; '.join(steps)}"


# --------------------------------------------------------------------------- 2. aggregation


# Overwriting replaces each vector by the day's fresh inference, and a small w comes close to it, so
# day-over-day drift is what the sweep measures: the gate's drift checks (tuned for the promoted moving
# average) are relaxed for the sweep's versions only; structure, finiteness, norms and coverage are checked
# as usual. The versions are published, never promoted.
OVERWRITE_DRIFT_OVERRIDES = {
    "min_median_cosine_to_previous": -1.0,
    "low_cosine_to_previous": -1.0,
    "max_fraction_below_low_cosine": 1.0,
    "max_dimension_mean_shift": 1e9,
    "dimension_std_ratio_min": 0.0,
    "dimension_std_ratio_max": 1e9,
}


def overwrite_thresholds(paths: PlatformPaths) -> Path:
    """The default gate thresholds with the drift checks relaxed (see :data:`OVERWRITE_DRIFT_OVERRIDES`)."""
    import yaml

    from derm.validation.gate import DEFAULT_THRESHOLDS_PATH

    raw = yaml.safe_load(DEFAULT_THRESHOLDS_PATH.read_text())
    raw["snapshot"] = {**raw.get("snapshot", {}), **OVERWRITE_DRIFT_OVERRIDES}
    path = reports_dir(paths) / "overwrite_gate_thresholds.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=True))
    return path


def aggregation_config(ema_weight: float | None, base: UpstreamConfig | None = None) -> UpstreamConfig:
    """The upstream config of one point of the sweep (``None``: overwrite): ``base`` (default: the default
    config) with only its aggregation changed, so the point re-uses ``base``'s daily weights."""
    base = base or UpstreamConfig()
    if ema_weight is None:
        refresh_cfg = dataclasses.replace(base.refresh, aggregation="overwrite")
    else:
        refresh_cfg = dataclasses.replace(base.refresh, aggregation="ema", ema_weight=ema_weight)
    return dataclasses.replace(base, refresh=refresh_cfg)


def promoted_upstream_config(paths: PlatformPaths) -> UpstreamConfig | None:
    """The upstream config of the promoted DERM-CTR version (its ``config.json``), or None when no version
    trained here is promoted (nothing published yet, or snapshots imported from elsewhere).

    The sweep varies the aggregation of what is promoted: a user who refreshes with more epochs, another
    model or other features must see the sweep of that upstream, not of the defaults.
    """
    version = Catalog(paths.embeddings_offline_dir).read_state().promoted.get("ctr_user")
    config_file = version_dir(paths.models_dir, "ctr", version) / VERSION_CONFIG_FILE if version else None
    if config_file is None or not config_file.exists():
        return None
    payload = json.loads(config_file.read_text())
    if PLANTED_KEY in payload:  # the generator's tastes, not a trained model: see promoted_planted_config
        return None
    return UpstreamConfig.from_version_payload(payload)


def promoted_planted_config(paths: PlatformPaths) -> PlantedUpstream | None:
    """The planted version (:mod:`derm.experiments.planted`) promoted for DERM-CTR, or None."""
    version = Catalog(paths.embeddings_offline_dir).read_state().promoted.get("ctr_user")
    return planted_config(paths, "ctr", version) if version else None


def publish_aggregation_version(
    paths: PlatformPaths,
    repo: FeatureRepo,
    ema_weight: float | None,
    log: Log = None,
    thresholds_path: Path | None = None,
    base: UpstreamConfig | None = None,
    planted: PlantedUpstream | None = None,
) -> str:
    """Run the upstream refresh of one sweep point and publish (not promote) its snapshots not yet published.

    ``base``: the upstream whose aggregation the point changes (default: the default config).
    ``planted``: a planted version whose aggregation the point changes instead (its snapshots are planted,
    not trained: :func:`derm.experiments.planted.plant_upstream`).
    Returns the model version (the same for DERM-CTR and DERM-CVR when both are new).
    """
    if planted is not None:
        aggregation = ("overwrite", planted.upstream.refresh.ema_weight) if ema_weight is None else ("ema", ema_weight)
        manifests = plant_upstream(paths, planted.with_aggregation(*aggregation))
    else:
        manifests = refresh(paths, ("ctr", "cvr"), aggregation_config(ema_weight, base))
    ordered = sorted((m for ms in manifests.values() for m in ms), key=lambda m: (m.snapshot_date, m.family))
    versions = {m.model_version for m in ordered}
    if len(versions) != 1:
        raise RuntimeError(f"aggregation refresh produced versions {sorted(versions)}; expected one shared version")
    if thresholds_path is None:
        thresholds_path = overwrite_thresholds(paths)
    catalog = Catalog(paths.embeddings_offline_dir)
    for manifest in ordered:
        if catalog.published(manifest.family, manifest.model_version, manifest.snapshot_date) is not None:
            continue  # e.g. the promoted w = 0.8 version: already published by the pipeline
        source = snapshot_dir(paths.snapshots_dir, manifest.family, manifest.model_version, manifest.snapshot_date)
        result = publish_snapshot(
            source, paths, repo=repo, thresholds_path=thresholds_path, promote_first_version=False
        )
        if log:
            log(result.summary().splitlines()[0])
    return versions.pop()


def publish_overwrite_version(
    paths: PlatformPaths, repo: FeatureRepo, log: Log = None, thresholds_path: Path | None = None
) -> str:
    """:func:`publish_aggregation_version` of the overwrite point."""
    return publish_aggregation_version(paths, repo, None, log, thresholds_path)


def aggregation_label(ema_weight: float | None) -> str:
    return "overwrite" if ema_weight is None else f"moving average w={ema_weight:g}"


def aggregation_ablation(
    paths: PlatformPaths,
    repo: FeatureRepo,
    cfg: AblationConfig | None = None,
    log: Log = None,
    overwrite_version: str | None = None,
    objective: str = "ctr",
) -> Comparison:
    """The ranker on all four families for each point of ``cfg.ema_weights``, paired against the first.

    ``overwrite_version``: an already published overwrite version to use instead of refreshing one.
    """
    cfg = cfg or AblationConfig()
    planted = promoted_planted_config(paths)
    base = promoted_upstream_config(paths)
    if log and planted is not None:
        log("aggregation sweep: the promoted DERM-CTR version is planted; every point plants the generator's tastes")
    elif log and base is None:
        log("aggregation sweep: no promoted DERM-CTR version trained here; sweeping the default upstream config")
    versions: dict[str, str] = {}
    for weight in cfg.ema_weights:
        if weight is None and overwrite_version is not None:
            versions[aggregation_label(weight)] = overwrite_version
            continue
        if log:
            log(f"aggregation sweep: {aggregation_label(weight)}")
        versions[aggregation_label(weight)] = publish_aggregation_version(
            paths, repo, weight, log, base=base, planted=planted
        )
    store = repo.store()
    families = tuple(FAMILIES)
    window = _window(paths, cfg, [(family, version) for version in versions.values() for family in families])
    title = f"{objective.upper()} ranker, all four families: embedding aggregation"
    results = {}
    try:
        for label, version in versions.items():
            results[f"{label} ({version})"] = run_downstream(
                paths,
                objective,
                cfg.train,
                families=list(families),
                versions=dict.fromkeys(families, version),
                window=window,
                run=f"{cfg.run_prefix}-aggregation-{_slug(label)}",
                store=store,
                log=log,
            )
            if log:
                log(results[f"{label} ({version})"].describe())
    except RankerSkipped as exc:  # the same rows for every point of the sweep: one skip skips them all
        if log:
            log(f"{objective} ranker skipped: {exc}")
        return skipped_comparison(objective, title, str(exc))
    comparison = compare(objective, title, results, next(iter(results)), cfg.train)
    comparison.notes.append(
        "the sweep's versions are published with the gate's drift checks relaxed (overwrite and small w move "
        "embeddings fast by design) and never promoted"
    )
    return comparison


__all__ = [
    "EMBEDDING_VARIANTS",
    "AblationConfig",
    "aggregation_ablation",
    "aggregation_config",
    "embedding_ablation",
    "nested_selection_notes",
    "publish_aggregation_version",
    "publish_overwrite_version",
    "select_nested",
]
