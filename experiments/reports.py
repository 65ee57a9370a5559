"""Reports of the paper's experiments: paired comparisons of rankers, as markdown tables and lift plots.

Every experiment (:mod:`derm.experiments.ablation`, :mod:`derm.experiments.leakage`) evaluates
several rankers on identical rows; :func:`compare` pairs their scores in one bootstrap so a lift
comes with its own 95% confidence interval, and :func:`write_report` writes
``<data_dir>/reports/<name>.md`` and ``<name>.png``.

Example::

    comparison = compare("ctr", "CTR ranker: DERM embedding families", results, "none", cfg)
    write_report(paths, "embedding_ablation", "Embedding ablation", [comparison])
"""

from __future__ import annotations

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


__all__ = ["Comparison", "compare", "comparison_markdown", "plot_comparisons", "reports_dir", "write_report"]
