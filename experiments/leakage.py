"""What leakage would fake: a point-in-time training set against one joined to each entity's latest snapshot.

Paper: "Decoupled Entity Representation Learning for Pinterest Ads Ranking",
https://arxiv.org/abs/2509.04337 -- decoupling only works when training sees, for
every labelled event, the embedding that existed then. :func:`leakage_experiment`
trains the same ranker on an honest and on a deliberately leaky training set,
reports the AUC inflation, what the leaky model really scores once served
point-in-time features, and runs the leakage audit on both sets.

Labels have times too (issue 17): a third set takes every conversion as known at its
click (CVR labels past the set's cut-off, ``conversions_1d`` counted on the click's
day). The audit must refuse it (:attr:`LeakageExperiment.label_leaky_audit`).

Example::

    paths, repo = PlatformPaths.from_env(), FeatureRepo()
    experiment = leakage_experiment(paths, repo, DownstreamConfig(), "ctr")
    write_report(paths, "leakage_experiment", "Leakage", [experiment.comparison])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np

from derm.core.feast_repo import FeatureRepo
from derm.core.paths import PlatformPaths
from derm.core.training_set import read_training_set
from derm.experiments.reports import Comparison, compare
from derm.training.downstream.leakage import (
    AuditReport,
    audit_training_set,
    build_label_leaky_training_set,
    build_leaky_training_set,
)
from derm.training.downstream.train import DownstreamConfig, DownstreamResult, run_downstream, train_on_training_set
from derm.training.downstream.training_sets import split_table, split_time

Log = Callable[[str], None] | None


@dataclass
class LeakageExperiment:
    comparison: Comparison
    point_in_time_audit: AuditReport
    leaky_audit: AuditReport
    point_in_time_set: Path
    leaky_set: Path
    label_leaky_audit: AuditReport | None = None  # conversions taken as known at their click
    label_leaky_set: Path | None = None


def leakage_experiment(
    paths: PlatformPaths,
    repo: FeatureRepo,
    cfg: DownstreamConfig | None = None,
    objective: str = "ctr",
    log: Log = None,
) -> LeakageExperiment:
    """Point-in-time vs leaky (latest snapshot) training set: AUC inflation and the audit of both."""
    cfg = cfg or DownstreamConfig()
    honest = run_downstream(paths, objective, cfg, store=repo.store(), run="leakage-point-in-time", log=log)
    leaky_path = honest.training_set.with_name("leakage-leaky.parquet")
    build_leaky_training_set(honest.training_set, leaky_path, paths)
    leaky_ranker, leaky = train_on_training_set(leaky_path, cfg, objective=objective, log=log)
    # What the leaky model really scores once served point-in-time features: same rows, honest columns.
    table, info = read_training_set(honest.training_set)
    window = (datetime.fromisoformat(info.window_start), datetime.fromisoformat(info.window_end))
    _, held_out = split_table(table, split_time(window, cfg.eval_days))
    served = {name: held_out.column(name) for name in held_out.column_names}
    results = {
        "point-in-time (honest offline estimate)": honest,
        "leaky, evaluated on leaky features (inflated)": leaky,
        "leaky model on point-in-time features (what serving sees)": _with_scores(leaky, leaky_ranker.score(served)),
    }
    label_leaky_path = honest.training_set.with_name("leakage-label-leaky.parquet")
    build_label_leaky_training_set(honest.training_set, label_leaky_path, paths)
    comparison = compare(
        objective, f"{objective.upper()} ranker: point-in-time vs leaky training set", results, next(iter(results)), cfg
    )
    audits = audit_training_set(honest.training_set, paths), audit_training_set(leaky_path, paths)
    return LeakageExperiment(
        comparison,
        audits[0],
        audits[1],
        honest.training_set,
        leaky_path,
        label_leaky_audit=audit_training_set(label_leaky_path, paths),
        label_leaky_set=label_leaky_path,
    )


def _with_scores(result: DownstreamResult, scores: np.ndarray) -> DownstreamResult:
    return replace(result, eval_scores=scores)


__all__ = ["LeakageExperiment", "leakage_experiment"]
