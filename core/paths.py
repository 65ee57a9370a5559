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

PROFILES = ("local", "production")


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


def active_profile() -> str:
    """``local`` (a private redis-server started by the project) or ``production``."""
    profile = os.environ.get(PROFILE_ENV, "local")
    if profile not in PROFILES:
        raise ValueError(f"{PROFILE_ENV}={profile!r}: expected one of {', '.join(PROFILES)}")
    return profile
