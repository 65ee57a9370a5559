"""Train and evaluate a downstream CTR or CVR ranker on a point-in-time training set from Feast.

Paper: "Decoupled Entity Representation Learning for Pinterest Ads Ranking",
https://arxiv.org/abs/2509.04337. Downstream rankers concatenate the stored DERM
embeddings into their inputs; this script measures what they add.

Reads top to bottom, one step per section:

1. config (:class:`DownstreamConfig`);
2. metrics: ROC-AUC, PR-AUC (average precision) and log loss, with vectorised
   (paired) bootstrap 95% confidence intervals;
3. training: AdamW on BCE over a :class:`derm.training.downstream.dataset.RankerDataset`;
4. :func:`run_downstream`: feature service -> ``get_historical_features`` ->
   Parquet -> training-set gate -> temporal split -> train -> evaluate -> save
   to ``<models_dir>/downstream/<objective>/<run>/``.

Example::

    paths = PlatformPaths.from_env()
    result = run_downstream(paths, "ctr", DownstreamConfig(), store=FeatureRepo().store())
    print(result.describe())          # roc_auc 0.7312 [0.7270, 0.7355] ...
    ranker = load_ranker(result.ranker_dir)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from derm.core.paths import PlatformPaths
from derm.core.training_set import TrainingSetInfo, read_training_set
from derm.training.downstream.dataset import RankerDataset, label_array
from derm.training.downstream.ranker import Ranker, RankerModelConfig, RankerSpec, ranker_dir
from derm.training.downstream.training_sets import (
    build_training_set,
    default_window,
    gate_training_set,
    ranker_service,
    service_families,
    split_table,
    split_time,
)

# --------------------------------------------------------------------------- 1. config


@dataclass(frozen=True)
class DownstreamConfig:
    eval_days: int = 2  # the last N days of the window are evaluated on; earlier days train
    epochs: int = 2  # passes over the train split
    batch_size: int = 1024
    learning_rate: float = 2e-3
    weight_decay: float = 1e-5  # AdamW
    seed: int = 0  # initial weights, shuffling and bootstrap
    bootstrap: int = 1000  # resamples for the 95% confidence intervals
    gate: bool = True  # run the Great Expectations training-set gate; refuse to train when it fails
    gate_thresholds: Path | None = None  # the gate's YAML (None: validation/thresholds.yaml)
    model: RankerModelConfig = field(default_factory=RankerModelConfig)


METRICS = ("roc_auc", "pr_auc", "log_loss")


# --------------------------------------------------------------------------- 2. metrics


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap 95% confidence interval."""

    value: float
    lo: float
    hi: float

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.lo:.4f}, {self.hi:.4f}]"


def weighted_metrics(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """ROC-AUC, PR-AUC (average precision) and log loss under each row of ``weights``, all at once.

    Ties in ``scores`` are handled like scikit-learn (ROC: half credit; AP: one step per distinct score).

    Args:
        labels: ``(N,)`` 0/1.
        scores: ``(N,)`` probabilities.
        weights: ``(R, N)`` non-negative row weights (bootstrap counts; ones for the point estimate).

    Returns:
        ``{"roc_auc": (R,), "pr_auc": (R,), "log_loss": (R,)}``; NaN where a class is absent.
    """
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(scores, kind="stable")
    y, s, w = labels[order], scores[order], np.asarray(weights, dtype=np.float64)[:, order]  # ascending scores
    starts = np.concatenate([[0], np.flatnonzero(np.diff(s)) + 1])  # tie groups
    pos = np.add.reduceat(w * y, starts, axis=1)  # (R, G) positive weight per distinct score
    neg = np.add.reduceat(w * (1.0 - y), starts, axis=1)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        below = np.cumsum(neg, axis=1) - neg  # negatives with a strictly lower score
        roc = (pos * (below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
        tp = np.cumsum(pos[:, ::-1], axis=1)[:, ::-1]  # positives scored >= this group's score
        fp = np.cumsum(neg[:, ::-1], axis=1)[:, ::-1]
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        ap = (pos * precision).sum(axis=1) / n_pos
        p = np.clip(s, 1e-7, 1 - 1e-7)
        row_loss = -(y * np.log(p) + (1.0 - y) * np.log(1.0 - p))  # (N,)
        loss = (w @ row_loss) / w.sum(axis=1)
    roc[(n_pos == 0) | (n_neg == 0)] = np.nan
    ap[n_pos == 0] = np.nan
    return {"roc_auc": roc, "pr_auc": ap, "log_loss": loss}


def bootstrap_weights(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``(resamples, n)`` multiplicities of a with-replacement resample of ``n`` rows (one bincount, no loop)."""
    draws = rng.integers(0, n, size=(resamples, n)) + (np.arange(resamples) * n)[:, None]
    return np.bincount(draws.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def bootstrap_metrics(
    labels: np.ndarray,
    scores: Mapping[str, np.ndarray],
    resamples: int = 1000,
    seed: int = 0,
    baseline: str | None = None,
    max_cells: int = 4_000_000,
) -> tuple[dict[str, dict[str, Estimate]], dict[str, dict[str, Estimate]]]:
    """Point estimates and percentile 95% CIs of every metric for every model, on the same resamples.

    Resampling is paired: every model is scored on the same bootstrap samples of the
    evaluation rows, so the CI of a difference to ``baseline`` is much tighter than
    the CIs of the two models would suggest.

    Args:
        labels: ``(N,)`` 0/1 labels of the evaluation rows.
        scores: model name -> ``(N,)`` probabilities on the same rows.
        resamples: bootstrap resamples ``R``.
        seed: resampling seed.
        baseline: a key of ``scores``; when given, also returns ``model - baseline`` per metric.
        max_cells: resamples are processed in chunks of at most ``max_cells / N`` rows of weights.

    Returns:
        ``(estimates, deltas)``: ``{model: {metric: Estimate}}`` and, for ``baseline``,
        ``{model: {metric: Estimate of model - baseline}}`` (empty without a baseline).
    """
    labels = np.asarray(labels, dtype=np.float64)
    n = len(labels)
    rng = np.random.default_rng(seed)
    ones = np.ones((1, n))
    points = {m: {k: float(v[0]) for k, v in weighted_metrics(labels, s, ones).items()} for m, s in scores.items()}
    samples: dict[str, dict[str, list[np.ndarray]]] = {m: {k: [] for k in METRICS} for m in scores}
    chunk = max(1, min(resamples, max_cells // max(n, 1)))
    for start in range(0, resamples, chunk):
        weights = bootstrap_weights(n, min(chunk, resamples - start), rng)
        for model, model_scores in scores.items():
            for metric, values in weighted_metrics(labels, model_scores, weights).items():
                samples[model][metric].append(values)
    stacked = {m: {k: np.concatenate(v) for k, v in per.items()} for m, per in samples.items()}

    def estimate(point: float, values: np.ndarray) -> Estimate:
        finite = values[np.isfinite(values)]
        if not len(finite):
            return Estimate(point, float("nan"), float("nan"))
        lo, hi = np.percentile(finite, [2.5, 97.5])
        return Estimate(point, float(lo), float(hi))

    estimates = {m: {k: estimate(points[m][k], stacked[m][k]) for k in METRICS} for m in scores}
    deltas: dict[str, dict[str, Estimate]] = {}
    if baseline is not None:
        for model in scores:
            deltas[model] = {
                k: estimate(points[model][k] - points[baseline][k], stacked[model][k] - stacked[baseline][k])
                for k in METRICS
            }
    return estimates, deltas


# --------------------------------------------------------------------------- 3. training


def _columns(table: pa.Table) -> dict[str, pa.ChunkedArray]:
    return {name: table.column(name) for name in table.column_names}


def train_ranker(
    train: pa.Table, spec: RankerSpec, cfg: DownstreamConfig, log: Callable[[str], None] | None = None
) -> Ranker:
    """Fit a ranker on the train split: counting stats from ``train``, then ``cfg.epochs`` of AdamW on BCE."""
    spec = spec.with_counting_stats(_columns(train))
    torch.manual_seed(cfg.seed)
    ranker = Ranker(spec)
    data = RankerDataset(train, ranker.transform)
    model = ranker.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for epoch in range(cfg.epochs):
        model.train()
        started, total, steps = time.perf_counter(), 0.0, 0
        for batch in data.loader(cfg.batch_size, shuffle=True, seed=cfg.seed * 1_000 + epoch):
            loss = loss_fn(model(batch), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            steps += 1
        if log:
            rate = len(data) / max(time.perf_counter() - started, 1e-9)
            log(f"  epoch {epoch + 1}/{cfg.epochs}: train loss {total / max(steps, 1):.4f} ({rate:,.0f} rows/s)")
    model.eval()
    return ranker


def evaluate(
    ranker: Ranker, table: pa.Table, resamples: int = 1000, seed: int = 0
) -> tuple[dict[str, Estimate], np.ndarray]:
    """Metrics with bootstrap CIs on ``table``; also returns the scores ``(N,)``."""
    scores = ranker.score(_columns(table))
    estimates, _ = bootstrap_metrics(label_array(table), {"model": scores}, resamples=resamples, seed=seed)
    return estimates["model"], scores


# --------------------------------------------------------------------------- 4. the run


@dataclass
class DownstreamResult:
    objective: str
    run: str
    feature_service: str
    embedding_versions: dict[str, str]
    training_set: Path
    ranker_dir: Path | None
    rows_train: int
    rows_eval: int
    metrics: dict[str, Estimate]
    eval_event_ids: np.ndarray
    eval_labels: np.ndarray
    eval_scores: np.ndarray
    gate_summary: str = ""
    seconds: float = 0.0

    def describe(self) -> str:
        metrics = "  ".join(f"{k} {v}" for k, v in self.metrics.items())
        versions = ", ".join(f"{f}={v}" for f, v in self.embedding_versions.items()) or "no embeddings"
        return (
            f"{self.objective} {self.run} ({self.feature_service}; {versions}): train {self.rows_train:,} rows, "
            f"eval {self.rows_eval:,} rows\n  {metrics}"
        )


def training_set_path(paths: PlatformPaths, objective: str, run: str) -> Path:
    return paths.data_dir / "training_sets" / objective / f"{run}.parquet"


def default_run_name(label: str = "") -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}-{label}" if label else stamp


def train_on_training_set(
    path: Path,
    cfg: DownstreamConfig,
    *,
    objective: str | None = None,
    save_to: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[Ranker, DownstreamResult]:
    """Split a written training set in time, train, evaluate, and (optionally) save the ranker."""
    started = time.perf_counter()
    table, info = read_training_set(path)
    if info is None:
        raise ValueError(
            f"{path}: no derm.training_set metadata (write it with derm.training.downstream.training_sets)"
        )
    split = split_time(
        (datetime.fromisoformat(info.window_start), datetime.fromisoformat(info.window_end)), cfg.eval_days
    )
    train, held_out = split_table(table, split)
    if not train.num_rows or not held_out.num_rows:
        raise ValueError(f"{path}: empty split at {split} ({train.num_rows} train, {held_out.num_rows} eval rows)")
    spec = RankerSpec(
        objective=objective or info.objective,
        feature_service=info.feature_service,
        feature_refs=info.feature_refs,
        embedding_versions=info.embedding_versions,
        embedding_dims=info.embedding_dims,
        model=cfg.model,
        extra={"training_set": str(path), "window": [info.window_start, info.window_end], "split": split.isoformat()},
    )
    ranker = train_ranker(train, spec, cfg, log=log)
    metrics, scores = evaluate(ranker, held_out, resamples=cfg.bootstrap, seed=cfg.seed)
    ranker.spec = replace(ranker.spec, extra={**ranker.spec.extra, "metrics": {k: vars(v) for k, v in metrics.items()}})
    if save_to is not None:
        ranker.save(save_to)
    result = DownstreamResult(
        objective=spec.objective,
        run=save_to.name if save_to is not None else Path(path).stem,
        feature_service=info.feature_service,
        embedding_versions=info.embedding_versions,
        training_set=Path(path),
        ranker_dir=save_to,
        rows_train=train.num_rows,
        rows_eval=held_out.num_rows,
        metrics=metrics,
        eval_event_ids=held_out.column("event_id").to_numpy(),
        eval_labels=label_array(held_out),
        eval_scores=scores,
        seconds=time.perf_counter() - started,
    )
    return ranker, result


def run_downstream(
    paths: PlatformPaths,
    objective: str,
    cfg: DownstreamConfig | None = None,
    *,
    families: Sequence[str] | None = None,
    versions: dict[str, str] | None = None,
    window: tuple[datetime, datetime] | None = None,
    run: str | None = None,
    store: Any,
    save: bool = True,
    log: Callable[[str], None] | None = None,
) -> DownstreamResult:
    """Build the training set through Feast, gate it, train, evaluate and save one ranker.

    Args:
        paths: platform locations.
        objective: ``"ctr"`` or ``"cvr"``.
        cfg: training config.
        families: ``None`` for the registered ``<objective>_ranker`` service (promoted versions);
            else the embedding families of an ablation service built in code.
        versions: family -> version overrides for ``families``.
        window: ``[start, end)`` of the events (default: :func:`default_window` of the promoted families,
            the same for every variant so ablations compare the same rows).
        run: run name (default: a UTC timestamp).
        store: the ``feast.FeatureStore`` to retrieve from.
        save: save the ranker under ``<models_dir>/downstream/<objective>/<run>/``.

    Raises:
        derm.validation.gate.ValidationFailed: the training set failed the gate (with ``cfg.gate``).
    """
    cfg = cfg or DownstreamConfig()
    run = run or default_run_name()
    registered = ranker_service(store, objective)
    service = ranker_service(store, objective, families, versions)
    window = window or default_window(paths, service_families(store, registered))
    path = training_set_path(paths, objective, run)
    if log:
        span = f"{window[0]:%F %H:%M} .. {window[1]:%F %H:%M}"
        log(f"{objective} {run}: get_historical_features({service.name}) over {span}")
    info: TrainingSetInfo = build_training_set(store, paths, objective, service, window, path)
    gate_summary = ""
    if cfg.gate:
        table, _ = read_training_set(path)
        report = gate_training_set(
            table, info, docs_dir=paths.validation_dir, thresholds_path=cfg.gate_thresholds, events_dir=paths.events_dir
        )
        gate_summary = report.summary
        if log:
            log(f"  gate: {report.summary}")
        report.raise_for_failure()
    target = ranker_dir(paths.models_dir, objective, run) if save else None
    _, result = train_on_training_set(path, cfg, objective=objective, save_to=target, log=log)
    result.gate_summary = gate_summary
    result.run = run
    return result


__all__ = [
    "METRICS",
    "DownstreamConfig",
    "DownstreamResult",
    "Estimate",
    "bootstrap_metrics",
    "bootstrap_weights",
    "default_run_name",
    "evaluate",
    "run_downstream",
    "train_on_training_set",
    "train_ranker",
    "training_set_path",
    "weighted_metrics",
]
