"""The Feast repository as the pipeline uses it: the same code paths as the ``feast`` CLI, in process.

``feast apply`` and ``feast materialize-incremental`` cost a fresh interpreter
(and a fresh ``import feast``) each; the pipeline and the tests call the very
functions those commands call instead, so what they do is what a user's
``feast`` command does.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from derm.core.paths import (
    DATA_DIR_ENV,
    FEATURE_REPO_DIR,
    RAY_ADDRESS_ENV,
    REDIS_CONNECTION_ENV,
    REDIS_TYPE_ENV,
    PlatformPaths,
    feature_store_yaml,
)


def feast_environment(paths: PlatformPaths, redis_connection_string: str | None = None) -> dict[str, str]:
    """The variables ``feature_store.yaml`` expands, for ``paths`` and the given Redis."""
    connection = redis_connection_string or os.environ.get(REDIS_CONNECTION_ENV)
    if not connection:
        raise RuntimeError(
            f"{REDIS_CONNECTION_ENV} is not set: start the local Redis with `derm redis up` "
            'and run `eval "$(derm env)"`, or export the connection string of your Redis'
        )
    return {
        DATA_DIR_ENV: str(paths.data_dir),
        REDIS_CONNECTION_ENV: connection,
        REDIS_TYPE_ENV: os.environ.get(REDIS_TYPE_ENV, "redis"),
        # Feast leaves an unset ${VAR} as it is: empty means a local Ray (cluster profile).
        RAY_ADDRESS_ENV: os.environ.get(RAY_ADDRESS_ENV, ""),
    }


def export_feast_environment(paths: PlatformPaths, redis_connection_string: str | None = None) -> None:
    os.environ.update(feast_environment(paths, redis_connection_string))


def _repo_module_names(repo_dir: Path) -> list[str]:
    return [p.stem for p in repo_dir.glob("*.py")]


@contextlib.contextmanager
def _in_repo(repo_dir: Path):
    # Feast's apply chdirs into the repo and imports its files as top-level modules.
    cwd = os.getcwd()
    if str(repo_dir) not in sys.path:
        sys.path.append(str(repo_dir))
    try:
        yield
    finally:
        os.chdir(cwd)


def feature_store(repo_dir: Path = FEATURE_REPO_DIR):
    """A :class:`feast.FeatureStore` over the project's repository, configured by the active profile's yaml."""
    from feast import FeatureStore

    return FeatureStore(repo_path=str(repo_dir), fs_yaml_file=feature_store_yaml(repo_dir))


def apply_repo(repo_dir: Path = FEATURE_REPO_DIR) -> None:
    """Run ``feast apply`` on the repository, in this process.

    The repository's modules are re-imported each time, so definitions generated
    from published manifests are current.
    """
    from feast.repo_config import load_repo_config
    from feast.repo_operations import apply_total

    for name in _repo_module_names(repo_dir):
        sys.modules.pop(name, None)
    config = load_repo_config(repo_dir, feature_store_yaml(repo_dir))
    with _in_repo(repo_dir):
        apply_total(config, repo_dir, skip_source_validation=False)


def materialize_incremental(end: datetime, repo_dir: Path = FEATURE_REPO_DIR, views: list[str] | None = None) -> None:
    """``feast materialize-incremental END``: copy everything newer than the last run into Redis."""
    feature_store(repo_dir).materialize_incremental(end_date=end, feature_views=views)


@dataclass(frozen=True)
class FeatureRepo:
    """A handle on a Feast repository, handed to library code that registers or reads definitions.

    Publishing needs both the store (to read the registry, to materialize) and ``feast apply``
    (to register definitions regenerated from the catalog); library functions take this handle
    instead of locating the repository themselves.

    Example::

        repo = FeatureRepo()                      # the project's feature_repo/
        publish_snapshot(source, paths, repo=repo)
        repo.store().get_feature_service("ctr_ranker")
    """

    repo_dir: Path = FEATURE_REPO_DIR

    def store(self):
        """A fresh :class:`feast.FeatureStore` (it reads the registry as it is now)."""
        return feature_store(self.repo_dir)

    def apply(self) -> None:
        """``feast apply`` of the definitions regenerated from what is published."""
        apply_repo(self.repo_dir)

    def materialize_incremental(self, end: datetime, views: list[str] | None = None) -> None:
        materialize_incremental(end, self.repo_dir, views)
