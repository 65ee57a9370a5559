"""Where every stage reads and writes, and which Redis it talks to.

One object, :class:`PlatformPaths`, names every location of the data flow::

    events/        day-partitioned event log (input contract, see derm.events.schema)
    offline/       Feast offline store: Parquet that DuckDB reads directly
    snapshots/     upstream embedding snapshots + manifests, before validation
    models/        upstream and downstream checkpoints
    validation/    Great Expectations project and Data Docs
    registry.db    Feast registry
    redis/         data directory of the private local Redis server

The data directory comes from ``DERM_DATA_DIR`` (default ``<project>/data``) so
that the Feast repository, the CLI and the tests agree without passing paths
around.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FEATURE_REPO_DIR = PROJECT_ROOT / "feature_repo"

DATA_DIR_ENV = "DERM_DATA_DIR"
# Read by feature_repo/feature_store.yaml through Feast's ${VAR} expansion.
REDIS_CONNECTION_ENV = "DERM_REDIS_CONNECTION_STRING"
REDIS_TYPE_ENV = "DERM_REDIS_TYPE"
PROFILE_ENV = "DERM_PROFILE"
# The cluster profile's Ray (feature_store.cluster.yaml); empty = a local Ray in the process.
RAY_ADDRESS_ENV = "DERM_RAY_ADDRESS"

PROFILES = ("local", "production", "cluster")

# The Feast configuration of each profile, in feature_repo/: the same entities, views and services everywhere.
FEATURE_STORE_YAML = {
    "local": "feature_store.yaml",
    "production": "feature_store.yaml",
    # Ray offline store (bucketed ASOF joins in Ray tasks) and Redis Cluster online.
    "cluster": "feature_store.cluster.yaml",
}


@dataclass(frozen=True)
class PlatformPaths:
    """Every on-disk location of the platform, derived from one data directory."""

    data_dir: Path

    @classmethod
    def from_env(cls) -> PlatformPaths:
        return cls(Path(os.environ.get(DATA_DIR_ENV, PROJECT_ROOT / "data")).resolve())

    @property
    def events_dir(self) -> Path:
        return self.data_dir / "events"

    @property
    def offline_dir(self) -> Path:
        return self.data_dir / "offline"

    @property
    def stats_dir(self) -> Path:
        return self.offline_dir / "stats"

    @property
    def embeddings_offline_dir(self) -> Path:
        return self.offline_dir / "embeddings"

    @property
    def snapshots_dir(self) -> Path:
        return self.data_dir / "snapshots"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def validation_dir(self) -> Path:
        return self.data_dir / "validation"

    @property
    def registry_path(self) -> Path:
        return self.data_dir / "registry.db"

    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"

    @property
    def redis_cluster_dir(self) -> Path:
        """Nodes of the private Redis Cluster of the cluster profile."""
        return self.data_dir / "redis-cluster"


def active_profile() -> str:
    """``local`` (a private redis-server started by the project), ``production`` (your Redis), or ``cluster``
    (scale-out: Ray + Redis Cluster; a private local cluster unless ``DERM_REDIS_CONNECTION_STRING`` is set)."""
    profile = os.environ.get(PROFILE_ENV, "local")
    if profile not in PROFILES:
        raise ValueError(f"{PROFILE_ENV}={profile!r}: expected one of {', '.join(PROFILES)}")
    return profile


def feature_store_yaml(repo_dir: Path = FEATURE_REPO_DIR) -> Path:
    """The ``feature_store.yaml`` of the active profile (``DERM_PROFILE``) in ``repo_dir``."""
    return repo_dir / FEATURE_STORE_YAML[active_profile()]
