"""Deprecated: ``materialization.vector_engine`` moved to
``derm.feast_plugins.vector_engine`` in 0.2; this shim goes in 0.3.

Only here so that a ``feature_store.yaml`` written for 0.1 keeps loading; point its
``type:`` at the new path.
"""

import warnings

from derm.feast_plugins.vector_engine import VectorMaterializationEngine, VectorMaterializationEngineConfig

warnings.warn(
    "materialization.vector_engine is deprecated and will be removed in derm-platform 0.3: "
    "use derm.feast_plugins.vector_engine in feature_store.yaml",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["VectorMaterializationEngine", "VectorMaterializationEngineConfig"]
