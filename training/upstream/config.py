"""What defines an upstream model version: model, features, training and refresh settings.

Paper: "Decoupled Entity Representation Learning for Pinterest Ads Ranking",
https://arxiv.org/abs/2509.04337. Everything here that shapes the embeddings is
hashed into the version (:meth:`UpstreamConfig.config_hash`); a change gets a new
model version, whose snapshots are separate feature views.

Example::

    cfg = UpstreamConfig(refresh=RefreshConfig(aggregation="overwrite"))
    cfg.config_hash("ctr")        # sha256 of the canonical JSON of version_payload("ctr")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from datetime import timedelta

from derm.training.upstream.features import FeatureConfig
from derm.training.upstream.model import DermConfig

AGGREGATIONS = ("ema", "overwrite")
IDLE_POLICIES = ("carry_forward", "reembed")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1  # passes over each day's examples (warm start carries the earlier days)
    batch_size: int = 512
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    temperature: float = 0.1  # tau of the in-batch sampled softmax
    contrastive_weight: float = 0.5  # total loss = BCE + weight * contrastive
    # Weight of the logistic loss of the user x Pin dot product over every example row (see
    # derm.training.upstream.losses.impression_loss): a user's non-clicked impressions become his
    # negatives. 0 = off, the paper's loss.
    impression_weight: float = 0.0
    # Passes over the first day of a version's chain (a cold start, no earlier weights to warm-start
    # from); None = ``epochs``.
    first_day_epochs: int | None = None
    seed: int = 0  # initial weights and per-day shuffling
    # Replay window for sparse days (see derm.training.upstream.train.replay_arrays). A day with fewer than
    # ``replay_min_examples`` examples of the objective (impressions for CTR, clicks for CVR) also trains on
    # the examples of the days just before it, newest first, until the minimum is reached or
    # ``replay_max_days`` earlier days have been added; 0 turns replay off. A day without any example replays
    # nothing (no new event to dilute; its weights stay those of the day before). Why these defaults:
    # - 1,024 = two batches of the default size. The in-batch softmax draws its negatives and its log-Q
    #   estimate from the batch; below two batches a day's update is one or two noisy steps taken on a
    #   handful of (often bursty) users, which moves the warm-started weights toward that day's few
    #   entities and away from everything else. Padding the update with recent history keeps each
    #   step's negatives varied without changing what a normal-volume day does (it replays nothing).
    # - 7 days: a bound on how often one event is seen again (at most 7 extra passes, over a week) and
    #   on staleness, so a replayed event is never older than one weekly cycle; under drift the most
    #   recent days are the ones still worth learning from, which is why replay walks back newest first
    #   and stops as soon as the minimum is met.
    replay_min_examples: int = 1_024
    replay_max_days: int = 7

    def __post_init__(self) -> None:
        if self.replay_min_examples < 0:
            raise ValueError(f"replay_min_examples={self.replay_min_examples}: expected 0 (off) or more")
        if self.replay_max_days < 0:
            raise ValueError(f"replay_max_days={self.replay_max_days}: expected 0 (off) or more")
        if self.impression_weight < 0:
            raise ValueError(f"impression_weight={self.impression_weight}: expected 0 (off) or more")
        if self.first_day_epochs is not None and self.first_day_epochs < 1:
            raise ValueError(f"first_day_epochs={self.first_day_epochs}: expected None (= epochs) or at least 1")


# Training settings added after versions were first hashed, with the value that means "as before":
# left out of the version payload at that value, so an existing version keeps its hash (and its
# data directory its versions) and a payload without them reads back as the default.
_TRAIN_SETTINGS_ADDED_LATER = {"impression_weight": 0.0, "first_day_epochs": None}


@dataclass(frozen=True)
class RefreshConfig:
    aggregation: str = "ema"  # "ema": w*E(t-1) + (1-w)*E_daily(t); "overwrite": E_daily(t)
    ema_weight: float = 0.8  # w; the paper's best setting
    active_window_days: int = 90  # entities without an event in this window are dropped
    # An entity without an event on day t: "carry_forward" keeps its last embedding (the paper keeps the
    # last embedding of each entity per day); "reembed" embeds it again from its ageing features.
    idle_entities: str = "carry_forward"
    renormalize: bool = True  # unit-norm rows after averaging: the Pin index ranks by inner product
    quality_k: int = 10  # recall@k of the daily upstream quality check (not part of the version)
    publish_delay: timedelta = timedelta(hours=1)  # after end of day; shifts availability only
    inference_batch_size: int = 65_536  # rows per forward pass and per Parquet row group

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r}: expected one of {AGGREGATIONS}")
        if self.idle_entities not in IDLE_POLICIES:
            raise ValueError(f"idle_entities={self.idle_entities!r}: expected one of {IDLE_POLICIES}")
        if self.quality_k < 1:
            raise ValueError(f"quality_k={self.quality_k}: expected at least 1")
        if not 0.0 <= self.ema_weight < 1.0:
            raise ValueError(f"ema_weight={self.ema_weight}: expected 0 <= w < 1")
        if self.publish_delay < timedelta(0):
            raise ValueError("publish_delay must not be negative: a snapshot cannot exist before its data")


@dataclass(frozen=True)
class UpstreamConfig:
    model: DermConfig = field(default_factory=DermConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    refresh: RefreshConfig = field(default_factory=RefreshConfig)

    def version_payload(self, objective: str) -> dict:
        """Everything that changes the embeddings; publish delay, batch size and quality k do not, so they are
        left out."""
        refresh = self.refresh
        return {
            "objective": objective,
            "model": dataclasses.asdict(self.model),
            "features": dataclasses.asdict(self.features),
            "train": {
                key: value
                for key, value in dataclasses.asdict(self.train).items()
                if key not in _TRAIN_SETTINGS_ADDED_LATER or value != _TRAIN_SETTINGS_ADDED_LATER[key]
            },
            "aggregation": {
                "aggregation": refresh.aggregation,
                # Overwrite ignores w; keep it out so the same embeddings never get two versions.
                "ema_weight": refresh.ema_weight if refresh.aggregation == "ema" else None,
                "active_window_days": refresh.active_window_days,
                "idle_entities": refresh.idle_entities,
                "renormalize": refresh.renormalize,
            },
        }

    @classmethod
    def from_version_payload(cls, payload: dict) -> UpstreamConfig:
        """The config a version's ``config.json`` (:meth:`version_payload`) stands for.

        Settings that do not change the embeddings (publish delay, batch sizes, quality k) are the
        defaults; ``config_hash`` of the result is the version's.
        """

        def build(kind: type, values: dict) -> object:
            tuples = {f.name for f in dataclasses.fields(kind) if isinstance(getattr(kind(), f.name), tuple)}
            return kind(**{k: tuple(v) if k in tuples else v for k, v in values.items()})

        aggregation = {k: v for k, v in payload["aggregation"].items() if v is not None}  # overwrite has no w
        return cls(
            model=build(DermConfig, payload["model"]),
            features=build(FeatureConfig, payload["features"]),
            train=build(TrainConfig, payload["train"]),
            refresh=RefreshConfig(**aggregation),
        )

    def config_hash(self, objective: str) -> str:
        canonical = json.dumps(self.version_payload(objective), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()
