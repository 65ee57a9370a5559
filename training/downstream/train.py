"""Train and evaluate a downstream CTR or CVR ranker on a point-in-time training set from Feast.

Paper: "Decoupled Entity Representation Learning for Pinterest Ads Ranking",
https://arxiv.org/abs/2509.04337. Downstream rankers concatenate the stored DERM
embeddings into their inputs; this script measures what they add.

Reads top to bottom, one step per section:

1. config (:class:`DownstreamConfig`);
2. metrics: ROC-AUC, PR-AUC (average precision) and log loss, with vectorised
   (paired) bootstrap 95% confidence intervals;
3. training that does no harm: AdamW on BCE over a
   :class:`derm.training.downstream.dataset.RankerDataset`, with a time-ordered
   validation split (the last labelled day(s) before the evaluation days), early
   stopping on validation log loss, weight decay and embedding dropout chosen on
   validation (a small grid), and Platt calibration of the logit on validation; if
   the calibrated model still does not beat the training label rate on validation,
   the ranker predicts that rate (never worse than the base rate);
4. :func:`run_downstream`: feature service -> ``get_historical_features`` ->
   Parquet -> training-set gate -> temporal split (train | validation | eval) ->
   train -> evaluate (with the base rate's log loss beside the model's) -> save
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
from derm.core.training_set import LABEL, TrainingSetInfo, read_training_set
from derm.materialization.catalog import Catalog
from derm.training.downstream.dataset import RankerDataset, label_array, with_user_sequences
from derm.training.downstream.ranker import Ranker, RankerModelConfig, RankerSpec, ranker_dir, sigmoid
from derm.training.downstream.training_sets import (
    build_training_set,
    default_window,
    gate_training_set,
    labelled_events,
    ranker_service,
    service_families,
    split_table,
    split_time,
)

# --------------------------------------------------------------------------- 1. config


@dataclass(frozen=True)
class DownstreamConfig:
    eval_days: int = 2  # the last N days of the window are evaluated on; earlier days train
    validation_days: int = 1  # the last labelled days before the eval days: early stopping, grid, calibration
    epochs: int = 4  # at most this many passes over the train split (early stopping on validation log loss)
    patience: int = 1  # epochs without a better validation log loss before stopping
    batch_size: int = 1024
    learning_rate: float = 2e-3
    weight_decay: tuple[float, ...] = (1e-4, 1e-2)  # AdamW; a grid, the best on validation is kept
    # Grid (only with embedding families). 1.0 = the families off: validation may decide that the embeddings
    # do not help on held-out days. Without it a family with no usable signal (e.g. entities too new to have
    # a meaningful embedding) is still fitted, and its extra inputs cost variance the baseline does not pay.
    embedding_dropout: tuple[float, ...] = (0.0, 0.3, 1.0)
    calibrate: bool = True  # Platt-scale the logit on validation (a, b in RankerSpec.calibration)
    sequence_encoder: bool = False  # a transformer over the user's recent engaged Pins (RankerModelConfig)
    sequence_length: int = 20
    experts: int = 0  # > 0: mixture-of-experts deep tower (MMoE gates) with this many experts
    embedding_dot_products: bool = True  # each (user, Pin) family pair's dot product as an input (RankerModelConfig)
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


def _log_loss(labels: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(p) + (1.0 - labels) * np.log(1.0 - p)))


def base_rate_log_loss(labels: np.ndarray, rate: float) -> float:
    """Log loss of predicting ``rate`` for every row of ``labels`` (the no-skill reference)."""
    return _log_loss(np.asarray(labels, dtype=np.float64), np.full(len(labels), rate))


def fit_calibration(logits: np.ndarray, labels: np.ndarray, steps: int = 100) -> tuple[float, float]:
    """Platt scaling: ``(a, b)`` minimising the log loss of ``sigmoid(a * logit + b)`` on ``labels``.

    Args:
        logits: ``(N,)`` raw model logits on the validation rows.
        labels: ``(N,)`` 0/1.
    """
    x = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float64))
    params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(params[0] * x + params[1], y)
        loss.backward()
        return loss

    optimizer.step(closure)
    a, b = (float(v) for v in params.detach())
    return (a, b) if np.isfinite([a, b]).all() else (1.0, 0.0)


def _cross_fitted_log_loss(logits: np.ndarray, labels: np.ndarray, calibrate: bool = True) -> tuple[float, bool]:
    """Out-of-sample log loss of the calibrated model, and whether it beats a constant beyond noise.

    Two time-ordered halves of the validation rows, each scored with the calibration (and the constant
    rate) fitted on the other. "Beats" means the paired per-row loss difference to the constant has a
    95% upper bound below zero.

    Returns:
        ``(model log loss, beats the constant)``.
    """
    half = len(labels) // 2
    folds = [(slice(0, half), slice(half, None)), (slice(half, None), slice(0, half))]
    model_rows, constant_rows = [], []
    for fit, score in folds:
        a, b = fit_calibration(logits[fit], labels[fit]) if calibrate else (1.0, 0.0)
        p = np.clip(sigmoid(a * logits[score] + b), 1e-7, 1 - 1e-7)
        c = float(np.clip(np.mean(labels[fit]), 1e-7, 1 - 1e-7)) if len(labels[fit]) else 0.5
        y = labels[score]
        model_rows.append(-(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))
        constant_rows.append(-(y * np.log(c) + (1.0 - y) * np.log(1.0 - c)))
    model, constant = np.concatenate(model_rows), np.concatenate(constant_rows)
    if not len(model):
        return float("inf"), False
    difference = model - constant
    upper = difference.mean() + 1.96 * difference.std(ddof=1) / np.sqrt(len(difference)) if len(model) > 1 else 0.0
    return float(model.mean()), bool(upper < 0.0)


def _fit_one(
    data: RankerDataset,
    validation: RankerDataset,
    spec: RankerSpec,
    cfg: DownstreamConfig,
    weight_decay: float,
    log: Callable[[str], None] | None,
) -> tuple[Ranker, float, int]:
    """One grid point: AdamW for at most ``cfg.epochs``, the epoch with the best validation log loss kept."""
    torch.manual_seed(cfg.seed)
    ranker = Ranker(spec)
    model = ranker.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    val_labels = validation.tensors["label"].numpy().astype(np.float64)
    best, best_state, best_epoch, waited = float("inf"), None, 0, 0
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
        val_loss = _log_loss(val_labels, sigmoid(_logits(model, validation)))
        if log:
            rate = len(data) / max(time.perf_counter() - started, 1e-9)
            log(
                f"  epoch {epoch + 1}/{cfg.epochs}: train loss {total / max(steps, 1):.4f}, "
                f"validation log loss {val_loss:.4f} ({rate:,.0f} rows/s)"
            )
        if val_loss < best - 1e-5:
            best, best_epoch, waited = val_loss, epoch + 1, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited > cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return ranker, best, best_epoch


def _logits(model: torch.nn.Module, data: RankerDataset, batch_size: int = 65_536) -> np.ndarray:
    model.eval()
    with torch.inference_mode():
        out = [model(batch) for batch in data.loader(batch_size)]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def train_ranker(
    train: pa.Table,
    spec: RankerSpec,
    cfg: DownstreamConfig,
    log: Callable[[str], None] | None = None,
    validation: pa.Table | None = None,
) -> Ranker:
    """Fit a ranker that does no harm: counting stats from ``train``, a grid over weight decay and
    embedding dropout with early stopping on ``validation``, then calibration on ``validation``.

    Without ``validation`` one grid point is trained for ``cfg.epochs`` (first weight decay, no
    embedding dropout) and left uncalibrated.

    Returns:
        The ranker; ``spec.extra["selection"]`` records the grid's validation log losses, the chosen
        point, the calibration and the validation base rate.
    """
    spec = spec.with_counting_stats(_columns(train))
    rate = float(np.mean(label_array(train)))
    data = RankerDataset(train, Ranker(spec).transform)
    if validation is None or not validation.num_rows:
        point = replace(spec.model, embedding_dropout=0.0)
        ranker, _, _ = _fit_one(
            data, data, replace(spec, model=point), replace(cfg, patience=cfg.epochs), cfg.weight_decay[0], log
        )
        return ranker
    valid = RankerDataset(validation, Ranker(spec).transform)
    dropouts = cfg.embedding_dropout if spec.families else (0.0,)
    grid = [(wd, dropout) for wd in cfg.weight_decay for dropout in dict.fromkeys(dropouts)]
    fits = []
    for weight_decay, dropout in grid:
        if log:
            log(f"  weight decay {weight_decay:g}, embedding dropout {dropout:g}")
        point = replace(spec, model=replace(spec.model, embedding_dropout=dropout))
        ranker, val_loss, epochs = _fit_one(data, valid, point, cfg, weight_decay, log)
        fits.append((val_loss, weight_decay, dropout, epochs, ranker))
    val_loss, weight_decay, dropout, epochs, ranker = min(fits, key=lambda fit: fit[0])
    val_labels = label_array(validation)
    logits = _logits(ranker.model, valid)
    calibration = fit_calibration(logits, val_labels) if cfg.calibrate else (1.0, 0.0)
    calibrated = _log_loss(val_labels, sigmoid(calibration[0] * logits + calibration[1]))
    held_out_loss, beats_constant = _cross_fitted_log_loss(logits, val_labels, cfg.calibrate)
    reference = base_rate_log_loss(val_labels, rate)
    # Judged out of sample (the calibration fitted on one half of the validation rows, scored on the other):
    # the model must beat the training label rate, and a constant fitted the same way by more than noise.
    # In sample, Platt scaling always reaches the validation rate and would never fall back.
    fallback = not (held_out_loss < reference and beats_constant)
    if fallback:
        # Predict the training label rate; a vanishing slope keeps the model's order (ROC-AUC stays
        # comparable across an ablation) while the log loss equals the base rate's to ~1e-8.
        slope = 1e-4 / max(float(np.std(logits)), 1e-6)
        calibration = (
            slope,
            float(np.log(rate / (1.0 - rate))) - slope * float(np.mean(logits)) if 0.0 < rate < 1.0 else 0.0,
        )
    # The log loss on the validation rows of the ranker as it will score (calibration, or the base-rate
    # fallback, applied): what a nested ablation compares between a variant and the one before it.
    served = _log_loss(val_labels, sigmoid(calibration[0] * logits + calibration[1]))
    selection = {
        "grid": [
            {"weight_decay": wd, "embedding_dropout": d, "validation_log_loss": v, "epochs": e}
            for v, wd, d, e, _ in fits
        ],
        "weight_decay": weight_decay,
        "embedding_dropout": dropout,
        "epochs": epochs,
        "validation_log_loss": val_loss,
        "validation_log_loss_calibrated": calibrated,
        "validation_log_loss_cross_fitted": held_out_loss,
        "beats_a_constant_on_validation": beats_constant,
        "validation_base_rate_log_loss": reference,
        "train_label_rate": rate,
        "fallback_to_base_rate": bool(fallback),
        "validation_log_loss_served": served,
    }
    if log:
        log(
            f"  chosen: weight decay {weight_decay:g}, embedding dropout {dropout:g}, {epochs} epoch(s); validation "
            f"log loss {held_out_loss:.4f} calibrated out of sample vs {reference:.4f} base rate"
            + (" -> predicting the base rate" if fallback else "")
        )
    ranker.spec = replace(
        ranker.spec, calibration=[float(c) for c in calibration], extra={**ranker.spec.extra, "selection": selection}
    )
    return ranker


def evaluate(
    ranker: Ranker, table: pa.Table, resamples: int = 1000, seed: int = 0, base_rate: float | None = None
) -> tuple[dict[str, Estimate], np.ndarray]:
    """Metrics with bootstrap CIs on ``table``; also returns the scores ``(N,)``.

    With ``base_rate`` (the training label rate) the metrics also hold ``base_rate_log_loss`` (predicting
    that rate for every row) and ``log_loss_vs_base_rate`` (model - base rate, paired; <= 0 is no harm).
    """
    scores = ranker.score(_columns(table))
    candidates = {"model": scores}
    if base_rate is not None:
        candidates["base rate"] = np.full(len(scores), base_rate, dtype=np.float64)
    estimates, deltas = bootstrap_metrics(
        label_array(table), candidates, resamples=resamples, seed=seed, baseline="base rate" if base_rate else None
    )
    metrics = dict(estimates["model"])
    if base_rate is not None:
        metrics["base_rate_log_loss"] = estimates["base rate"]["log_loss"]
        metrics["log_loss_vs_base_rate"] = deltas["model"]["log_loss"]
    return metrics, scores


# --------------------------------------------------------------------------- 4. the run


class RankerSkipped(ValueError):
    """The log gives this ranker nothing to learn; the stage is skipped with this reason, never trained on it.

    Raised when the labelled events of the window hold a single class (all clicks, no clicks, no
    conversions: a ranker could only learn the constant and ROC-AUC is undefined), when the objective
    has no labelled event at all (CVR on a log without clicks), or when the temporal split leaves a
    split empty or the train split with one class (too few labelled days). A training set whose log
    holds both classes but which has one is a broken join, refused by the gate instead.
    """


def single_class_reason(labels: np.ndarray, what: str) -> str | None:
    """Why ``labels`` (0/1) cannot train or score a ranker, or ``None`` when both classes are present."""
    if not len(labels):
        return f"{what} has no labelled event"
    positives = int(np.sum(labels))
    if 0 < positives < len(labels):
        return None
    kind = "positive" if positives else "negative"
    return (
        f"all {len(labels):,} labelled events of {what} are {kind}: a single label class, so a ranker could "
        "only learn the constant rate and ROC-AUC is undefined"
    )


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
    rows_validation: int = 0
    base_rate: float = float("nan")  # the training split's label rate
    # The validation rows' event ids (in order) and the log loss on them of the ranker as it scores
    # (calibrated, or the base-rate fallback); NaN without validation rows.
    validation_event_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    validation_log_loss: float = float("nan")
    # Set by a nested ablation (derm.experiments.ablation.select_nested): the decision between this
    # variant's own ranker and the one selected for the variant before it.
    nested_selection: dict[str, Any] = field(default_factory=dict)
    # The grid chose embedding dropout 1.0 for a ranker with families: it never sees them (constant
    # cold-start inputs in training and serving), so it is another run of the ranker without them.
    families_off: bool = False

    @property
    def no_harm(self) -> bool:
        """The ranker's eval log loss is at or below the base rate's (the training label rate)."""
        return self.metrics["log_loss"].value <= self.metrics["base_rate_log_loss"].value

    def describe(self) -> str:
        metrics = "  ".join(f"{k} {v}" for k, v in self.metrics.items())
        versions = ", ".join(f"{f}={v}" for f, v in self.embedding_versions.items()) or "no embeddings"
        return (
            f"{self.objective} {self.run} ({self.feature_service}; {versions}): train {self.rows_train:,} rows, "
            f"validation {self.rows_validation:,} rows, eval {self.rows_eval:,} rows\n  {metrics}"
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
    events_dir: Path | None = None,
    embedding_config_hashes: dict[str, str] | None = None,
) -> tuple[Ranker, DownstreamResult]:
    """Split a written training set in time (train | validation | eval), train, evaluate, and (optionally) save.

    ``embedding_config_hashes`` (family -> upstream config hash of the version trained on) is recorded in
    the spec beside the embedding versions (:func:`embedding_config_hashes` reads them from the catalog).

    ``events_dir`` (the event log) is needed with ``cfg.sequence_encoder``: the user sequences are built
    from it point in time (:func:`derm.training.downstream.dataset.with_user_sequences`).
    """
    started = time.perf_counter()
    table, info = read_training_set(path)
    if info is None:
        raise ValueError(
            f"{path}: no derm.training_set metadata (write it with derm.training.downstream.training_sets)"
        )
    window = (datetime.fromisoformat(info.window_start), datetime.fromisoformat(info.window_end))
    try:
        split = split_time(window, cfg.eval_days)
    except ValueError as exc:  # too few days to train and evaluate: a short log, not a failure (run-all goes on)
        raise RankerSkipped(f"{path}: {exc}") from exc
    if cfg.sequence_encoder:
        if events_dir is None:
            raise ValueError("sequence_encoder needs the event log (events_dir) to build user sequences")
        table = with_user_sequences(table, events_dir, cfg.sequence_length)
    train, held_out = split_table(table, split)
    validation = None
    if cfg.validation_days:
        # The last validation_days days *with rows* before the eval days: a log with a gap (a calendar day
        # without events) still validates on real days.
        days = np.unique(train.column("event_timestamp").to_numpy().astype("datetime64[D]"))
        if len(days) > cfg.validation_days:
            first = days[-cfg.validation_days].astype(object)  # a datetime.date
            validation_split = datetime.combine(first, datetime.min.time(), UTC)
        else:
            validation_split = split_time(window, cfg.eval_days + cfg.validation_days)
        train, validation = split_table(train, validation_split)
    if not train.num_rows or not held_out.num_rows or (validation is not None and not validation.num_rows):
        sizes = f"{train.num_rows} train, {validation.num_rows if validation else 0} validation"
        raise RankerSkipped(f"{path}: empty split at {split} ({sizes}, {held_out.num_rows} eval rows)")
    if reason := single_class_reason(label_array(train), f"the train split (before {split:%Y-%m-%d})"):
        raise RankerSkipped(f"{path}: {reason}")
    model = replace(
        cfg.model,
        sequence_length=cfg.sequence_length if cfg.sequence_encoder else 0,
        experts=cfg.experts,
        embedding_dot_products=cfg.embedding_dot_products,
    )
    spec = RankerSpec(
        objective=objective or info.objective,
        feature_service=info.feature_service,
        feature_refs=info.feature_refs,
        embedding_versions=info.embedding_versions,
        embedding_dims=info.embedding_dims,
        embedding_config_hashes=dict(embedding_config_hashes or {}),
        model=model,
        extra={"training_set": str(path), "window": [info.window_start, info.window_end], "split": split.isoformat()},
    )
    ranker = train_ranker(train, spec, cfg, log=log, validation=validation)
    rate = float(np.mean(label_array(train)))
    metrics, scores = evaluate(ranker, held_out, resamples=cfg.bootstrap, seed=cfg.seed, base_rate=rate)
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
        rows_validation=validation.num_rows if validation is not None else 0,
        base_rate=rate,
        validation_event_ids=(
            validation.column("event_id").to_numpy() if validation is not None else np.zeros(0, np.int64)
        ),
        validation_log_loss=float(ranker.spec.extra.get("selection", {}).get("validation_log_loss_served", np.nan)),
        families_off=ranker.spec.families_off,
    )
    return ranker, result


def embedding_config_hashes(paths: PlatformPaths, versions: Mapping[str, str]) -> dict[str, str]:
    """family -> the upstream config hash of ``versions[family]``, from its published manifests."""
    catalog = Catalog(paths.embeddings_offline_dir)
    hashes = {}
    for family, version in versions.items():
        manifests = catalog.manifests(family, version)
        if manifests:
            hashes[family] = manifests[-1].config_hash
    return hashes


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
        RankerSkipped: the log gives the objective a single label class, or too few labelled days to split.
    """
    cfg = cfg or DownstreamConfig()
    run = run or default_run_name()
    registered = ranker_service(store, objective)
    service = ranker_service(store, objective, families, versions)
    window = window or default_window(paths, service_families(store, registered))
    # A log with one label class (or no labelled event) for this objective is skipped before the training set
    # is built: the gate's "both classes present" would refuse it, and rightly, but the log is not broken.
    labels = labelled_events(paths.events_dir, objective, *window)[LABEL].to_numpy()
    if reason := single_class_reason(
        labels, f"the {objective} window {window[0]:%Y-%m-%d %H:%M}..{window[1]:%Y-%m-%d %H:%M}"
    ):
        raise RankerSkipped(reason)
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
    _, result = train_on_training_set(
        path,
        cfg,
        objective=objective,
        save_to=target,
        log=log,
        events_dir=paths.events_dir,
        embedding_config_hashes=embedding_config_hashes(paths, info.embedding_versions),
    )
    result.gate_summary = gate_summary
    result.run = run
    return result


__all__ = [
    "METRICS",
    "DownstreamConfig",
    "DownstreamResult",
    "Estimate",
    "RankerSkipped",
    "base_rate_log_loss",
    "bootstrap_metrics",
    "bootstrap_weights",
    "default_run_name",
    "embedding_config_hashes",
    "evaluate",
    "fit_calibration",
    "run_downstream",
    "single_class_reason",
    "train_on_training_set",
    "train_ranker",
    "training_set_path",
    "weighted_metrics",
]
