"""Reproduce the paper's downstream ablations, and measure what leakage would fake.

Paper: "Decoupled Entity Representation Learning for Pinterest Ads Ranking",
https://arxiv.org/abs/2509.04337. Reported (secondary summary): adding CTR-user,
then CTR-pin, then the CVR families to the downstream CTR model lifts ROC-AUC by
0.095%, 0.160%, 0.190%; a moving average with w = 0.8 beats overwriting.

Three experiments, each writing a markdown report and a PNG into ``<data_dir>/reports/``:

1. :func:`embedding_ablation`: for the CTR and the CVR ranker, training sets from
   feature services built in code (no embeddings / ctr_user / ctr_user + ctr_pin /
   all four families, at the promoted versions), same events and split; metrics
   with paired bootstrap CIs of the lift over "no embeddings";
2. :func:`aggregation_ablation`: the upstream refresh again with
   ``RefreshConfig(aggregation="overwrite")`` (a new model version), its snapshots
   published (not promoted), and the CTR ranker on all four overwrite families vs
   the promoted moving-average ones;
3. :func:`leakage_experiment`: the point-in-time CTR training set vs a copy joined
   to each entity's latest snapshot; the AUC inflation, and the leakage audit on both.

Example::

    paths = PlatformPaths.from_env()
    with online_store(paths):          # the overwrite snapshots are published to Redis too
        results = embedding_ablation(paths, AblationConfig())
        write_embedding_report(paths, results)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from materialization.catalog import Catalog
from pipeline.config import PlatformPaths
from training.downstream import (
    METRICS,
    DownstreamConfig,
    DownstreamResult,
    Estimate,
    bootstrap_metrics,
    run_downstream,
    train_on_training_set,
)
from training.downstream_data import default_window, ranker_service, service_families
from training.snapshot import FAMILIES

Log = Callable[[str], None] | None

EMBEDDING_VARIANTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("none", ()),
    ("ctr_user", ("ctr_user",)),
    ("ctr_user + ctr_pin", ("ctr_user", "ctr_pin")),
    ("all four", ("ctr_user", "ctr_pin", "cvr_user", "cvr_pin")),
)


@dataclass(frozen=True)
class AblationConfig:
    tasks: tuple[str, ...] = ("ctr", "cvr")  # rankers of the embedding ablation
    variants: tuple[tuple[str, tuple[str, ...]], ...] = EMBEDDING_VARIANTS  # (label, families); first = baseline
    train: DownstreamConfig = field(default_factory=DownstreamConfig)  # the same for every variant
    run_prefix: str = "ablation"  # runs are named <prefix>-<variant>


@dataclass
class Comparison:
    """Several rankers evaluated on the same rows, with paired bootstrap CIs."""

    task: str
    title: str
    labels: list[str]
    results: list[DownstreamResult]
    estimates: dict[str, dict[str, Estimate]]
    deltas: dict[str, dict[str, Estimate]]  # label -> metric -> (label - baseline)
    baseline: str
    notes: list[str] = field(default_factory=list)


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-").replace("--", "-") or "run"


def compare(task: str, title: str, results: dict[str, DownstreamResult], baseline: str, cfg: DownstreamConfig):
    """Paired bootstrap over rankers evaluated on identical rows (checked by event id)."""
    first = next(iter(results.values()))
    for label, result in results.items():
        if not np.array_equal(result.eval_event_ids, first.eval_event_ids):
            raise ValueError(f"{label}: evaluated on other rows than {next(iter(results))}; cannot pair")
    scores = {label: r.eval_scores for label, r in results.items()}
    estimates, deltas = bootstrap_metrics(
        first.eval_labels, scores, resamples=cfg.bootstrap, seed=cfg.seed, baseline=baseline
    )
    return Comparison(task, title, list(results), list(results.values()), estimates, deltas, baseline)


# --------------------------------------------------------------------------- 1. embeddings


def embedding_ablation(paths: PlatformPaths, cfg: AblationConfig | None = None, log: Log = None) -> list[Comparison]:
    """For each task: one ranker per embedding variant, same window, same split, paired CIs vs the first variant."""
    from pipeline.feast_repo import feature_store

    cfg = cfg or AblationConfig()
    store = feature_store()
    comparisons = []
    for task in cfg.tasks:
        window = default_window(paths, service_families(store, ranker_service(store, task)))
        results = {}
        for label, families in cfg.variants:
            results[label] = run_downstream(
                paths,
                task,
                cfg.train,
                families=list(families),
                window=window,
                run=f"{cfg.run_prefix}-{_slug(label)}",
                store=store,
                log=log,
            )
            if log:
                log(results[label].describe())
        baseline = cfg.variants[0][0]
        comparison = compare(task, f"{task.upper()} ranker: DERM embedding families", results, baseline, cfg.train)
        comparison.notes.append(_ordering_note(comparison, cfg.train.bootstrap))
        comparisons.append(comparison)
    return comparisons


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


# Overwriting replaces each vector by the day's fresh inference, so day-over-day drift is what the
# ablation measures: the gate's drift checks (tuned for the moving average) are relaxed for this
# version only; structure, finiteness, norms and coverage are checked as usual.
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

    from validation.gate import DEFAULT_THRESHOLDS_PATH

    raw = yaml.safe_load(DEFAULT_THRESHOLDS_PATH.read_text())
    raw["snapshot"] = {**raw.get("snapshot", {}), **OVERWRITE_DRIFT_OVERRIDES}
    path = reports_dir(paths) / "overwrite_gate_thresholds.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=True))
    return path


def publish_overwrite_version(paths: PlatformPaths, log: Log = None, thresholds_path: Path | None = None) -> str:
    """Run the upstream refresh with ``aggregation="overwrite"`` and publish (not promote) its snapshots.

    Returns the new model version (the same for DERM-CTR and DERM-CVR when both are new).
    """
    from materialization.publish import publish_snapshot
    from training.refresh import RefreshConfig, UpstreamConfig, refresh
    from training.snapshot import snapshot_dir

    cfg = UpstreamConfig(refresh=RefreshConfig(aggregation="overwrite"))
    manifests = refresh(paths, ("ctr", "cvr"), cfg)
    ordered = sorted((m for ms in manifests.values() for m in ms), key=lambda m: (m.snapshot_date, m.family))
    versions = {m.model_version for m in ordered}
    if len(versions) != 1:
        raise RuntimeError(f"overwrite refresh produced versions {sorted(versions)}; expected one shared version")
    if thresholds_path is None:
        thresholds_path = overwrite_thresholds(paths)
    for manifest in ordered:
        source = snapshot_dir(paths.snapshots_dir, manifest.family, manifest.model_version, manifest.snapshot_date)
        result = publish_snapshot(source, paths, thresholds_path=thresholds_path, promote_first_version=False)
        if log:
            log(result.summary().splitlines()[0])
    return versions.pop()


def aggregation_ablation(
    paths: PlatformPaths,
    cfg: AblationConfig | None = None,
    log: Log = None,
    overwrite_version: str | None = None,
    task: str = "ctr",
) -> Comparison:
    """The ranker on all four families: promoted (moving average) vs the overwrite version."""
    from pipeline.feast_repo import feature_store

    cfg = cfg or AblationConfig()
    overwrite_version = overwrite_version or publish_overwrite_version(paths, log)
    store = feature_store()
    promoted = dict(service_families(store, ranker_service(store, task)))
    families = tuple(FAMILIES)
    catalog = Catalog(paths.embeddings_offline_dir)

    def label_of(versions: dict[str, str]) -> str:
        manifests = catalog.manifests(families[0], versions[families[0]])
        kind = manifests[0].aggregation if manifests else "?"
        if kind == "ema" and manifests:
            kind = f"moving average w={manifests[0].ema_weight}"
        return f"{kind} ({versions[families[0]]})"

    overwrite = dict.fromkeys(families, overwrite_version)
    window = default_window(paths, [*promoted.items(), *overwrite.items()])
    results = {}
    for versions in (overwrite, promoted):
        label = label_of(versions)
        results[label] = run_downstream(
            paths,
            task,
            cfg.train,
            families=list(families),
            versions=versions,
            window=window,
            run=f"{cfg.run_prefix}-aggregation-{_slug(label)}",
            store=store,
            log=log,
        )
        if log:
            log(results[label].describe())
    baseline = next(iter(results))
    return compare(
        task, f"{task.upper()} ranker, all four families: embedding aggregation", results, baseline, cfg.train
    )


# --------------------------------------------------------------------------- 3. leakage


@dataclass
class LeakageExperiment:
    comparison: Comparison
    point_in_time_audit: Any  # validation.leakage.AuditReport
    leaky_audit: Any
    point_in_time_set: Path
    leaky_set: Path


def leakage_experiment(
    paths: PlatformPaths, cfg: DownstreamConfig | None = None, task: str = "ctr", log: Log = None
) -> LeakageExperiment:
    """Point-in-time vs leaky (latest snapshot) training set: AUC inflation and the audit of both."""
    from training.ranker import Ranker
    from validation.leakage import audit_training_set, build_leaky_training_set

    cfg = cfg or DownstreamConfig()
    honest = run_downstream(paths, task, cfg, run="leakage-point-in-time", log=log)
    leaky_path = honest.training_set.with_name("leakage-leaky.parquet")
    build_leaky_training_set(honest.training_set, leaky_path, paths)
    leaky_ranker: Ranker
    leaky_ranker, leaky = train_on_training_set(leaky_path, cfg, task=task, log=log)
    # What the leaky model really scores once served point-in-time features: same rows, honest columns.
    from training.downstream_data import read_training_set, split_table, split_time

    table, info = read_training_set(honest.training_set)
    window = (datetime.fromisoformat(info.window_start), datetime.fromisoformat(info.window_end))
    _, held_out = split_table(table, split_time(window, cfg.eval_days))
    served = {name: held_out.column(name) for name in held_out.column_names}
    results = {
        "point-in-time (honest offline estimate)": honest,
        "leaky, evaluated on leaky features (inflated)": leaky,
        "leaky model on point-in-time features (what serving sees)": _with_scores(leaky, leaky_ranker.score(served)),
    }
    comparison = compare(
        task, f"{task.upper()} ranker: point-in-time vs leaky training set", results, next(iter(results)), cfg
    )
    audits = audit_training_set(honest.training_set, paths), audit_training_set(leaky_path, paths)
    return LeakageExperiment(comparison, audits[0], audits[1], honest.training_set, leaky_path)


def _with_scores(result: DownstreamResult, scores: np.ndarray) -> DownstreamResult:
    from dataclasses import replace

    return replace(result, eval_scores=scores)


# --------------------------------------------------------------------------- reports


def reports_dir(paths: PlatformPaths) -> Path:
    directory = paths.data_dir / "reports"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _pct(delta: float, base: float) -> str:
    return f"{100 * delta / base:+.2f}%" if base and np.isfinite(base) else "n/a"


def comparison_markdown(comparison: Comparison) -> str:
    """A markdown table: metrics with 95% CIs, and the paired lift over the baseline."""
    base = comparison.estimates[comparison.baseline]
    lines = [
        f"### {comparison.title}",
        "",
        f"Evaluation rows: {comparison.results[0].rows_eval:,} (train {comparison.results[0].rows_train:,}); "
        f"95% CIs from a paired bootstrap of those rows; lift = variant - `{comparison.baseline}`.",
        "",
        "| variant | embedding versions | ROC-AUC [95% CI] | ROC-AUC lift [95% CI] | PR-AUC [95% CI] "
        "| PR-AUC lift [95% CI] | log loss [95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, result in zip(comparison.labels, comparison.results, strict=True):
        e, d = comparison.estimates[label], comparison.deltas[label]
        versions = ", ".join(f"{f}={v}" for f, v in result.embedding_versions.items()) or "-"
        roc_lift = f"{d['roc_auc'].value:+.4f} [{d['roc_auc'].lo:+.4f}, {d['roc_auc'].hi:+.4f}] " + (
            f"({_pct(d['roc_auc'].value, base['roc_auc'].value)})"
        )
        pr_lift = f"{d['pr_auc'].value:+.4f} [{d['pr_auc'].lo:+.4f}, {d['pr_auc'].hi:+.4f}] " + (
            f"({_pct(d['pr_auc'].value, base['pr_auc'].value)})"
        )
        lines.append(
            f"| {label} | {versions} | {e['roc_auc']} | {roc_lift} | {e['pr_auc']} | {pr_lift} | {e['log_loss']} |"
        )
    lines += ["", *[f"- {note}" for note in comparison.notes], ""]
    return "\n".join(lines)


def plot_comparisons(comparisons: list[Comparison], path: Path) -> Path:
    """Lift over the baseline with 95% CIs: one row per comparison, ROC-AUC and PR-AUC columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(comparisons), 2, figsize=(11, 2.2 + 1.1 * len(comparisons) * 2), squeeze=False)
    for row, comparison in enumerate(comparisons):
        for col, metric in enumerate(("roc_auc", "pr_auc")):
            ax = axes[row][col]
            deltas = [comparison.deltas[label][metric] for label in comparison.labels]
            y = np.arange(len(deltas))
            values = np.array([d.value for d in deltas])
            err = np.array([[d.value - d.lo for d in deltas], [d.hi - d.value for d in deltas]])
            ax.errorbar(values, y, xerr=err, fmt="o", capsize=4)
            ax.axvline(0.0, color="grey", lw=0.8, ls="--")
            ax.set_yticks(y, comparison.labels)
            ax.invert_yaxis()
            ax.set_title(
                f"{comparison.title}\n{metric.replace('_', '-').upper()} lift vs {comparison.baseline}", fontsize=9
            )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(paths: PlatformPaths, name: str, title: str, comparisons: list[Comparison], extra: str = "") -> Path:
    """``reports/<name>.md`` (tables) and ``reports/<name>.png`` (lift plot); returns the markdown path."""
    directory = reports_dir(paths)
    png = plot_comparisons(comparisons, directory / f"{name}.png")
    body = [f"# {title}", "", f"Generated {datetime.now().isoformat(timespec='seconds')}.", ""]
    body += [comparison_markdown(c) for c in comparisons]
    body += [extra, f"![{name}]({png.name})", ""]
    markdown = directory / f"{name}.md"
    markdown.write_text("\n".join(body))
    return markdown


__all__ = [
    "EMBEDDING_VARIANTS",
    "METRICS",
    "AblationConfig",
    "Comparison",
    "LeakageExperiment",
    "aggregation_ablation",
    "compare",
    "comparison_markdown",
    "embedding_ablation",
    "leakage_experiment",
    "plot_comparisons",
    "publish_overwrite_version",
    "write_report",
]
