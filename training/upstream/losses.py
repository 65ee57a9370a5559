"""Losses of the DERM upstream model: BCE on the label plus an in-batch sampled softmax.

Paper: "Decoupled Entity Representation Learning for Pinterest Ads Ranking",
https://arxiv.org/abs/2509.04337.

The contrastive term pulls the user and Pin embeddings of positive pairs (a
click for DERM-CTR, a conversion for DERM-CVR) together, using the other Pins
of the batch as negatives. In-batch negatives over-sample popular Pins, so each
logit is corrected by the log of the Pin's sampling probability ``Q(p)``::

    L = -log( exp(u_i.p_i / tau - log Q(p_i)) / sum_j exp(u_i.p_j / tau - log Q(p_j)) )

The softmax's negatives are other users' positives: a user's own non-clicked impressions never
push his dot products down. The optional impression term (:func:`impression_loss`, off by
default, not in the paper) adds a logistic loss on the dot product over every example row, so
those impressions act as his negatives, as in matrix factorisation.

Example::

    out = derm_loss(logit, label, user_emb, pin_emb, pin_logq, pin_id, temperature=0.1)
    out.total.backward()
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def sampled_softmax_loss(
    user_emb: torch.Tensor,
    pin_emb: torch.Tensor,
    pin_logq: torch.Tensor,
    temperature: float,
    pin_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """In-batch sampled softmax with log-Q correction, averaged over the positive pairs.

    Args:
        user_emb: ``(P, D)`` user embeddings of the positive pairs.
        pin_emb: ``(P, D)`` Pin embeddings of the same pairs (row ``i`` is user ``i``'s positive).
        pin_logq: ``(P,)`` ``log Q(p)`` of each row's Pin, Q = its share of the positives
            in the training window.
        temperature: ``tau``; the dot products are divided by it.
        pin_ids: ``(P,)`` optional Pin ids; when given, another row holding the same Pin
            is not used as a negative (it is the positive, not a sample of the rest).

    Returns:
        Scalar loss.
    """
    logits = user_emb @ pin_emb.T / temperature - pin_logq.unsqueeze(0)  # (P, P)
    targets = torch.arange(logits.shape[0], device=logits.device)
    if pin_ids is not None:
        duplicate = (pin_ids.unsqueeze(0) == pin_ids.unsqueeze(1)) & ~torch.eye(
            len(pin_ids), dtype=torch.bool, device=logits.device
        )  # (P, P)
        logits = logits.masked_fill(duplicate, float("-inf"))
    return F.cross_entropy(logits, targets)


def impression_loss(
    user_emb: torch.Tensor, pin_emb: torch.Tensor, label: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Logistic loss of the user x Pin dot product on every example row (clicked or not).

    The logit is ``u.p / tau`` plus the batch's label log-odds (a constant, not learnt), so the dot
    product carries how much more or less likely than average the pair's label is: the user x Pin
    taste, with the base rate left to the offset.

    Args:
        user_emb: ``(B, D)`` L2-normalised user embeddings.
        pin_emb: ``(B, D)`` L2-normalised Pin embeddings of the same rows.
        label: ``(B,)`` 0/1 float label.
        temperature: ``tau``, as in the sampled softmax.

    Returns:
        Scalar loss.
    """
    rate = label.mean().clamp(1e-4, 1 - 1e-4)
    offset = torch.log(rate / (1 - rate)).detach()
    dot = (user_emb * pin_emb).sum(dim=1) / temperature  # (B,)
    return F.binary_cross_entropy_with_logits(dot + offset, label)


class DermLoss(NamedTuple):
    total: torch.Tensor
    bce: torch.Tensor
    contrastive: torch.Tensor
    impression: torch.Tensor


def derm_loss(
    logit: torch.Tensor,
    label: torch.Tensor,
    user_emb: torch.Tensor,
    pin_emb: torch.Tensor,
    pin_logq: torch.Tensor,
    pin_ids: torch.Tensor | None = None,
    temperature: float = 0.1,
    contrastive_weight: float = 1.0,
    impression_weight: float = 0.0,
) -> DermLoss:
    """``BCE(logit, label) + contrastive_weight * sampled_softmax(positives) + impression_weight * impression``.

    Args:
        logit: ``(B,)`` interaction-tower output.
        label: ``(B,)`` 0/1 float label (click or conversion).
        user_emb: ``(B, D)`` L2-normalised user-tower output.
        pin_emb: ``(B, D)`` L2-normalised Pin-tower output.
        pin_logq: ``(B,)`` log Q of each row's Pin (only read on positive rows).
        pin_ids: ``(B,)`` Pin ids, to keep duplicates of the positive out of the negatives.
        temperature: softmax temperature ``tau``.
        contrastive_weight: weight of the contrastive term; 0 turns it off.
        impression_weight: weight of :func:`impression_loss`; 0 (the default) turns it off.

    Returns:
        :class:`DermLoss` with the total and its parts; the contrastive part is 0
        when the batch holds fewer than two positives (no negative to contrast with).
    """
    bce = F.binary_cross_entropy_with_logits(logit, label)
    positive = label > 0.5  # (B,)
    if contrastive_weight == 0 or int(positive.sum()) < 2:
        contrastive = logit.new_zeros(())
    else:
        contrastive = sampled_softmax_loss(
            user_emb[positive],
            pin_emb[positive],
            pin_logq[positive],
            temperature,
            None if pin_ids is None else pin_ids[positive],
        )
    if impression_weight == 0:
        impression = logit.new_zeros(())
    else:
        impression = impression_loss(user_emb, pin_emb, label, temperature)
    total = bce + contrastive_weight * contrastive + impression_weight * impression
    return DermLoss(total, bce, contrastive, impression)
