"""Warm-started daily training of a DERM upstream model, and its checkpoints.

Paper: "Decoupled Entity Representation Learning for Pinterest Ads Ranking",
https://arxiv.org/abs/2509.04337. Day ``t`` trains on that day's examples,
starting from day ``t-1``'s weights and optimizer state, so the weights have seen
every event up to the end of ``t``.

A sparse day (fewer than ``TrainConfig.replay_min_examples`` examples) also replays
the days just before it, newest first, at most ``TrainConfig.replay_max_days`` of them
(:func:`replay_arrays`); every replayed example is older than the day, so nothing the
day's snapshot could not know is learned.

Layout::

    <models_dir>/upstream/<objective>/<version>/date=YYYY-MM-DD.pt   model + optimizer state

Example::

    model, optimizer = build_model(cfg)
    train_one_day(model, optimizer, UpstreamDataset(arrays), cfg.train, day)
"""

from __future__ import annotations

import io
from collections import OrderedDict
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import torch

from derm.core.files import atomic_write_bytes
from derm.events.schema import EventLogError, event_files, partition_day
from derm.training.upstream.config import TrainConfig, UpstreamConfig
from derm.training.upstream.features import FeatureConfig, UpstreamDataset, training_arrays
from derm.training.upstream.losses import derm_loss
from derm.training.upstream.model import DermModel

VERSION_CONFIG_FILE = "config.json"  # beside a version's checkpoints: the config it stands for


def version_dir(models_dir: Path, objective: str, version: str) -> Path:
    """The folder of an upstream version: its daily checkpoints and ``VERSION_CONFIG_FILE``."""
    return Path(models_dir) / "upstream" / objective / version


def checkpoint_path(models_dir: Path, objective: str, version: str, day: date) -> Path:
    return version_dir(models_dir, objective, version) / f"date={day.isoformat()}.pt"


def build_model(cfg: UpstreamConfig) -> tuple[DermModel, torch.optim.Optimizer]:
    torch.manual_seed(cfg.train.seed)
    model = DermModel(cfg.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    return model, optimizer


def load_checkpoint(path: Path, cfg: UpstreamConfig) -> tuple[DermModel, torch.optim.Optimizer]:
    """Model and optimizer restored from a refresh checkpoint."""
    model, optimizer = build_model(cfg)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return model, optimizer


def save_checkpoint(path: Path, model: DermModel, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer state, written atomically (a killed run leaves the old checkpoint or none)."""
    buffer = io.BytesIO()  # bytes, not a path: torch.save names the archive after the file
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def replay_arrays(
    events_dir: Path, day: date, objective: str, features: FeatureConfig, cfg: TrainConfig
) -> tuple[dict[str, np.ndarray], list[date]]:
    """The examples ``day`` trains on: its own, plus a bounded replay of the days before it when it is sparse.

    When ``day`` has some examples but fewer than ``cfg.replay_min_examples``, the examples of ``day - 1``,
    ``day - 2``, ... (each with its own point-in-time features, as on the day it was first trained)
    are added, newest first, until the total reaches the minimum or ``cfg.replay_max_days`` earlier
    calendar days have been looked at. ``pin_logq`` is recomputed over the union, since the in-batch
    negatives are now drawn from it.

    Args:
        events_dir: the day-partitioned event log.
        day: the day ``t`` being trained.
        objective: ``"ctr"`` or ``"cvr"``.
        features: entity feature config.
        cfg: training config (replay settings).

    Returns:
        ``(arrays, replayed_days)``: the columns of :func:`training_arrays` for the day and the replayed
        days, oldest first (time order), and the earlier days whose examples were added, newest first.

    Example::

        arrays, replayed = replay_arrays(events_dir, date(2026, 3, 1), "ctr", FeatureConfig(), TrainConfig())
        # replayed == [date(2026, 2, 28), date(2026, 2, 27)] when Mar 1 alone had too few impressions
    """
    parts = [_day_arrays(events_dir, day, objective, features)]
    replayed: list[date] = []
    total = len(parts[0]["label"])
    for back in range(1, cfg.replay_max_days + 1):
        # A day without examples replays nothing: there is no new event to dilute, and replaying would only
        # give the days before it an extra epoch (the weights stay those of day t-1).
        if total == 0 or total >= cfg.replay_min_examples:
            break
        earlier = day - timedelta(days=back)
        arrays = _day_arrays(events_dir, earlier, objective, features)
        replayed.append(earlier)
        if len(arrays["label"]):
            parts.append(arrays)
            total += len(arrays["label"])
    if len(parts) == 1:
        return parts[0], replayed
    merged = {key: np.concatenate([part[key] for part in reversed(parts)]) for key in parts[0]}
    merged["pin_logq"] = _positive_log_share(merged["pin_id"], merged["label"])
    return merged, replayed


# A refresh walks the days in order, so the days a sparse day replays were built one to seven days
# before: keep the last few days' arrays instead of querying the log again (each build reads the
# count window's files). Keyed by the files the build reads, with their size and mtime, so a log
# changed on disk is read again.
_DAY_ARRAYS_CACHE: OrderedDict[tuple, dict[str, np.ndarray]] = OrderedDict()
_DAY_ARRAYS_CACHE_SIZE = 32


def _day_arrays(events_dir: Path, day: date, objective: str, features: FeatureConfig) -> dict[str, np.ndarray]:
    """:func:`training_arrays` of one day, through a small cache keyed by what the build reads."""
    first = day - timedelta(days=features.count_window_days + 1)
    try:
        files = [p for p in event_files(events_dir) if first <= partition_day(p) <= day]
    except EventLogError:
        files = []
    stamp = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files)
    key = (str(Path(events_dir).resolve()), day, objective, features, stamp)
    if key in _DAY_ARRAYS_CACHE:
        _DAY_ARRAYS_CACHE.move_to_end(key)
        return _DAY_ARRAYS_CACHE[key]
    arrays = training_arrays(events_dir, day, objective, features)
    _DAY_ARRAYS_CACHE[key] = arrays
    while len(_DAY_ARRAYS_CACHE) > _DAY_ARRAYS_CACHE_SIZE:
        _DAY_ARRAYS_CACHE.popitem(last=False)
    return arrays


def _positive_log_share(pin_ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``log(share of the Pin among all positives)`` on positive rows, ``0`` on negatives (the sampling bias Q)."""
    out = np.zeros(len(pin_ids), dtype=np.float32)
    positive = labels > 0
    if not positive.any():
        return out
    _, inverse, counts = np.unique(pin_ids[positive], return_inverse=True, return_counts=True)
    out[positive] = np.log(counts[inverse] / positive.sum()).astype(np.float32)
    return out


def train_one_day(
    model: DermModel,
    optimizer: torch.optim.Optimizer,
    dataset: UpstreamDataset,
    cfg: TrainConfig,
    day: date,
    epochs: int | None = None,
) -> dict[str, float]:
    """``epochs`` (default ``cfg.epochs``) passes over the day's examples in a seeded order; returns mean losses."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + day.toordinal())
    model.train()
    totals = {"loss": 0.0, "bce": 0.0, "contrastive": 0.0, "impression": 0.0}
    steps = 0
    for _ in range(cfg.epochs if epochs is None else epochs):
        for index in torch.randperm(len(dataset), generator=generator).split(cfg.batch_size):
            batch = dataset[index]
            logit, user_emb, pin_emb = model(batch)
            loss = derm_loss(
                logit,
                batch["label"],
                user_emb,
                pin_emb,
                batch["pin_logq"],
                batch["pin_id"],
                temperature=cfg.temperature,
                contrastive_weight=cfg.contrastive_weight,
                impression_weight=cfg.impression_weight,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            optimizer.step()
            totals["loss"] += loss.total.item()
            totals["bce"] += loss.bce.item()
            totals["contrastive"] += loss.contrastive.item()
            totals["impression"] += loss.impression.item()
            steps += 1
    return {k: v / max(steps, 1) for k, v in totals.items()}


def score_day(
    model: DermModel, events_dir: Path, day: date, objective: str, features: FeatureConfig
) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, logits)`` of the model on ``day``'s examples (for held-out evaluation)."""
    dataset = UpstreamDataset(training_arrays(events_dir, day, objective, features))
    model.eval()
    with torch.inference_mode():
        logits = [model(dataset[i])[0] for i in torch.arange(len(dataset)).split(4096)]
    return dataset.tensors["label"].numpy(), torch.cat(logits).numpy() if logits else np.zeros(0, np.float32)
