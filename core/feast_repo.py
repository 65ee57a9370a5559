"""The Feast repository as the pipeline uses it: the same code paths as the ``feast`` CLI, in process.

``feast apply`` and ``feast materialize-incremental`` cost a fresh interpreter
(and a fresh ``import feast``) each; the pipeline and the tests call the very
functions those commands call instead, so what they do is what a user's
``feast`` command does.

The registry is Feast's SQL registry (``registry_type: sql``): a SQLite file,
``<data dir>/registry.db``, on the local profile, a Postgres URL in production.
Every object is one row written in its own transaction, so a killed or failed
write leaves the previous row, and two commands changing different objects keep
both changes (Feast's file registry rewrote the whole file in place).
:func:`prepare_registry` runs before Feast opens it: it refuses a SQLite path that
SQLAlchemy would misread, and moves a data directory's file registry (from before
the switch) into SQLite once, objects and materialization intervals included.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
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
    from feast.repo_config import load_repo_config

    config = load_repo_config(repo_dir, feature_store_yaml(repo_dir))
    prepare_registry(config)
    _finish_interrupted_apply(config, repo_dir)
    return FeatureStore(repo_path=str(repo_dir), config=config)


def _apply_marker(config) -> Path | None:
    path = sqlite_registry_file(config)
    return None if path is None else path.with_name(f".{path.name}.applying")


@contextlib.contextmanager
def _apply_journal(config) -> Iterator[None]:
    """Mark the registry as being applied, for as long as ``feast apply`` runs; a kill leaves the mark.

    The SQL registry writes each object in its own transaction, so an apply killed part way leaves some
    objects of the new definitions and not others (a view without its entity). The mark, a file locked
    by the applier, tells the next :func:`feature_store` to apply again before anyone reads.
    """
    marker = _apply_marker(config)
    if marker is None:
        yield
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    while True:  # lock the file that is at the path now (another applier may unlink it meanwhile)
        handle = open(marker, "a")  # held for the whole apply
        fcntl.flock(handle, fcntl.LOCK_EX)
        if marker.exists() and os.stat(marker).st_ino == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()
    try:
        yield
    finally:  # a failed apply raises to its caller; only a killed one leaves the mark
        marker.unlink(missing_ok=True)
        handle.close()


def _finish_interrupted_apply(config, repo_dir: Path) -> None:
    """Apply again when the last ``feast apply`` was killed part way (its mark is left, nobody holds it)."""
    marker = _apply_marker(config)
    if marker is None or not marker.exists():
        return
    with open(marker, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # an apply is running: it completes the registry itself
        fcntl.flock(handle, fcntl.LOCK_UN)
    print(f"the last feast apply on {marker.parent} was interrupted: applying again", file=sys.stderr)
    apply_repo(repo_dir)


# The first 16 bytes of every SQLite database file.
_SQLITE_HEADER = b"SQLite format 3\x00"
FILE_REGISTRY_BACKUP_SUFFIX = ".file-registry"


class RegistryPathError(ValueError):
    """The registry's SQLite URL does not name the file it was written as (a ``?`` or ``%`` in the path)."""


def sqlite_registry_file(config) -> Path | None:
    """The SQLite file of a ``registry_type: sql`` registry on SQLite; None for any other registry.

    Raises:
        RegistryPathError: the path holds characters SQLAlchemy reads as URL syntax (``?`` starts the
            query, ``%XX`` is decoded), so the database would be another file than the one named.
    """
    from sqlalchemy.engine import make_url

    registry = config.registry
    if registry.registry_type != "sql" or not registry.path.startswith("sqlite:///"):
        return None
    named = registry.path.removeprefix("sqlite:///")
    database = make_url(registry.path).database
    if database != named:
        raise RegistryPathError(
            f"registry path {registry.path!r}: SQLAlchemy reads it as the file {database!r} ('?' starts a "
            "query and '%XX' is decoded in a database URL); use a data directory without '?' or '%'"
        )
    return Path(named)


def prepare_registry(config) -> None:
    """Make the configured registry ready for Feast: check a SQLite path, migrate a file registry found there.

    A data directory from before the SQL registry holds Feast's file registry (a protobuf) at the
    path that now names the SQLite database. It is copied, object by object with its materialization
    intervals, into a new SQLite file beside it, which then replaces it in one rename; the protobuf is
    kept as ``registry.db.file-registry``. A process killed part way leaves the protobuf in place and
    the next command starts over; a lock keeps two commands from migrating at once.

    Args:
        config: a loaded :class:`feast.repo_config.RepoConfig`.

    Raises:
        RegistryPathError: see :func:`sqlite_registry_file`.
    """
    path = sqlite_registry_file(config)
    if path is None or not _is_file_registry(path):
        return
    with open(path.with_name(f".{path.name}.migrate.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_file_registry(path):  # another command may have migrated it meanwhile
            _migrate_file_registry(config, path)


def _is_file_registry(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(len(_SQLITE_HEADER))
    except FileNotFoundError:
        return False
    return bool(head) and head != _SQLITE_HEADER


def _migrate_file_registry(config, path: Path) -> None:
    from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto

    from derm.core.files import atomic_write_bytes

    data = path.read_bytes()
    proto = RegistryProto()
    try:
        proto.ParseFromString(data)
    except Exception as error:  # protobuf's DecodeError
        raise ValueError(f"{path}: neither a SQLite database nor a Feast file registry ({error})") from error
    staging = path.with_name(f".{path.name}.migrating")
    staging.unlink(missing_ok=True)
    _copy_registry_proto(proto, config, f"sqlite:///{staging}")
    atomic_write_bytes(path.with_name(path.name + FILE_REGISTRY_BACKUP_SUFFIX), data)
    os.replace(staging, path)
    print(
        f"moved the Feast file registry {path} into the SQL registry (old file kept as {path.name}"
        f"{FILE_REGISTRY_BACKUP_SUFFIX})",
        file=sys.stderr,
    )


def _copy_registry_proto(proto, config, url: str) -> None:
    """Write every object of a file registry's protobuf into a new SQL registry at ``url``."""
    from feast.data_source import DataSource
    from feast.entity import Entity
    from feast.feature_service import FeatureService
    from feast.feature_view import FeatureView
    from feast.infra.infra_object import Infra
    from feast.infra.registry.sql import SqlRegistry, SqlRegistryConfig
    from feast.on_demand_feature_view import OnDemandFeatureView
    from feast.permissions.permission import Permission
    from feast.project import Project
    from feast.saved_dataset import SavedDataset, ValidationReference
    from feast.stream_feature_view import StreamFeatureView

    settings = config.registry.model_dump(exclude={"path", "read_path", "registry_type"})
    target = SqlRegistry(SqlRegistryConfig(path=url, **settings), config.project, None)
    # Not "sync": a sync registry re-reads every table after each write, which a one-off copy does not need.
    target.cache_mode = "none"
    try:
        for item in proto.projects:
            target.apply_project(Project.from_proto(item))
        for item in proto.entities:
            target.apply_entity(Entity.from_proto(item), item.spec.project)
        for item in proto.data_sources:
            target.apply_data_source(DataSource.from_proto(item), item.project)
        # Views before the services that reference them; each keeps its materialization intervals.
        for kind, items in (
            (FeatureView, proto.feature_views),
            (StreamFeatureView, proto.stream_feature_views),
            (OnDemandFeatureView, proto.on_demand_feature_views),
        ):
            for item in items:
                target.apply_feature_view(kind.from_proto(item), item.spec.project)
        for item in proto.feature_services:
            target.apply_feature_service(FeatureService.from_proto(item), item.spec.project)
        for item in proto.saved_datasets:
            target.apply_saved_dataset(SavedDataset.from_proto(item), item.spec.project)
        for item in proto.validation_references:
            target.apply_validation_reference(ValidationReference.from_proto(item), item.project)
        for item in proto.permissions:
            target.apply_permission(Permission.from_proto(item), item.spec.project)
        if proto.HasField("infra"):
            target.update_infra(Infra.from_proto(proto.infra), config.project)
    finally:
        target.write_engine.dispose()


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
    prepare_registry(config)
    with _apply_journal(config), _in_repo(repo_dir):
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

    def teardown_views(self, names: list[str]) -> list[str]:
        """Delete the online rows of the registered feature views ``names`` (what ``feast apply`` does to a
        view it drops); returns those found in the registry.

        ``feast apply`` on the SQL registry deletes a dropped view's row before it clears the view's online
        rows, so an apply killed in between would leave the rows with nothing left to name them. A caller
        about to drop views clears their rows first, through the provider's own ``update_infra``.
        """
        store = self.store()
        registered = {view.name: view for view in store.list_feature_views()}
        tables = [registered[name] for name in names if name in registered]
        if tables:
            store._get_provider().update_infra(
                project=store.project,
                tables_to_delete=tables,
                tables_to_keep=[],
                entities_to_delete=[],
                entities_to_keep=[],
                partial=False,
            )
        return [table.name for table in tables]
