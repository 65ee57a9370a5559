"""Embedding feature views and ranker feature services, generated from what was published.

One feature view per live (family, model version), e.g. ``ctr_user_emb_v3``
with one ``Array(Float32)`` field ``ctr_user_emb``, named in this module as
``ctr_user_emb_v3_fv``. Feature services:

* ``<model>_embeddings_<version>`` (e.g. ``ctr_embeddings_v3``): both families
  of one upstream model version, immutable;
* ``ctr_ranker`` / ``cvr_ranker``: the counting features plus every family at its
  promoted version; ``derm promote`` and ``derm rollback`` move them.

Nothing here is written by hand: the catalog under
``$DERM_DATA_DIR/offline/embeddings`` (see derm.materialization.catalog) is the only
source, so ``feast apply`` always matches the stores.
"""

from counting_features import pin_daily_stats_fv, user_daily_stats_fv
from entities import pin_entity, user_entity
from feast import FeatureService, FeatureView, Field, FileSource
from feast.data_format import ParquetFormat
from feast.types import Array, Float32

from derm.core.naming import (
    EMBEDDING_TTL,
    OBJECTIVES,
    embedding_service_name,
    entity_of,
    feature_name,
    objective_of,
    ranker_service_name,
)
from derm.core.paths import PlatformPaths
from derm.materialization.catalog import Catalog

_catalog = Catalog(PlatformPaths.from_env().embeddings_offline_dir)
_entities = {"user": user_entity, "pin": pin_entity}
_views: dict[tuple[str, str], FeatureView] = {}

for _published in _catalog.versions():
    _view = FeatureView(
        name=_published.feature_view,
        entities=[_entities[entity_of(_published.family)]],
        ttl=EMBEDDING_TTL,
        schema=[Field(name=feature_name(_published.family), dtype=Array(Float32))],
        source=FileSource(
            name=f"{_published.feature_view}_source",
            path=str(_published.path),
            file_format=ParquetFormat(),
            timestamp_field="event_timestamp",
        ),
        online=True,
        tags={"family": _published.family, "model_version": _published.version, "dim": str(_published.dim)},
    )
    _views[_published.family, _published.version] = _view
    globals()[f"{_published.feature_view}_fv"] = _view

for _objective, _version in sorted({(objective_of(family), version) for family, version in _views}):
    _families = [
        view for (family, version), view in _views.items() if objective_of(family) == _objective and version == _version
    ]
    _name = embedding_service_name(_objective, _version)
    globals()[f"{_name}_fs"] = FeatureService(
        name=_name,
        features=_families,
        tags={"kind": "embedding_version", "model_version": _version},
    )

_state = _catalog.read_state()
_promoted = [_views[f, v] for f, v in sorted(_state.promoted.items()) if (f, v) in _views]
for _objective in OBJECTIVES:
    _name = ranker_service_name(_objective)
    globals()[f"{_name}_fs"] = FeatureService(
        name=_name,
        features=[user_daily_stats_fv, pin_daily_stats_fv, *_promoted],
        tags={"kind": "ranker", **{f"{f}_version": v for f, v in sorted(_state.promoted.items())}},
    )
