"""Warm-started daily training of a DERM upstream model, and its checkpoints.

Paper: "Decoupled Entity Representation Learning for Pinterest Ads Ranking",
https://arxiv.org/abs/2509.04337. Day ``t`` trains on that day's examples,
starting from day ``t-1``'s weights and optimizer state, so the weights have seen
every event up to the end of ``t``.

Layout::

    <models_dir>/upstream/<objective>/<version>/date=YYYY-MM-DD.pt   model + optimizer state

Example::

    model, optimizer = build_model(cfg)
    train_one_day(model, optimizer, UpstreamDataset(arrays), cfg.train, day)
"""

from __future__ import annotations

import io
from datetime import date
from pathlib import Path

import numpy as np
import torch

from derm.core.files import atomic_write_bytes
from derm.training.upstream.config import TrainConfig, UpstreamConfig
from derm.training.upstream.features import FeatureConfig, UpstreamDataset, training_arrays
from derm.training.upstream.losses import derm_loss
from derm.training.upstream.model import DermModel


def checkpoint_path(models_dir: Path, objective: str, version: str, day: date) -> Path:
    return Path(models_dir) / "upstream" / objective / version / f"date={day.isoformat()}.pt"


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


def train_one_day(
    model: DermModel,
    optimizer: torch.optim.Optimizer,
    dataset: UpstreamDataset,
    cfg: TrainConfig,
    day: date,
) -> dict[str, float]:
    """``cfg.epochs`` passes over the day's examples in a seeded order; returns mean losses."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + day.toordinal())
    model.train()
    totals = {"loss": 0.0, "bce": 0.0, "contrastive": 0.0}
    steps = 0
    for _ in range(cfg.epochs):
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
            )
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            optimizer.step()
            totals["loss"] += loss.total.item()
            totals["bce"] += loss.bce.item()
            totals["contrastive"] += loss.contrastive.item()
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
