"""Downstream CTR/CVR ranker: feature transformation, DCNv2 + MLP model, and the saved-ranker contract.

Paper: "Decoupled Entity Representation Learning for Pinterest Ads Ranking",
https://arxiv.org/abs/2509.04337. The downstream rankers consume the stored DERM
embeddings as ordinary input features, next to id/context and counting features.

One :class:`FeatureTransform` turns feature columns into model tensors, and the
*same* object runs in training (over the Parquet training set written from
``FeatureStore.get_historical_features``) and in serving (over the dict
``FeatureStore.get_online_features(...).to_dict()`` returns plus request
context). Inputs, per row:

* sparse: ``user_id``, ``pin_id``, ``advertiser_id``, ``category_id`` hashed into
  fixed bucket counts, ``surface`` (vocabulary of ``derm.events.schema.SURFACES``, unknown
  -> an extra bucket) and ``day_of_week`` (0 = Monday, derived from
  ``event_timestamp`` when absent);
* dense: the counting features (``user_impressions_1d`` ...), ``log1p`` then
  standardised with train-split mean/std; null -> 0 before ``log1p``, plus one
  "missing" flag per counting view;
* embeddings: one ``<family>_emb`` column per family, concatenated (optionally
  projected, as in the paper), with a missing flag per family; a missing vector
  is replaced by the family's learned cold-start vector (never zeros), and in
  training whole families are dropped to it at random (``embedding_dropout``);
* optionally (``RankerModelConfig.sequence_length > 0``) the user's recent engaged
  Pins before the impression (column ``recent_pins``, most recent first), encoded
  by a small transformer (:class:`SequenceEncoder`); optionally a mixture of
  experts (:class:`MixtureOfExperts`, MMoE-style gates) as the deep tower.

Serving contract (what ``serving/`` calls)::

    ranker = load_ranker(models_dir / "downstream" / "ctr" / run)
    ranker.feature_refs          # list[str]: exact "view:feature" refs for get_online_features
    ranker.embedding_versions    # dict[str, str]: {"ctr_user": "v1", ...}
    ranker.input_columns         # list[str]: columns score() reads
    p = ranker.score(frame)      # np.ndarray (B,) float32 probabilities

``frame`` maps column names to ``np.ndarray`` or ``list`` of length ``B``: the
columns ``get_historical_features`` / ``get_online_features`` return (ids,
counting features with ``None`` for missing, embedding columns as ``(B, D)``
float32 arrays or lists of ``D`` floats with ``None`` for missing) plus the
context columns ``advertiser_id``, ``category_id``, ``surface`` and
``day_of_week`` (or ``event_timestamp``); a ranker with a sequence encoder also
reads ``recent_pins`` (list of Pin ids per row). Missing embeddings get the
learned cold-start vector with their flag set, in training and in serving alike.
Probabilities are calibrated: ``sigmoid(a * logit + b)`` with ``RankerSpec.calibration
= [a, b]`` fitted on the validation days.

Saved layout: ``<models_dir>/downstream/<objective>/<run>/model.pt`` (state dict) and
``ranker.json`` (:class:`RankerSpec`: objective, feature service, feature refs,
embedding versions and dims, normalisation stats, bucket sizes, model config).

Example::

    spec = RankerSpec(objective="ctr", feature_service="ctr_ranker", feature_refs=refs,
                      embedding_versions={"ctr_user": "v1"}, embedding_dims={"ctr_user": 64})
    spec = spec.with_counting_stats(train_frame)
    ranker = Ranker(spec, RankerModel(spec))
    batch = ranker.transform(train_frame)          # dict of tensors
    logits = ranker.model(batch)                   # (B,)
    ranker.save(path); load_ranker(path).score(online_dict)
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from derm.core.files import replace_directory
from derm.core.naming import COUNTING_VIEWS, OBJECTIVES, all_counting_features, families_of, feature_name
from derm.events.schema import SURFACES

MODEL_FILE = "model.pt"
SPEC_FILE = "ranker.json"

ID_BUCKETS: dict[str, int] = {  # hashed id features -> bucket count
    "user_id": 50_021,
    "pin_id": 20_011,
    "advertiser_id": 5_003,
    "category_id": 211,
}

_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
SEQUENCE_COLUMN = "recent_pins"  # the user's engaged Pins strictly before the impression, most recent first


@dataclass(frozen=True)
class RankerModelConfig:
    id_embedding_dim: int = 16  # width of each hashed id / context embedding
    projection_dim: int | None = 64  # project the concatenated DERM embeddings to this size (None: no projection)
    cross_layers: int = 2  # DCNv2 cross layers
    cross_rank: int | None = 64  # low-rank cross weights (None: full rank)
    mlp_hidden: tuple[int, ...] = (256, 128)  # deep tower, parallel to the cross network
    dropout: float = 0.1
    # Training only: share of (row, family) embeddings replaced by the cold vector; 1.0 switches the
    # families off (the cold vector in training and serving).
    embedding_dropout: float = 0.0
    sequence_length: int = 0  # > 0: transformer over the user's last N engaged Pins (column "recent_pins")
    sequence_heads: int = 2
    sequence_layers: int = 1
    experts: int = 0  # > 0: the deep tower is a mixture of this many expert MLPs with a softmax gate (MMoE)
    expert_hidden: int = 128
    # One more input per upstream model whose user and Pin families are both read: the dot product of the
    # two vectors, the upstream's own user x Pin score. The projection and cross layers can form it, but
    # only by learning a 64 x 64 bilinear form from the ranker's rows, and on 10^5 rows they do not: with
    # the generator's own tastes as embeddings (derm plant-upstream) the ranker without it found none of
    # the Pin, CVR and moving-average steps, with it all three (README, "A positive control").
    embedding_dot_products: bool = True


@dataclass(frozen=True)
class RankerSpec:
    """Everything needed to rebuild the transformation and the model: written as ``ranker.json``."""

    objective: str  # "ctr" | "cvr"
    feature_service: str  # the Feast feature service the training set came from
    feature_refs: list[str]  # exact "view:feature" refs
    embedding_versions: dict[str, str]  # family -> model version, e.g. {"ctr_user": "v1"}
    embedding_dims: dict[str, int]  # family -> D
    counting_features: list[str] = field(default_factory=all_counting_features)
    counting_mean: list[float] = field(default_factory=list)  # of log1p(x), train split
    counting_std: list[float] = field(default_factory=list)
    id_buckets: dict[str, int] = field(default_factory=lambda: dict(ID_BUCKETS))
    surfaces: list[str] = field(default_factory=lambda: list(SURFACES))
    model: RankerModelConfig = field(default_factory=RankerModelConfig)
    extra: dict[str, Any] = field(default_factory=dict)  # training window, metrics, ... (informational)
    calibration: list[float] = field(default_factory=lambda: [1.0, 0.0])  # p = sigmoid(a * logit + b), [a, b]
    # family -> upstream config hash of the version trained on (its manifests' ``config_hash``): with
    # ``embedding_versions``, what the ranker was trained on, even where a version name means another
    # space (another data dir). Empty in specs saved before it existed; they load as before.
    embedding_config_hashes: dict[str, str] = field(default_factory=dict)

    @property
    def families(self) -> list[str]:
        return list(self.embedding_versions)

    @property
    def families_off(self) -> bool:
        """Families read but switched off (embedding dropout 1.0): the model sees only the cold-start vectors."""
        return bool(self.embedding_versions) and self.model.embedding_dropout >= 1.0

    @property
    def sparse_buckets(self) -> list[int]:
        """Bucket counts of the sparse inputs, in :meth:`FeatureTransform.__call__` column order."""
        return [*self.id_buckets.values(), len(self.surfaces) + 1, 7]

    @property
    def dense_dim(self) -> int:
        return len(self.counting_features) + len(COUNTING_VIEWS)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, default=str)  # key order is meaningful

    @classmethod
    def from_json(cls, text: str) -> RankerSpec:
        raw = json.loads(text)
        if "task" in raw:  # saved by 0.1, which called the objective "task"
            raw["objective"] = raw.pop("task")
        model = raw.pop("model")
        model["mlp_hidden"] = tuple(model["mlp_hidden"])
        model.setdefault("embedding_dot_products", False)  # saved before the option existed: ranked without it
        return cls(**raw, model=RankerModelConfig(**model))

    def with_counting_stats(self, frame: Mapping[str, Any]) -> RankerSpec:
        """This spec with mean/std of ``log1p`` counting features computed on ``frame`` (the train split)."""
        x = np.stack([_log1p_counts(frame[c]) for c in self.counting_features], axis=1)  # (N, C)
        std = x.std(axis=0)
        return dataclasses.replace(
            self, counting_mean=x.mean(axis=0).tolist(), counting_std=np.where(std > 1e-6, std, 1.0).tolist()
        )


# --------------------------------------------------------------------------- column conversion


def _length(values: Any) -> int:
    return len(values)


def _as_float(values: Any) -> np.ndarray:
    """Any column (Arrow, pandas, numpy, list with None) -> float64 ``(B,)`` with NaN for missing."""
    if isinstance(values, pa.ChunkedArray | pa.Array):
        return values.cast(pa.float64()).to_numpy(zero_copy_only=False)
    if hasattr(values, "to_numpy") and not isinstance(values, np.ndarray):  # pandas Series
        return values.to_numpy(dtype=np.float64, na_value=np.nan)
    return np.asarray(values, dtype=np.float64)


def _as_int(values: Any) -> np.ndarray:
    if isinstance(values, pa.ChunkedArray | pa.Array):
        return values.cast(pa.int64()).to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.int64)


def _log1p_counts(values: Any) -> np.ndarray:
    x = _as_float(values)
    return np.log1p(np.clip(np.nan_to_num(x, nan=0.0), 0.0, None))


def embedding_matrix(values: Any, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """An embedding column -> ``(matrix (B, D) float32 with zeros where missing, missing (B,) bool)``.

    Accepts an Arrow list column, a ``(B, D)`` array (NaN rows = missing), or a
    list / pandas Series / object array of vectors with ``None`` for missing.
    """
    if isinstance(values, np.ndarray) and values.ndim == 2:
        if values.shape[1] != dim:
            raise ValueError(f"embedding of width {values.shape[1]}, expected {dim}")
        matrix = values.astype(np.float32, copy=True)
        missing = np.isnan(matrix).all(axis=1)
        matrix[missing] = 0.0
        return matrix, missing
    if not isinstance(values, pa.ChunkedArray | pa.Array):
        if hasattr(values, "to_numpy") and not isinstance(values, np.ndarray):
            values = values.to_numpy(dtype=object)
        values = pa.array(list(values), type=pa.list_(pa.float32()), from_pandas=True)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], pa.list_(pa.float32()))
    if pa.types.is_large_list(values.type) or pa.types.is_fixed_size_list(values.type):
        values = values.cast(pa.list_(values.type.value_type))
    missing = values.is_null().to_numpy(zero_copy_only=False)
    lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
    present = ~missing
    if np.any(lengths[present] != dim):
        bad = int(np.flatnonzero(present & (np.nan_to_num(lengths, nan=dim) != dim))[0])
        raise ValueError(f"row {bad}: embedding of length {int(lengths[bad])}, expected {dim}")
    matrix = np.zeros((len(values), dim), dtype=np.float32)
    flat = values.flatten().cast(pa.float32()).to_numpy(zero_copy_only=False)  # only the non-null lists' values
    matrix[present] = flat.reshape(-1, dim)
    return matrix, missing


def sequence_matrix(values: Any, length: int) -> np.ndarray:
    """A column of Pin-id lists (Arrow list, or lists / arrays with ``None`` for empty) -> ``(B, L)`` int64, -1-padded.

    The first ``length`` ids of each list are kept (lists are most recent first).
    """
    from derm.training.upstream.features import pad_sequences

    if isinstance(values, np.ndarray) and values.ndim == 2:
        return values[:, :length].astype(np.int64)
    if not isinstance(values, pa.ChunkedArray | pa.Array):
        if hasattr(values, "to_numpy") and not isinstance(values, np.ndarray):
            values = values.to_numpy(dtype=object)
        values = pa.array([None if v is None else list(v) for v in values], type=pa.list_(pa.int64()))
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], pa.list_(pa.int64()))
    if pa.types.is_large_list(values.type):
        values = values.cast(pa.list_(values.type.value_type))
    return pad_sequences(values.cast(pa.list_(pa.int64())), length)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function of a float array: the same bits as ``1 / (1 + exp(-x))`` wherever ``exp(-x)`` is finite.

    Extreme negative logits overflowed ``exp`` (a numpy warning, then 0); the argument is capped at the
    dtype's largest finite exponent, so they give ~1e-308 (float64) instead, silently. Neither
    ``torch.sigmoid`` nor ``scipy.special.expit`` (scipy is not a declared dependency) keeps the
    hand-written form's bits elsewhere: both differ by an ulp on some inputs.

    Example::

        sigmoid(np.array([-1000.0, 0.0, 1000.0]))  # [~1e-308, 0.5, 1.0], no warning
    """
    x = np.asarray(x)
    cap = float(np.floor(np.log(np.finfo(x.dtype).max)))  # 709 (float64), 88 (float32): exp stays finite
    return 1.0 / (1.0 + np.exp(np.minimum(-x, cap)))


def hash_ids(ids: np.ndarray, buckets: int, salt: int) -> np.ndarray:
    """Deterministic multiplicative hash of int64 ids into ``[0, buckets)`` (same in training and serving)."""
    with np.errstate(over="ignore"):
        h = (ids.astype(np.uint64) + np.uint64(salt)) * _HASH_MULTIPLIER
        h ^= h >> np.uint64(31)
    return (h % np.uint64(buckets)).astype(np.int64)


def _day_of_week(frame: Mapping[str, Any], n: int) -> np.ndarray:
    if "day_of_week" in frame:
        return _as_int(frame["day_of_week"])
    if "event_timestamp" in frame:
        import pandas as pd

        stamps = frame["event_timestamp"]
        if isinstance(stamps, pa.ChunkedArray | pa.Array):
            stamps = stamps.to_pandas()
        return pd.DatetimeIndex(pd.to_datetime(stamps, utc=True)).dayofweek.to_numpy().astype(np.int64)
    return np.zeros(n, dtype=np.int64)


def _surface_index(values: Any, vocabulary: list[str]) -> np.ndarray:
    if isinstance(values, pa.ChunkedArray | pa.Array):
        values = values.to_numpy(zero_copy_only=False)
    uniques, inverse = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
    lookup = {s: i for i, s in enumerate(vocabulary)}
    codes = np.array([lookup.get(u, len(vocabulary)) for u in uniques], dtype=np.int64)
    return codes[inverse.reshape(-1)]


class FeatureTransform:
    """Columns -> model tensors; the one transformation shared by training and serving.

    Args:
        spec: the ranker spec (bucket sizes, counting stats, embedding families and dims).

    Example::

        batch = FeatureTransform(spec)(frame)
        batch["sparse"]       # (B, 6) int64: 4 hashed ids, surface, day of week
        batch["dense"]        # (B, 14) float32: standardised log1p counts + 2 missing flags
        batch["emb"]          # (B, sum D) float32, zeros where missing
        batch["emb_missing"]  # (B, F) float32, one flag per family
        batch["seq"]          # (B, L) int64 hashed Pin ids, -1 = padding (only with a sequence encoder)
    """

    def __init__(self, spec: RankerSpec) -> None:
        self.spec = spec
        self.mean = np.asarray(spec.counting_mean or [0.0] * len(spec.counting_features), dtype=np.float64)
        self.std = np.asarray(spec.counting_std or [1.0] * len(spec.counting_features), dtype=np.float64)

    @property
    def input_columns(self) -> list[str]:
        ids = list(self.spec.id_buckets)
        return [
            *ids,
            "surface",
            "day_of_week",
            *self.spec.counting_features,
            *map(feature_name, self.spec.families),
            *([SEQUENCE_COLUMN] if self.spec.model.sequence_length else []),
        ]

    def __call__(
        self, frame: Mapping[str, Any], label: str | None = None, memo: dict[Any, Any] | None = None
    ) -> dict[str, torch.Tensor]:
        """The model's input tensors for the rows of ``frame`` (see the class docstring).

        Args:
            frame: column name -> array / list / Arrow column, all of length ``B``.
            label: a column to add as ``batch["label"]`` (training).
            memo: serving only: one dict per request, shared by the transforms of the request's
                rankers, whose frames hold the same column objects. Whatever depends only on those
                columns and on settings both specs share (hashed ids, surface codes, raw counts and
                their ``log1p``, embedding matrices) is computed once and its tensors shared
                read-only; each ranker still standardises with its own counting stats. Training
                passes none and computes everything, as it always did.
        """
        spec = self.spec
        n = _length(frame["user_id"])

        def once(key: tuple[Any, ...], columns: tuple[Any, ...], compute: Any) -> Any:
            # Keyed by the columns' identities and checked against the columns themselves (kept alive
            # by the memo), so another request's column that reuses an id can never hit.
            if memo is None:
                return compute()
            hit = memo.get(key)
            if hit is not None and len(hit[0]) == len(columns) and all(map(operator.is_, hit[0], columns)):
                return hit[1]
            value = compute()
            memo[key] = (columns, value)
            return value

        id_columns = tuple(frame[c] for c in spec.id_buckets)
        context = tuple(frame[c] if c in frame else None for c in ("surface", "day_of_week", "event_timestamp"))
        sparse_key = ("sparse", *map(id, id_columns), *map(id, context), tuple(spec.id_buckets.items()),
                      tuple(spec.surfaces))  # fmt: skip

        def sparse_tensor() -> torch.Tensor:
            sparse = [hash_ids(_as_int(column), b, salt=i) for i, (column, b) in
                      enumerate(zip(id_columns, spec.id_buckets.values(), strict=True))]  # fmt: skip
            sparse.append(_surface_index(frame["surface"], spec.surfaces))
            sparse.append(np.clip(_day_of_week(frame, n), 0, 6))
            return torch.from_numpy(np.stack(sparse, axis=1).astype(np.int64))

        count_columns = tuple(frame[c] for c in spec.counting_features)

        def logged_counts() -> tuple[np.ndarray, np.ndarray]:
            counts = np.stack([_as_float(c) for c in count_columns], axis=1) if n else np.zeros((0, 0))
            counts = counts.reshape(n, len(spec.counting_features))
            view_missing = [
                np.isnan(counts[:, spec.counting_features.index(f"{prefix}_impressions_7d")])
                for prefix in COUNTING_VIEWS.values()
            ]
            return np.log1p(np.clip(np.nan_to_num(counts, nan=0.0), 0.0, None)), np.stack(view_missing, axis=1)

        logged, view_missing = once(
            ("counts", *map(id, count_columns), tuple(spec.counting_features)), count_columns, logged_counts
        )
        dense = np.concatenate([(logged - self.mean) / self.std, view_missing], axis=1)
        emb_columns = tuple(frame[feature_name(family)] for family in spec.families)
        dims = tuple(spec.embedding_dims[family] for family in spec.families)

        def embedding_tensors() -> tuple[torch.Tensor, torch.Tensor]:
            matrices, missing = [], []
            for column, dim in zip(emb_columns, dims, strict=True):
                matrix, miss = embedding_matrix(column, dim)
                matrices.append(matrix)
                missing.append(miss)
            return (
                torch.from_numpy(np.concatenate(matrices, axis=1) if matrices else np.zeros((n, 0), np.float32)),
                torch.from_numpy(
                    np.stack(missing, axis=1).astype(np.float32) if missing else np.zeros((n, 0), np.float32)
                ),
            )

        emb, emb_missing = once(("emb", *map(id, emb_columns), dims), emb_columns, embedding_tensors)
        batch = {
            "sparse": once(sparse_key, (*id_columns, *context), sparse_tensor),
            "dense": torch.from_numpy(dense.astype(np.float32)),
            "emb": emb,
            "emb_missing": emb_missing,
        }
        length = spec.model.sequence_length
        if length:
            if SEQUENCE_COLUMN not in frame:
                raise ValueError(
                    f"column {SEQUENCE_COLUMN!r} missing: this ranker encodes the user's recent engaged Pins "
                    "(derm.training.downstream.dataset.with_user_sequences builds it point in time)"
                )
            seq = sequence_matrix(frame[SEQUENCE_COLUMN], length)
            pin_salt = list(spec.id_buckets).index("pin_id")  # the target Pin's own hashing: one shared table
            hashed = hash_ids(np.maximum(seq, 0), spec.id_buckets["pin_id"], salt=pin_salt)
            batch["seq"] = torch.from_numpy(np.where(seq >= 0, hashed, -1).astype(np.int64))
        if label is not None:
            batch["label"] = torch.from_numpy(_as_float(frame[label]).astype(np.float32))
        return batch


# --------------------------------------------------------------------------- model


class CrossNetV2(nn.Module):
    """DCNv2 cross network: ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` with optional low-rank ``W_l = U_l V_l``.

    Args:
        dim: input width ``d``.
        layers: number of cross layers.
        rank: rank of ``W_l`` (``None``: full ``d x d``).

    Example::

        cross = CrossNetV2(dim=128, layers=2, rank=32)
        y = cross(x0)   # (B, 128) -> (B, 128)
    """

    def __init__(self, dim: int, layers: int, rank: int | None = None) -> None:
        super().__init__()
        if rank is None or rank >= dim:
            self.weights = nn.ModuleList([nn.Linear(dim, dim) for _ in range(layers)])
        else:
            self.weights = nn.ModuleList(
                [nn.Sequential(nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim)) for _ in range(layers)]
            )

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0  # (B, d)
        for weight in self.weights:
            x = x0 * weight(x) + x
        return x


class SequenceEncoder(nn.Module):
    """A small transformer over the user's recent engaged Pins, read out by a learned ``[CLS]`` token.

    The ``[CLS]`` token is always present, so a user without history gets a learned vector, not zeros.

    Args:
        dim: width ``E`` of the item embeddings (the ranker's hashed Pin-id table).
        max_length: longest sequence ``L``.
        heads: attention heads (must divide ``dim``).
        layers: transformer encoder layers.
        dropout: dropout inside the encoder.

    Example::

        encoder = SequenceEncoder(dim=16, max_length=20)
        pooled = encoder(items, padding)   # items (B, L, 16), padding (B, L) bool (True = empty) -> (B, 16)
    """

    def __init__(self, dim: int, max_length: int, heads: int = 2, layers: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.05)
        self.position = nn.Embedding(max_length + 1, dim)
        nn.init.normal_(self.position.weight, std=0.05)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, items: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        b, length, _ = items.shape  # (B, L, E)
        tokens = torch.cat([self.cls.expand(b, 1, -1), items], dim=1)  # (B, L + 1, E)
        tokens = tokens + self.position(torch.arange(length + 1, device=items.device))[None]
        mask = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=items.device), padding], dim=1)
        return self.encoder(tokens, src_key_padding_mask=mask)[:, 0]  # (B, E)


class MixtureOfExperts(nn.Module):
    """MMoE (Ma et al., KDD 2018): expert MLPs shared by the tasks, one softmax gate per task.

    Args:
        dim: input width ``d``.
        experts: number of experts ``X``.
        hidden: output width ``H`` of every expert.
        tasks: number of tasks ``T`` (a gate each); the CTR ranker has one.
        dropout: dropout after each expert's hidden layer.

    Example::

        moe = MixtureOfExperts(dim=128, experts=4, hidden=64)
        y = moe(x)    # (B, 128) -> (B, T, 64)
    """

    def __init__(self, dim: int, experts: int, hidden: int, tasks: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.experts = nn.ModuleList(
            [nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout)) for _ in range(experts)]
        )
        self.gates = nn.Linear(dim, tasks * experts)
        self.tasks, self.n_experts = tasks, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = torch.stack([expert(x) for expert in self.experts], dim=1)  # (B, X, H)
        gates = self.gates(x).view(-1, self.tasks, self.n_experts).softmax(dim=-1)  # (B, T, X)
        return gates @ outputs  # (B, T, H)


def _dot_product_pairs(spec: RankerSpec) -> list[tuple[slice, slice]]:
    """Column slices of the (user, Pin) families of each upstream model the ranker reads both of.

    Only a pair from one space gets its dot product: the same model version (and, where the spec records
    them, the same config hash) and the same width. Vectors of two versions are two spaces whose dot product
    means nothing, so such a pair, e.g. ``ctr_user@v1`` with ``ctr_pin@v2``, gets no input.
    """
    offsets, start = {}, 0
    for family in spec.families:
        offsets[family] = slice(start, start + spec.embedding_dims[family])
        start += spec.embedding_dims[family]
    hashes = spec.embedding_config_hashes
    pairs = []
    for objective in OBJECTIVES:
        user, pin = families_of(objective)["user"], families_of(objective)["pin"]
        if user not in offsets or pin not in offsets:
            continue
        same_space = spec.embedding_versions.get(user) == spec.embedding_versions.get(pin) and (
            hashes.get(user) == hashes.get(pin)
        )
        if same_space and spec.embedding_dims[user] == spec.embedding_dims[pin]:
            pairs.append((offsets[user], offsets[pin]))
    return pairs


class RankerModel(nn.Module):
    """DCNv2-style ranker: hashed id embeddings + dense counts + projected DERM embeddings -> cross || deep -> logit.

    The deep tower is an MLP, or a :class:`MixtureOfExperts` with ``experts > 0``; with
    ``sequence_length > 0`` a :class:`SequenceEncoder` over the user's recent Pins adds ``E`` inputs;
    with ``embedding_dot_products`` each upstream model read as a (user, Pin) pair adds its dot product.
    A missing family gets its learned cold-start vector (``cold_start``, never zeros) and its flag.

    Args:
        spec: the :class:`RankerSpec` (input sizes and :class:`RankerModelConfig`).

    Example::

        model = RankerModel(spec)
        logits = model(FeatureTransform(spec)(frame))   # (B,)
        emb, missing = model.embedding_input(batch)     # (B, sum D) with cold-start rows filled, (B, F)
    """

    def __init__(self, spec: RankerSpec) -> None:
        super().__init__()
        cfg = spec.model
        self.id_embeddings = nn.ModuleList([nn.Embedding(b, cfg.id_embedding_dim) for b in spec.sparse_buckets])
        for table in self.id_embeddings:
            nn.init.normal_(table.weight, std=0.05)
        dims = [spec.embedding_dims[f] for f in spec.families]
        emb_dim = sum(dims)
        self.register_buffer("family_dims", torch.tensor(dims, dtype=torch.long), persistent=False)
        self.cold_start = nn.Parameter(torch.randn(emb_dim) * 0.05)  # (sum D): one learned vector per family
        self.embedding_dropout = cfg.embedding_dropout
        if emb_dim and cfg.projection_dim:
            self.projection: nn.Module = nn.Linear(emb_dim, cfg.projection_dim)
            emb_out = cfg.projection_dim
        else:
            self.projection = nn.Identity()
            emb_out = emb_dim
        self.pin_table = list(spec.id_buckets).index("pin_id")
        self.sequence = (
            SequenceEncoder(cfg.id_embedding_dim, cfg.sequence_length, cfg.sequence_heads, cfg.sequence_layers)
            if cfg.sequence_length
            else None
        )
        seq_out = cfg.id_embedding_dim if self.sequence is not None else 0
        self.dot_pairs = _dot_product_pairs(spec) if cfg.embedding_dot_products else []
        width = len(spec.sparse_buckets) * cfg.id_embedding_dim + spec.dense_dim + emb_out + len(spec.families)
        width += seq_out + len(self.dot_pairs)
        self.cross = CrossNetV2(width, cfg.cross_layers, cfg.cross_rank)
        if cfg.experts:
            self.moe: MixtureOfExperts | None = MixtureOfExperts(width, cfg.experts, cfg.expert_hidden, 1, cfg.dropout)
            self.mlp = nn.Identity()
            previous = cfg.expert_hidden
        else:
            self.moe = None
            layers: list[nn.Module] = []
            previous = width
            for hidden in cfg.mlp_hidden:
                layers += [nn.Linear(previous, hidden), nn.ReLU(), nn.Dropout(cfg.dropout)]
                previous = hidden
            self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(width + previous, 1)

    def embedding_input(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(emb (B, sum D), missing (B, F))``: missing rows (and, in training, dropped ones) hold the cold vector."""
        emb, missing = batch["emb"], batch["emb_missing"]
        if not emb.shape[1]:
            return emb, missing
        if self.embedding_dropout >= 1.0:
            # "Off": every row gets the cold vector, in training and in serving alike, so a ranker whose
            # validation prefers not to use its families is the ranker without them (plus constant inputs).
            missing = torch.ones_like(missing)
        elif self.training and self.embedding_dropout > 0:
            dropped = (torch.rand_like(missing) < self.embedding_dropout).to(missing.dtype)
            missing = torch.maximum(missing, dropped)
        fill = missing.repeat_interleave(self.family_dims, dim=1)  # (B, sum D)
        return emb * (1.0 - fill) + self.cold_start * fill, missing

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        sparse = batch["sparse"]  # (B, S)
        ids = [table(sparse[:, i]) for i, table in enumerate(self.id_embeddings)]  # S x (B, E)
        parts = [*ids, batch["dense"]]
        emb, missing = self.embedding_input(batch)
        if emb.shape[1]:
            parts += [self.projection(emb), missing]
        for user, pin in self.dot_pairs:  # (B, 1) each: the upstream's user x Pin score, cold vectors included
            parts.append((emb[:, user] * emb[:, pin]).sum(dim=1, keepdim=True))
        if self.sequence is not None:
            seq = batch["seq"]  # (B, L), -1 = padding
            items = self.id_embeddings[self.pin_table](seq.clamp(min=0))  # (B, L, E)
            parts.append(self.sequence(items, seq < 0))  # (B, E)
        x0 = torch.cat(parts, dim=1)  # (B, d)
        deep = self.moe(x0)[:, 0] if self.moe is not None else self.mlp(x0)  # (B, H)
        return self.head(torch.cat([self.cross(x0), deep], dim=1)).squeeze(1)  # (B,)


# --------------------------------------------------------------------------- ranker


class Ranker:
    """A trained ranker: spec + transform + model. See the module docstring for the serving contract."""

    def __init__(self, spec: RankerSpec, model: RankerModel | None = None) -> None:
        self.spec = spec
        self.transform = FeatureTransform(spec)
        self.model = model if model is not None else RankerModel(spec)

    @property
    def feature_refs(self) -> list[str]:
        return list(self.spec.feature_refs)

    @property
    def embedding_versions(self) -> dict[str, str]:
        return dict(self.spec.embedding_versions)

    @property
    def input_columns(self) -> list[str]:
        return self.transform.input_columns

    def logits(
        self, frame: Mapping[str, Any], batch_size: int = 65_536, memo: dict[Any, Any] | None = None
    ) -> np.ndarray:
        """Raw logits ``(B,)``; ``memo``: see :meth:`FeatureTransform.__call__` (serving shares it between rankers)."""
        batch = self.transform(frame, memo=memo)
        n = batch["sparse"].shape[0]
        self.model.eval()
        out = []
        with torch.inference_mode():
            if 0 < n <= batch_size:  # serving's case: one batch, no slicing of every tensor
                out.append(self.model(batch))
            else:
                for start in range(0, n, batch_size):
                    out.append(self.model({k: v[start : start + batch_size] for k, v in batch.items()}))
        if not out:
            return np.zeros(0, np.float32)
        return (out[0] if len(out) == 1 else torch.cat(out)).numpy()  # serving's one batch: no copy

    def score(self, frame: Mapping[str, Any], memo: dict[Any, Any] | None = None) -> np.ndarray:
        """Calibrated probabilities ``(B,)`` float32 for the rows of ``frame`` (column name -> array or list).

        ``memo``: one dict per request shared by the request's rankers (see :meth:`FeatureTransform.__call__`).
        """
        scale, bias = self.spec.calibration
        logits = self.logits(frame, memo=memo).astype(np.float64)
        return sigmoid(scale * logits + bias).astype(np.float32)

    def save(self, directory: Path) -> Path:
        """``model.pt`` and ``ranker.json`` into ``directory``, which appears (or is replaced) whole."""
        directory = Path(directory)
        staging = directory.with_name(f".{directory.name}.staging-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        torch.save(self.model.state_dict(), staging / MODEL_FILE)
        (staging / SPEC_FILE).write_text(self.spec.to_json() + "\n")
        replace_directory(staging, directory)  # serving never loads a spec without its weights
        return directory


def load_ranker(path: Path | str) -> Ranker:
    """The ranker saved in ``path`` (a folder with ``model.pt`` and ``ranker.json``)."""
    path = Path(path)
    spec = RankerSpec.from_json((path / SPEC_FILE).read_text())
    model = RankerModel(spec)
    state = torch.load(path / MODEL_FILE, map_location="cpu", weights_only=True)
    # Saved before the learned cold-start vector: missing embeddings were zeros, which a zero vector reproduces.
    state.setdefault("cold_start", torch.zeros_like(model.cold_start))
    model.load_state_dict(state)
    model.eval()
    return Ranker(spec, model)


def ranker_dir(models_dir: Path, objective: str, run: str) -> Path:
    """Where a ranker run is saved: ``<models_dir>/downstream/<objective>/<run>/``."""
    return Path(models_dir) / "downstream" / objective / run


def latest_ranker_dirs(models_dir: Path) -> dict[str, Path]:
    """objective -> the most recently saved ranker folder (by the time its spec was written, then run name)."""
    found: dict[str, Path] = {}
    for objective in OBJECTIVES:
        saved = ranker_dir(models_dir, objective, "*").parent.glob(f"*/{SPEC_FILE}")
        runs = [spec.parent for spec in saved if not spec.parent.name.startswith(".")]  # not a save in progress
        if runs:
            found[objective] = max(runs, key=lambda run: ((run / SPEC_FILE).stat().st_mtime_ns, run.name))
    return found


def load_rankers(models_dir: Path, directories: Sequence[Path] = ()) -> dict[str, Ranker]:
    """Rankers keyed by objective: the given folders, or else the newest saved one of each objective.

    Raises:
        ValueError: nothing saved (and nothing given), or two rankers of one objective given.
    """
    directories = list(directories) or list(latest_ranker_dirs(models_dir).values())
    if not directories:
        raise ValueError(f"no saved ranker under {Path(models_dir) / 'downstream'}: train one or name its folder")
    rankers: dict[str, Ranker] = {}
    for directory in directories:
        ranker = load_ranker(directory)
        objective = ranker.spec.objective
        if objective in rankers:
            raise ValueError(f"two {objective} rankers given ({directory}); give one per objective")
        rankers[objective] = ranker
    return rankers


__all__ = [
    "SEQUENCE_COLUMN",
    "CrossNetV2",
    "FeatureTransform",
    "MixtureOfExperts",
    "Ranker",
    "RankerModel",
    "RankerModelConfig",
    "RankerSpec",
    "SequenceEncoder",
    "embedding_matrix",
    "hash_ids",
    "latest_ranker_dirs",
    "load_ranker",
    "load_rankers",
    "ranker_dir",
    "sequence_matrix",
    "sigmoid",
]
