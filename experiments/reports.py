"""Reports of the paper's experiments: paired comparisons of rankers, as markdown tables and lift plots.

Every experiment (:mod:`derm.experiments.ablation`, :mod:`derm.experiments.leakage`) evaluates
several rankers on identical rows; :func:`compare` pairs their scores in one bootstrap so a lift
comes with its own 95% confidence interval, and :func:`write_report` writes
``<data_dir>/reports/<name>.md``, ``<name>.png`` (lifts) and ``<name>_calibration.png`` (reliability
diagram: observed label rate against predicted probability, per ranker). Every table sets each ranker's
log loss against the base rate's (the training label rate predicted for every row).
:func:`upstream_quality_markdown` and :func:`plot_upstream_quality` show the daily upstream quality
figures recorded in the snapshot manifests.

Example::

    comparison = compare("ctr", "CTR ranker: DERM embedding families", results, "none", cfg)
    write_report(paths, "embedding_ablation", "Embedding ablation", [comparison])
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from derm.core.paths import PlatformPaths
from derm.training.downstream.train import DownstreamConfig, DownstreamResult, Estimate, bootstrap_metrics


@dataclass
class Comparison:
    """Several rankers evaluated on the same rows, with paired bootstrap CIs."""

    objective: str
    title: str
    labels: list[str]
    results: list[DownstreamResult]
    estimates: dict[str, dict[str, Estimate]]
    deltas: dict[str, dict[str, Estimate]]  # label -> metric -> (label - baseline)
    baseline: str
    notes: list[str] = field(default_factory=list)
    # Why no ranker was compared (derm.training.downstream.train.RankerSkipped: the log gives the objective
    # a single label class or too few labelled days); empty when the rankers were trained.
    skipped: str = ""
    # The leakage audit of the rows compared (derm.training.downstream.leakage.audit_training_set: every
    # embedding, label and conversion count against the oracles); empty when not audited.
    audit: str = ""
    audit_ok: bool | None = None


def skipped_comparison(objective: str, title: str, reason: str) -> Comparison:
    """A comparison whose rankers were skipped with ``reason``: reported as such, never a crash."""
    return Comparison(objective, title, [], [], {}, {}, "", notes=[], skipped=reason)


def compare(objective: str, title: str, results: dict[str, DownstreamResult], baseline: str, cfg: DownstreamConfig):
    """Paired bootstrap over rankers evaluated on identical rows (checked by event id)."""
    first = next(iter(results.values()))
    for label, result in results.items():
        if not np.array_equal(result.eval_event_ids, first.eval_event_ids):
            raise ValueError(f"{label}: evaluated on other rows than {next(iter(results))}; cannot pair")
    scores = {label: r.eval_scores for label, r in results.items()}
    estimates, deltas = bootstrap_metrics(
        first.eval_labels, scores, resamples=cfg.bootstrap, seed=cfg.seed, baseline=baseline
    )
    return Comparison(objective, title, list(results), list(results.values()), estimates, deltas, baseline)


def reports_dir(paths: PlatformPaths) -> Path:
    directory = paths.data_dir / "reports"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _pct(delta: float, base: float) -> str:
    return f"{100 * delta / base:+.2f}%" if base and np.isfinite(base) else "n/a"


def comparison_markdown(comparison: Comparison) -> str:
    """A markdown table: metrics with 95% CIs, and the paired lift over the baseline."""
    if comparison.skipped:
        return "\n".join([f"### {comparison.title}", "", f"**Skipped**: {comparison.skipped}", ""])
    base = comparison.estimates[comparison.baseline]
    lines = [
        f"### {comparison.title}",
        "",
        f"Evaluation rows: {comparison.results[0].rows_eval:,} (train {comparison.results[0].rows_train:,}); "
        f"95% CIs from a paired bootstrap of those rows; lift = variant - `{comparison.baseline}`.",
        "",
        "| variant | embedding versions | ROC-AUC [95% CI] | ROC-AUC lift [95% CI] | PR-AUC [95% CI] "
        "| PR-AUC lift [95% CI] | log loss [95% CI] | log loss - base rate's [95% CI] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, result in zip(comparison.labels, comparison.results, strict=True):
        e, d = comparison.estimates[label], comparison.deltas[label]
        versions = ", ".join(f"{f}={v}" for f, v in result.embedding_versions.items()) or "-"
        decision = result.nested_selection
        if decision and not decision.get("kept_own", True):
            versions += f" (the `{decision['kept']}` ranker, kept by validation)"
        roc_lift = f"{d['roc_auc'].value:+.4f} [{d['roc_auc'].lo:+.4f}, {d['roc_auc'].hi:+.4f}] " + (
            f"({_pct(d['roc_auc'].value, base['roc_auc'].value)})"
        )
        pr_lift = f"{d['pr_auc'].value:+.4f} [{d['pr_auc'].lo:+.4f}, {d['pr_auc'].hi:+.4f}] " + (
            f"({_pct(d['pr_auc'].value, base['pr_auc'].value)})"
        )
        metrics = result.metrics
        if "log_loss_vs_base_rate" in metrics:
            gap = metrics["log_loss_vs_base_rate"]
            vs_base = (
                f"{gap.value:+.4f} [{gap.lo:+.4f}, {gap.hi:+.4f}] (base {metrics['base_rate_log_loss'].value:.4f})"
            )
        else:
            vs_base = "n/a"
        lines.append(
            f"| {label} | {versions} | {e['roc_auc']} | {roc_lift} | {e['pr_auc']} | {pr_lift} | {e['log_loss']} "
            f"| {vs_base} |"
        )
    lines += ["", *[f"- {note}" for note in [*comparison.notes, _no_harm_note(comparison)] if note], ""]
    if comparison.audit:
        lines += ["Leakage audit (labels respect conversion time; embeddings are the snapshots known then):", ""]
        lines += ["```", comparison.audit, "```", ""]
    return "\n".join(lines)


def _no_harm_note(comparison: Comparison) -> str:
    judged = [
        (label, r)
        for label, r in zip(comparison.labels, comparison.results, strict=True)
        if r.metrics.get("base_rate_log_loss")
    ]
    if not judged:
        return ""
    worse = [label for label, r in judged if not r.no_harm]
    rate = judged[0][1].base_rate
    if not worse:
        return f"every ranker's eval log loss is at or below the base rate's (training label rate {rate:.4f})"
    return f"eval log loss ABOVE the base rate's (training label rate {rate:.4f}) for: {', '.join(worse)}"


def reliability_curve(labels: np.ndarray, scores: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """``(mean predicted (K,), observed rate (K,))`` over ``bins`` equal-count bins of the scores."""
    order = np.argsort(scores, kind="stable")
    groups = [g for g in np.array_split(order, bins) if len(g)]
    predicted = np.array([float(np.mean(scores[g])) for g in groups])
    observed = np.array([float(np.mean(labels[g])) for g in groups])
    return predicted, observed


def plot_calibration(comparisons: list[Comparison], path: Path, bins: int = 10) -> Path | None:
    """Reliability diagram: one panel per comparison, observed label rate vs mean predicted probability.

    Skipped comparisons have no panel; ``None`` (nothing drawn) when every comparison was skipped.
    """
    comparisons = [c for c in comparisons if not c.skipped]
    if not comparisons:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(comparisons), figsize=(5.0 * len(comparisons), 4.6), squeeze=False)
    for ax, comparison in zip(axes[0], comparisons, strict=True):
        top = 0.0
        for label, result in zip(comparison.labels, comparison.results, strict=True):
            predicted, observed = reliability_curve(result.eval_labels, result.eval_scores, bins)
            ax.plot(predicted, observed, marker="o", ms=3, label=label)
            top = max(top, float(predicted.max()), float(observed.max()))
        base = comparison.results[0].base_rate
        if np.isfinite(base):
            ax.axhline(base, color="grey", lw=0.8, ls=":", label=f"training label rate {base:.3f}")
        top = min(1.0, top * 1.1 + 0.01)
        ax.plot([0, top], [0, top], color="black", lw=0.8, ls="--")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_xlabel("mean predicted probability (equal-count bins)")
        ax.set_ylabel("observed label rate")
        ax.set_title(f"{comparison.title}\nreliability diagram", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def quality_rows(snapshots_dir: Path, family: str, version: str) -> list[dict]:
    """The ``quality`` figures of every snapshot of (family, version) that has them, by day."""
    from derm.core.snapshot import list_snapshots, read_manifest

    rows = []
    for directory in list_snapshots(snapshots_dir, family):
        manifest = read_manifest(directory)
        if manifest.model_version == version and manifest.quality and manifest.quality.get("evaluated_on"):
            rows.append({"day": manifest.snapshot_date.isoformat(), **manifest.quality})
    return rows


def upstream_quality_markdown(snapshots_dir: Path, versions: dict[str, str]) -> str:
    """A table per objective: next-day ROC-AUC and recall@k of the embeddings vs popularity and yesterday's."""

    def fmt(value: object) -> str:
        return "-" if value is None else f"{value:.4f}"

    lines = ["## Upstream quality (next-day events, recorded in every manifest)", ""]
    for family, version in versions.items():
        if not family.endswith("_user"):
            continue  # the pair's figures are the same in the user and the Pin manifest
        rows = quality_rows(snapshots_dir, family, version)
        if not rows:
            continue
        k = rows[0]["k"]
        flagged = [r["day"] for r in rows if r.get("no_better_than_popularity")]
        lines += [
            f"### {family.split('_')[0].upper()} {version}",
            "",
            f"| snapshot day | rows | ROC-AUC | popularity | yesterday's | recall@{k} | popularity | yesterday's |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['day']} | {r['rows']:,} | {fmt(r['roc_auc'])} | {fmt(r['roc_auc_popularity'])} "
                f"| {fmt(r['roc_auc_previous'])} | {fmt(r['recall_at_k'])} | {fmt(r['recall_at_k_popularity'])} "
                f"| {fmt(r['recall_at_k_previous'])} |"
            )
        means = {
            m: np.nanmean([np.nan if r[m] is None else r[m] for r in rows])
            for m in ("roc_auc", "roc_auc_popularity", "recall_at_k", "recall_at_k_popularity")
        }
        lines += [
            "",
            f"- mean over days: ROC-AUC {means['roc_auc']:.4f} vs popularity {means['roc_auc_popularity']:.4f}; "
            f"recall@{k} {means['recall_at_k']:.4f} vs popularity {means['recall_at_k_popularity']:.4f}",
            f"- flagged no better than popularity on: {', '.join(flagged) if flagged else 'no day'}",
            "",
        ]
    return "\n".join(lines)


def plot_upstream_quality(snapshots_dir: Path, versions: dict[str, str], path: Path) -> Path | None:
    """ROC-AUC and recall@k over snapshot days, per objective: embeddings, popularity, yesterday's embeddings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates
    import matplotlib.pyplot as plt

    series = {f: quality_rows(snapshots_dir, f, v) for f, v in versions.items() if f.endswith("_user")}
    series = {f: rows for f, rows in series.items() if rows}
    if not series:
        return None
    fig, axes = plt.subplots(len(series), 2, figsize=(11, 3.2 * len(series)), squeeze=False)
    for row, (family, rows) in enumerate(series.items()):
        # Real dates, so matplotlib spaces the ticks: one label per day is unreadable past a few weeks.
        days = [np.datetime64(r["day"]) for r in rows]
        for col, metric in enumerate(("roc_auc", "recall_at_k")):
            ax = axes[row][col]
            for suffix, name in (("", "embeddings"), ("_popularity", "popularity"), ("_previous", "yesterday's")):
                values = [np.nan if r[metric + suffix] is None else r[metric + suffix] for r in rows]
                ax.plot(days, values, marker="o", ms=3, label=name)
            ax.set_title(f"{family.split('_')[0].upper()} {versions[family]}: next-day {metric}", fontsize=9)
            locator = matplotlib.dates.AutoDateLocator(maxticks=10)
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(matplotlib.dates.ConciseDateFormatter(locator))
            ax.tick_params(axis="x", labelsize=7)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_comparisons(comparisons: list[Comparison], path: Path) -> Path | None:
    """Lift over the baseline with 95% CIs: one row per comparison, ROC-AUC and PR-AUC columns.

    Skipped comparisons have no row; ``None`` (nothing drawn) when every comparison was skipped.
    """
    comparisons = [c for c in comparisons if not c.skipped]
    if not comparisons:
        return None
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


def comparison_record(comparison: Comparison) -> dict:
    """The comparison as JSON-ready data: per variant its run, ranker folder, metrics, lift over the
    baseline and (nested ablations) the validation decision of :func:`derm.experiments.ablation.select_nested`."""
    variants = []
    for label, result in zip(comparison.labels, comparison.results, strict=True):
        variants.append(
            {
                "label": label,
                "run": result.run,
                "ranker_dir": str(result.ranker_dir) if result.ranker_dir else None,
                "embedding_versions": result.embedding_versions,
                "rows": {"train": result.rows_train, "validation": result.rows_validation, "eval": result.rows_eval},
                "validation_log_loss": result.validation_log_loss,
                "metrics": {k: vars(v) for k, v in comparison.estimates[label].items()},
                "lift": {k: vars(v) for k, v in comparison.deltas.get(label, {}).items()},
                "nested_selection": result.nested_selection or None,
            }
        )
    return {
        "objective": comparison.objective,
        "title": comparison.title,
        "skipped": comparison.skipped or None,
        "baseline": comparison.baseline,
        "variants": variants,
        "notes": comparison.notes,
        "audit": {"ok": comparison.audit_ok, "report": comparison.audit} if comparison.audit else None,
    }


def write_report(paths: PlatformPaths, name: str, title: str, comparisons: list[Comparison], extra: str = "") -> Path:
    """``reports/<name>.md`` (tables), ``<name>.json`` (:func:`comparison_record` of each comparison),
    ``<name>.png`` (lift plot) and ``<name>_calibration.png`` (reliability diagram); returns the markdown path."""
    directory = reports_dir(paths)
    png = plot_comparisons(comparisons, directory / f"{name}.png")
    calibration = plot_calibration(comparisons, directory / f"{name}_calibration.png")
    for drawn, stale in ((png, f"{name}.png"), (calibration, f"{name}_calibration.png")):
        if drawn is None:  # every ranker skipped: no plot, and none of an earlier run left beside this report
            (directory / stale).unlink(missing_ok=True)
    body = [f"# {title}", "", f"Generated {datetime.now().isoformat(timespec='seconds')}.", ""]
    body += [comparison_markdown(c) for c in comparisons]
    body += [extra]
    body += [f"![{name}]({png.name})", ""] if png is not None else []
    body += [f"![{name} calibration]({calibration.name})", ""] if calibration is not None else []
    record = {"title": title, "comparisons": [comparison_record(c) for c in comparisons]}
    (directory / f"{name}.json").write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    markdown = directory / f"{name}.md"
    markdown.write_text("\n".join(body))
    return markdown


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


__all__ = [
    "Comparison",
    "compare",
    "comparison_markdown",
    "comparison_record",
    "plot_calibration",
    "plot_comparisons",
    "plot_upstream_quality",
    "quality_rows",
    "reliability_curve",
    "reports_dir",
    "skipped_comparison",
    "upstream_quality_markdown",
    "write_report",
]
