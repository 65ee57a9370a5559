"""DERM upstream model: user tower, Pin tower and interaction tower.

Paper: "Decoupled Entity Representation Learning for Pinterest Ads Ranking",
https://arxiv.org/abs/2509.04337.

The two entity towers turn entity features into a few embedding tokens, mix
them with DHEN-style layers (each layer an ensemble of interaction modules:
MLP, self-attention, MaskNet), flatten and project to ``dim`` and L2-normalise.
Their outputs are the exported embeddings. Context (surface, day of week)
enters only the interaction tower, so the entity embeddings stay general and
stable across surfaces.

Entity ids are hashed into fixed-size tables (``id mod buckets``) so that new
ids of later days fit a warm-started model without resizing it.

Example::

    cfg = DermConfig(dim=64)
    model = DermModel(cfg)
    logit, user_emb, pin_emb = model(batch)   # (B,), (B, 64), (B, 64)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from derm.events.schema import SURFACES

N_COUNT_FEATURES = 3  # log1p of impressions, clicks, conversions in the count window
USER_KEYS = ("user_id", "user_counts", "user_seq")
PIN_KEYS = ("pin_id", "category_id", "advertiser_id", "pin_counts")
CONTEXT_KEYS = ("surface", "day_of_week")


@dataclass(frozen=True)
class DermConfig:
    dim: int = 64  # size of the exported user and Pin embeddings
    token_dim: int = 32  # width of each entity token inside a tower
    num_dhen_layers: int = 2
    dhen_modules: tuple[str, ...] = ("mlp", "attention")  # >= 2 of "mlp", "attention", "masknet"
    num_heads: int = 2  # self-attention heads (token_dim must divide by it)
    mlp_hidden: int = 128  # hidden width of the MLP / MaskNet modules
    user_id_buckets: int = 1 << 15  # hashed; sized so a checkpoint (weights + Adam) stays ~30 MB
    pin_id_buckets: int = 1 << 14
    category_buckets: int = 1 << 8
    advertiser_buckets: int = 1 << 12
    context_dim: int = 8  # surface and day-of-week embedding width
    interaction_hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        unknown = set(self.dhen_modules) - set(_MODULES)
        if unknown or len(self.dhen_modules) < 2:
            raise ValueError(f"dhen_modules={self.dhen_modules}: need >= 2 of {sorted(_MODULES)}")
        if self.token_dim % self.num_heads:
            raise ValueError(f"token_dim={self.token_dim} is not divisible by num_heads={self.num_heads}")


def _mlp(sizes: list[int], dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class MLPModule(nn.Module):
    """Mixes all tokens of an entity through one MLP over their concatenation.

    Args:
        num_tokens: ``T``.
        token_dim: ``d``.
        hidden: hidden width.

    Shapes: ``(B, T, d) -> (B, T, d)``.
    """

    def __init__(self, num_tokens: int, token_dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = _mlp([num_tokens * token_dim, hidden, num_tokens * token_dim], dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens.flatten(1)).view_as(tokens)


class AttentionModule(nn.Module):
    """Self-attention between the tokens of one entity.

    Shapes: ``(B, T, d) -> (B, T, d)``.
    """

    def __init__(self, num_tokens: int, token_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(token_dim, num_heads, dropout=dropout, batch_first=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return out


class MaskNetModule(nn.Module):
    """MaskNet block: an instance-guided mask (from all tokens) gates the tokens, then a projection.

    Shapes: ``(B, T, d) -> (B, T, d)``.
    """

    def __init__(self, num_tokens: int, token_dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        width = num_tokens * token_dim
        self.mask = _mlp([width, hidden, width], dropout)
        self.project = nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.flatten(1)  # (B, T*d)
        return self.project(self.mask(flat) * flat).view_as(tokens)


_MODULES = {"mlp", "attention", "masknet"}


class DHENLayer(nn.Module):
    """One DHEN layer: an ensemble of interaction modules, summed, plus a residual and LayerNorm.

    Args:
        num_tokens: tokens per entity ``T``.
        cfg: model config; ``cfg.dhen_modules`` names the ensemble.

    Shapes: ``(B, T, d) -> (B, T, d)``.
    """

    def __init__(self, num_tokens: int, cfg: DermConfig) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        for name in cfg.dhen_modules:
            if name == "mlp":
                modules.append(MLPModule(num_tokens, cfg.token_dim, cfg.mlp_hidden, cfg.dropout))
            elif name == "attention":
                modules.append(AttentionModule(num_tokens, cfg.token_dim, cfg.num_heads, cfg.dropout))
            else:
                modules.append(MaskNetModule(num_tokens, cfg.token_dim, cfg.mlp_hidden, cfg.dropout))
        self.ensemble = nn.ModuleList(modules)
        self.norm = nn.LayerNorm(cfg.token_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mixed = sum(module(tokens) for module in self.ensemble)  # (B, T, d)
        return self.norm(tokens + mixed)


class _EntityBackbone(nn.Module):
    """DHEN layers over an entity's tokens, flattened, projected to ``dim`` and L2-normalised.

    Shapes: ``(B, T, d) -> (B, dim)``.
    """

    def __init__(self, num_tokens: int, cfg: DermConfig) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[DHENLayer(num_tokens, cfg) for _ in range(cfg.num_dhen_layers)])
        self.project = nn.Linear(num_tokens * cfg.token_dim, cfg.dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(self.layers(tokens).flatten(1)), dim=-1)


class UserTower(nn.Module):
    """User tower: id, recent clicked Pins (attention-pooled) and counting features -> ``(B, dim)``.

    Args:
        cfg: model config.

    Example::

        emb = UserTower(cfg)(user_id, user_counts, user_seq)   # (B, dim), unit norm

    Inputs:
        user_id: ``(B,)`` int64.
        user_counts: ``(B, 3)`` float, log1p counts.
        user_seq: ``(B, L)`` int64 Pin ids, most recent first, ``-1`` = padding.
    """

    num_tokens = 3

    def __init__(self, cfg: DermConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.id_embedding = nn.Embedding(cfg.user_id_buckets, cfg.token_dim)
        # Own Pin table: the towers share nothing, so each can be exported and versioned alone.
        self.seq_embedding = nn.Embedding(cfg.pin_id_buckets, cfg.token_dim)
        self.seq_query = nn.Parameter(torch.randn(cfg.token_dim) / cfg.token_dim**0.5)
        self.counts = nn.Linear(N_COUNT_FEATURES, cfg.token_dim)
        self.backbone = _EntityBackbone(self.num_tokens, cfg)

    def pool_sequence(self, user_seq: torch.Tensor) -> torch.Tensor:
        """Attention pooling with a learned query; an empty sequence pools to zeros. ``(B, L) -> (B, d)``."""
        mask = user_seq >= 0  # (B, L)
        seq = self.seq_embedding(torch.remainder(user_seq, self.cfg.pin_id_buckets))  # (B, L, d)
        scores = (seq @ self.seq_query) / self.cfg.token_dim**0.5  # (B, L)
        weights = torch.softmax(scores.masked_fill(~mask, -1e9), dim=-1) * mask  # (B, L)
        return (weights.unsqueeze(-1) * seq).sum(1)  # (B, d)

    def forward(self, user_id: torch.Tensor, user_counts: torch.Tensor, user_seq: torch.Tensor) -> torch.Tensor:
        tokens = torch.stack(
            [
                self.id_embedding(torch.remainder(user_id, self.cfg.user_id_buckets)),
                self.pool_sequence(user_seq),
                self.counts(user_counts),
            ],
            dim=1,
        )  # (B, 3, d)
        return self.backbone(tokens)  # (B, dim)


class PinTower(nn.Module):
    """Pin tower: id, category, advertiser and counting features -> ``(B, dim)``.

    Example::

        emb = PinTower(cfg)(pin_id, category_id, advertiser_id, pin_counts)   # (B, dim), unit norm
    """

    num_tokens = 4

    def __init__(self, cfg: DermConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.id_embedding = nn.Embedding(cfg.pin_id_buckets, cfg.token_dim)
        self.category_embedding = nn.Embedding(cfg.category_buckets, cfg.token_dim)
        self.advertiser_embedding = nn.Embedding(cfg.advertiser_buckets, cfg.token_dim)
        self.counts = nn.Linear(N_COUNT_FEATURES, cfg.token_dim)
        self.backbone = _EntityBackbone(self.num_tokens, cfg)

    def forward(
        self,
        pin_id: torch.Tensor,
        category_id: torch.Tensor,
        advertiser_id: torch.Tensor,
        pin_counts: torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.cfg
        tokens = torch.stack(
            [
                self.id_embedding(torch.remainder(pin_id, cfg.pin_id_buckets)),
                self.category_embedding(torch.remainder(category_id, cfg.category_buckets)),
                self.advertiser_embedding(torch.remainder(advertiser_id, cfg.advertiser_buckets)),
                self.counts(pin_counts),
            ],
            dim=1,
        )  # (B, 4, d)
        return self.backbone(tokens)  # (B, dim)


class InteractionTower(nn.Module):
    """Both entity embeddings plus context (surface, day of week) through an MLP to a logit.

    Shapes: ``(B, dim), (B, dim), (B,), (B,) -> (B,)``.
    """

    def __init__(self, cfg: DermConfig) -> None:
        super().__init__()
        self.surface_embedding = nn.Embedding(len(SURFACES), cfg.context_dim)
        self.day_of_week_embedding = nn.Embedding(7, cfg.context_dim)
        width = 3 * cfg.dim + 2 * cfg.context_dim
        self.mlp = _mlp([width, *cfg.interaction_hidden, 1], cfg.dropout)

    def forward(
        self, user_emb: torch.Tensor, pin_emb: torch.Tensor, surface: torch.Tensor, day_of_week: torch.Tensor
    ) -> torch.Tensor:
        features = torch.cat(
            [
                user_emb,
                pin_emb,
                user_emb * pin_emb,  # explicit affinity term; the MLP would need width to learn it
                self.surface_embedding(surface),
                self.day_of_week_embedding(day_of_week),
            ],
            dim=-1,
        )  # (B, 3*dim + 2*context_dim)
        return self.mlp(features).squeeze(-1)  # (B,)


class DermModel(nn.Module):
    """DERM: user tower + Pin tower + interaction tower, one model per objective (CTR or CVR).

    Args:
        cfg: :class:`DermConfig`.

    Example::

        model = DermModel(DermConfig(dim=32))
        logit, user_emb, pin_emb = model(batch)
        user_only = model.embed("user", batch)  # (B, 32)
    """

    def __init__(self, cfg: DermConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.user_tower = UserTower(cfg)
        self.pin_tower = PinTower(cfg)
        self.interaction = InteractionTower(cfg)

    def embed(self, entity: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Entity embeddings ``(B, dim)`` from the entity's own features only (``"user"`` or ``"pin"``)."""
        if entity == "user":
            return self.user_tower(*(batch[k] for k in USER_KEYS))
        if entity == "pin":
            return self.pin_tower(*(batch[k] for k in PIN_KEYS))
        raise ValueError(f"unknown entity {entity!r}: expected 'user' or 'pin'")

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(logit (B,), user_emb (B, dim), pin_emb (B, dim))``."""
        user_emb = self.embed("user", batch)
        pin_emb = self.embed("pin", batch)
        logit = self.interaction(user_emb, pin_emb, batch["surface"], batch["day_of_week"])
        return logit, user_emb, pin_emb
