"""The platform's names, defined once: objectives, entities, embedding families, Feast views and features.

Paper: "Decoupled Entity Representation Learning for Pinterest Ads Ranking",
https://arxiv.org/abs/2509.04337 -- one upstream DERM model per *objective*
(``ctr``: impressions -> click, ``cvr``: clicks -> conversion), each producing a
user and a Pin embedding *family*; the downstream rankers have the same objectives.

================  ===============================  =========================
concept           name                             example
================  ===============================  =========================
objective         ``OBJECTIVES``                   ``ctr``
entity, join key  ``ENTITIES``                     ``user`` -> ``user_id``
family            ``family_name(objective, e)``    ``ctr_user``
feature           ``feature_name(family)``         ``ctr_user_emb``
feature view      ``feature_view_name(f, v)``      ``ctr_user_emb_v3``
ranker service    ``ranker_service_name(o)``       ``ctr_ranker``
embedding service ``embedding_service_name(o, v)`` ``ctr_embeddings_v3``
counting view     ``COUNTING_VIEWS``               ``user_daily_stats``
================  ===============================  =========================

Example::

    family = family_name("ctr", "pin")                 # "ctr_pin"
    feature_view_name(family, "v3")                    # "ctr_pin_emb_v3"
    join_key(family), objective_of(family)             # ("pin_id", "ctr")
"""

from __future__ import annotations

from datetime import timedelta

OBJECTIVES: dict[str, tuple[str, str | None]] = {  # objective -> (label column, example filter)
    "ctr": ("clicked", None),  # every impression, label = click
    "cvr": ("converted", "clicked"),  # every click, label = conversion
}
ENTITIES: dict[str, str] = {"user": "user_id", "pin": "pin_id"}  # Feast entity -> join key

FAMILIES: dict[str, str] = {  # embedding family -> Feast entity
    f"{objective}_{entity}": entity for objective in OBJECTIVES for entity in ENTITIES
}

# A missed refresh day or two is tolerated; older vectors are "missing" (offline and online alike).
EMBEDDING_TTL = timedelta(days=3)

# Daily counting features (derm.materialization.counting_features): view -> entity, and each view's features.
COUNTING_VIEWS: dict[str, str] = {"user_daily_stats": "user", "pin_daily_stats": "pin"}
COUNTING_SUFFIXES = ("impressions_1d", "clicks_1d", "conversions_1d", "impressions_7d", "clicks_7d", "ctr_7d")
COUNTING_TTL = timedelta(days=7)

# Latest advertiser and category of every Pin (the rankers' context features).
PIN_ATTRIBUTES_VIEW = "pin_attributes"
PIN_ATTRIBUTES = ("advertiser_id", "category_id")


def family_name(objective: str, entity: str) -> str:
    """``ctr`` + ``user`` -> ``ctr_user``."""
    _check(objective, OBJECTIVES, "objective")
    _check(entity, ENTITIES, "entity")
    return f"{objective}_{entity}"


def families_of(objective: str) -> dict[str, str]:
    """entity -> family of one upstream model: ``{"user": "ctr_user", "pin": "ctr_pin"}``."""
    return {entity: family_name(objective, entity) for entity in ENTITIES}


def objective_of(family: str) -> str:
    """The upstream model a family comes from: ``ctr_user`` -> ``ctr``."""
    _check(family, FAMILIES, "embedding family")
    return family.split("_", 1)[0]


def entity_of(family: str) -> str:
    _check(family, FAMILIES, "embedding family")
    return FAMILIES[family]


def join_key(family: str) -> str:
    """The Feast join key of a family's entity: ``ctr_pin`` -> ``pin_id``."""
    return ENTITIES[entity_of(family)]


def feature_name(family: str) -> str:
    """The embedding's feature (and training-set column): ``ctr_user`` -> ``ctr_user_emb``."""
    return f"{family}_emb"


def feature_view_name(family: str, version: str) -> str:
    """One feature view per (family, model version): ``ctr_user_emb_v3``."""
    return f"{feature_name(family)}_{version}"


def ranker_service_name(objective: str) -> str:
    """The feature service of a downstream ranker: counting views + every family at its promoted version."""
    _check(objective, OBJECTIVES, "objective")
    return f"{objective}_ranker"


def embedding_service_name(objective: str, version: str) -> str:
    """The immutable feature service of one upstream model version (both of its families)."""
    return f"{objective}_embeddings_{version}"


def counting_features(view: str) -> list[str]:
    """The features of a counting view: ``user_daily_stats`` -> ``user_impressions_1d``, ..."""
    prefix = COUNTING_VIEWS[view]
    return [f"{prefix}_{suffix}" for suffix in COUNTING_SUFFIXES]


def all_counting_features() -> list[str]:
    return [name for view in COUNTING_VIEWS for name in counting_features(view)]


def _check(value: str, known: dict[str, object], what: str) -> None:
    if value not in known:
        raise ValueError(f"unknown {what} {value!r}: expected one of {sorted(known)}")
