"""Deprecated: ``materialization.fast_redis`` moved to
``derm.feast_plugins.redis_online_store`` in 0.2; this shim goes in 0.3.

Only here so that a ``feature_store.yaml`` written for 0.1 keeps loading; point its
``type:`` at the new path.
"""

import warnings

from derm.feast_plugins.redis_online_store import FastRedisOnlineStore, FastRedisOnlineStoreConfig

warnings.warn(
    "materialization.fast_redis is deprecated and will be removed in derm-platform 0.3: "
    "use derm.feast_plugins.redis_online_store in feature_store.yaml",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["FastRedisOnlineStore", "FastRedisOnlineStoreConfig"]
