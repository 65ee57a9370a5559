"""Publish validated embedding snapshots into Feast: offline Parquet, registry, Redis; promote, roll back, retire.

The order of a publish is what keeps the promoted version served while
anything goes wrong:

1. refuse, before writing anything, a snapshot whose family or version is
   unknown, that fails the Great Expectations gate, or that would overwrite a
   published (family, version, day) with different bytes;
2. write the day to the offline store through a staging folder and one
   atomic rename;
3. when the catalog gained a view, ``feast apply`` the definitions regenerated
   from it (the new view appears; the ranker feature services still point to
   the promoted versions); a new day of a registered view changes no definition;
4. materialize that day into Redis through Feast (Feast keeps the newer of two
   writes per entity, so a re-run after a crash completes the day idempotently);
5. record the day as online in the catalog; only then can the version be promoted.

Example::

    paths, repo = PlatformPaths.from_env(), FeatureRepo()
    result = publish_snapshot(Path("data/snapshots/ctr_user/v1/date=2026-01-05"), paths, repo=repo)
    promote(paths, "ctr_user", "v1", repo=repo)
"""

from __future__ import annotations

import os
import shutil
import signal
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from derm.core.feast_repo import FeatureRepo
from derm.core.files import publish_directory
from derm.core.model_versions import ModelVersions
from derm.core.naming import FAMILIES, feature_name, feature_view_name, objective_of
from derm.core.paths import PlatformPaths
from derm.core.snapshot import MANIFEST_FILE, SnapshotManifest, list_snapshots, read_manifest, snapshot_dir
from derm.core.sql import connect, ident
from derm.materialization.catalog import OFFLINE_DATA_FILE, Catalog
from derm.validation.gate import load_thresholds, validate_snapshot

# Fault injection for the crash-consistency test: the publisher SIGKILLs itself right
# after the named step, exactly as an OOM kill or a lost node would stop it.
CRASH_AFTER_ENV = "DERM_PUBLISH_CRASH_AFTER"


class PublishError(ValueError):
    """A snapshot was refused; nothing was written to any store."""


@dataclass(frozen=True)
class FamilyFreshness:
    family: str
    version: str | None
    newest_day: date | None
    age: timedelta | None  # now - availability time of the newest promoted snapshot
    missing_days: tuple[date, ...]  # gaps between the first published day and yesterday

    @property
    def ok(self) -> bool:
        return self.version is not None and not self.missing_days

    def describe(self) -> str:
        if self.version is None:
            return f"{self.family}: nothing promoted"
        age = f"{self.age.total_seconds() / 3600:.1f} h" if self.age is not None else "?"
        gaps = f", MISSING {', '.join(d.isoformat() for d in self.missing_days)}" if self.missing_days else ""
        return f"{self.family} {self.version}: newest {self.newest_day}, age {age}{gaps}"


@dataclass(frozen=True)
class PublishResult:
    family: str
    version: str
    day: date
    offline_written: bool  # False when the identical day was already published
    snapshot_rows: int  # rows of the snapshot materialized (the manifest's count; Redis is not re-read)
    promoted: bool
    freshness: tuple[FamilyFreshness, ...]

    def summary(self) -> str:
        offline = "written" if self.offline_written else "already published"
        lines = [
            f"{self.family} {self.version} {self.day}: offline {offline}, materialized to Redis "
            f"(snapshot of {self.snapshot_rows} rows)" + (", promoted" if self.promoted else "")
        ]
        lines += [f"  freshness {f.describe()}" for f in self.freshness]
        return "\n".join(lines)


def _crash_point(step: str) -> None:
    if os.environ.get(CRASH_AFTER_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _check_known(paths: PlatformPaths, manifest: SnapshotManifest, source: Path) -> None:
    if manifest.family not in FAMILIES:
        raise PublishError(f"{source / MANIFEST_FILE}: unknown family {manifest.family!r}; known: {sorted(FAMILIES)}")
    registry = ModelVersions(paths.snapshots_dir)
    versions = registry.versions(objective_of(manifest.family))
    if versions.get(manifest.config_hash) != manifest.model_version:
        known = sorted(versions.values()) or "none"
        raise PublishError(
            f"{source / MANIFEST_FILE}: unknown model version {manifest.model_version!r} of {manifest.family} "
            f"(config hash {manifest.config_hash[:12]}); versions registered in {registry.path}: {known}"
        )


def _previous_source(paths: PlatformPaths, catalog: Catalog, manifest: SnapshotManifest) -> Path | None:
    """The source snapshot of the newest day published before this one: what the drift checks compare to."""
    earlier = [
        m.snapshot_date
        for m in catalog.manifests(manifest.family, manifest.model_version)
        if m.snapshot_date < manifest.snapshot_date
    ]
    if not earlier:
        return None
    previous = snapshot_dir(paths.snapshots_dir, manifest.family, manifest.model_version, max(earlier))
    return previous if previous.exists() else None


def write_offline_partition(catalog: Catalog, manifest: SnapshotManifest, source: Path) -> None:
    """Land one snapshot day in the offline store: staging folder, then one atomic rename."""
    staging = catalog.staging_dir(manifest.family, manifest.model_version, manifest.snapshot_date)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    key, feature = ident(manifest.join_key), ident(feature_name(manifest.family))
    with connect() as con:
        con.execute(
            f"""COPY (SELECT {key}, event_timestamp, embedding AS {feature}, model_version
                      FROM read_parquet($source) ORDER BY {key})
                TO $target (FORMAT parquet)""",
            {"source": str(source / manifest.data_file), "target": str(staging / OFFLINE_DATA_FILE)},
        )
    (staging / MANIFEST_FILE).write_text((source / MANIFEST_FILE).read_text())
    publish_directory(staging, catalog.partition_dir(manifest.family, manifest.model_version, manifest.snapshot_date))


def _ensure_registered(repo: FeatureRepo, view: str) -> None:
    """``feast apply`` when the catalog gained a view; a new day of a known view changes no definition."""
    from feast.errors import FeatureViewNotFoundException

    try:
        repo.store().get_feature_view(view)
    except FeatureViewNotFoundException:
        repo.apply()


def _materialize_day(repo: FeatureRepo, manifest: SnapshotManifest) -> None:
    view = feature_view_name(manifest.family, manifest.model_version)
    ts = manifest.event_timestamp
    repo.store().materialize(
        start_date=ts - timedelta(seconds=1), end_date=ts + timedelta(seconds=1), feature_views=[view]
    )


def publish_snapshot(
    source: Path,
    paths: PlatformPaths,
    *,
    repo: FeatureRepo,
    thresholds_path: Path | None = None,
    promote_first_version: bool = True,
    now: datetime | None = None,
) -> PublishResult:
    """Validate and publish one snapshot folder (see module docstring for the steps).

    Args:
        source: a snapshot folder written by the upstream refresh (derm.core.snapshot layout).
        paths: platform locations.
        repo: the Feast repository the snapshot is registered in and materialized through.
        thresholds_path: Great Expectations gate thresholds (default validation/thresholds.yaml).
        promote_first_version: promote the version when its family has nothing promoted yet.
        now: the clock of the gate and the freshness report.

    Raises:
        PublishError: unknown family/version, unreadable manifest, or a different snapshot already
            published for the same (family, version, day).
        derm.validation.gate.ValidationFailed: the gate rejected the snapshot.
    """
    source = Path(source)
    try:
        manifest = read_manifest(source)
    except (FileNotFoundError, ValueError) as exc:
        raise PublishError(str(exc)) from exc
    _check_known(paths, manifest, source)
    catalog = Catalog(paths.embeddings_offline_dir)
    with catalog.locked():
        existing = catalog.published(manifest.family, manifest.model_version, manifest.snapshot_date)
        if existing is not None and existing.data_sha256 != manifest.data_sha256:
            raise PublishError(
                f"{source}: {manifest.family} {manifest.model_version} {manifest.snapshot_date} is already published "
                f"with different content (sha256 {existing.data_sha256[:12]} != {manifest.data_sha256[:12]}); "
                "a published day is immutable: publish a new model version instead"
            )
        if existing is None:
            report = validate_snapshot(
                source,
                _previous_source(paths, catalog, manifest),
                thresholds=load_thresholds(thresholds_path),
                docs_dir=paths.validation_dir,
                now=now,
            )
            report.raise_for_failure()
            write_offline_partition(catalog, manifest, source)
        _crash_point("offline")
        _ensure_registered(repo, feature_view_name(manifest.family, manifest.model_version))
        _crash_point("apply")
        _materialize_day(repo, manifest)
        _crash_point("online")
        state = catalog.read_state()
        online = state.online.setdefault(manifest.family, {})
        if online.get(manifest.model_version, "") < manifest.snapshot_date.isoformat():
            online[manifest.model_version] = manifest.snapshot_date.isoformat()
        promoted = promote_first_version and manifest.family not in state.promoted
        if promoted:
            state.promoted[manifest.family] = manifest.model_version
        catalog.write_state(state)
        if promoted:
            repo.apply()
    return PublishResult(
        family=manifest.family,
        version=manifest.model_version,
        day=manifest.snapshot_date,
        offline_written=existing is None,
        snapshot_rows=manifest.row_count,
        promoted=promoted,
        freshness=tuple(freshness(paths, now=now)),
    )


def pending_snapshots(paths: PlatformPaths) -> list[Path]:
    """Snapshots not yet published, in day order (a day's drift check compares to the day before)."""
    catalog = Catalog(paths.embeddings_offline_dir)
    pending = []
    for directory in list_snapshots(paths.snapshots_dir):
        manifest = read_manifest(directory)
        if catalog.published(manifest.family, manifest.model_version, manifest.snapshot_date) is None:
            pending.append((manifest.snapshot_date, manifest.family, directory))
    return [directory for *_, directory in sorted(pending)]


def _resolve_families(family_or_model: str) -> list[str]:
    if family_or_model in FAMILIES:
        return [family_or_model]
    families = [f for f in FAMILIES if objective_of(f) == family_or_model]
    if not families:
        raise PublishError(f"unknown family or model {family_or_model!r}: expected one of {sorted(FAMILIES)}, ctr, cvr")
    return families


def promote(paths: PlatformPaths, family_or_model: str, version: str, *, repo: FeatureRepo) -> list[str]:
    """Point the ranker feature services at ``version`` (of one family, or of both families of a model).

    Refuses a version that is retired or not completely written online.
    """
    catalog = Catalog(paths.embeddings_offline_dir)
    families = _resolve_families(family_or_model)
    with catalog.locked():
        state = catalog.read_state()
        for family in families:
            days = [m.snapshot_date.isoformat() for m in catalog.manifests(family, version)]
            if not days or version in state.retired.get(family, []):
                raise PublishError(f"{family} {version} is not published (or retired): nothing to promote")
            if state.online.get(family, {}).get(version) != max(days):
                raise PublishError(
                    f"{family} {version}: day {max(days)} is offline but not completely online; "
                    "re-run its publish before promoting"
                )
        for family in families:
            current = state.promoted.get(family)
            if current != version:
                if current is not None:
                    state.history.setdefault(family, []).append(current)
                state.promoted[family] = version
        catalog.write_state(state)
        repo.apply()
    return families


def rollback(paths: PlatformPaths, family_or_model: str, *, repo: FeatureRepo) -> dict[str, str]:
    """Point each family back to the version promoted before the current one."""
    catalog = Catalog(paths.embeddings_offline_dir)
    families = _resolve_families(family_or_model)
    with catalog.locked():
        state = catalog.read_state()
        for family in families:
            if not state.history.get(family):
                raise PublishError(f"{family}: no earlier promoted version to roll back to")
        for family in families:
            state.promoted[family] = state.history[family].pop()
        catalog.write_state(state)
        repo.apply()
    return {f: state.promoted[f] for f in families}


def retire(paths: PlatformPaths, family_or_model: str, version: str, *, repo: FeatureRepo) -> list[str]:
    """Remove a version's feature view and its Redis fields; its offline partitions stay for audits."""
    catalog = Catalog(paths.embeddings_offline_dir)
    families = _resolve_families(family_or_model)
    with catalog.locked():
        state = catalog.read_state()
        for family in families:
            if state.promoted.get(family) == version:
                raise PublishError(f"{family} {version} is promoted: promote or roll back to another version first")
            if not catalog.manifests(family, version):
                raise PublishError(f"{family} {version} is not published")
        for family in families:
            retired = state.retired.setdefault(family, [])
            if version not in retired:
                retired.append(version)
            state.history[family] = [v for v in state.history.get(family, []) if v != version]
        catalog.write_state(state)
        # feast apply drops the view; Feast's Redis store then deletes that view's fields from every key.
        repo.apply()
    return families


def freshness(paths: PlatformPaths, now: datetime | None = None) -> list[FamilyFreshness]:
    """Per family: age of the newest promoted snapshot, and days missing up to yesterday."""
    now = now or datetime.now(UTC)
    catalog = Catalog(paths.embeddings_offline_dir)
    state = catalog.read_state()
    report = []
    for family in FAMILIES:
        version = state.promoted.get(family)
        manifests = catalog.manifests(family, version) if version else []
        if not manifests:
            report.append(FamilyFreshness(family, version, None, None, ()))
            continue
        newest = max(manifests, key=lambda m: m.snapshot_date)
        published = {m.snapshot_date for m in manifests}
        first, last_expected = min(published), now.date() - timedelta(days=1)
        expected = {first + timedelta(days=i) for i in range((last_expected - first).days + 1)}
        report.append(
            FamilyFreshness(
                family=family,
                version=version,
                newest_day=newest.snapshot_date,
                age=now - newest.event_timestamp,
                missing_days=tuple(sorted(expected - published)),
            )
        )
    return report
