"""Deprecated: ``retrieval.asof_offline_store`` moved to
``derm.feast_plugins.asof_offline_store`` in 0.2; this shim goes in 0.3.

Only here so that a ``feature_store.yaml`` written for 0.1 keeps loading; point its
``type:`` at the new path.
"""

import warnings

from derm.feast_plugins.asof_offline_store import AsofDuckDBOfflineStore, AsofDuckDBOfflineStoreConfig

warnings.warn(
    "retrieval.asof_offline_store is deprecated and will be removed in derm-platform 0.3: "
    "use derm.feast_plugins.asof_offline_store in feature_store.yaml",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["AsofDuckDBOfflineStore", "AsofDuckDBOfflineStoreConfig"]
