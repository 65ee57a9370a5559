"""Publish validated embedding snapshots into Feast: offline Parquet, registry, Redis (promotion: promotion.py).

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
   a Redis that refuses the writes (``OOM``, ``READONLY``, ``NOPERM``, ``LOADING``) or is
   unreachable stops the publish with :class:`OnlineWriteRefused`, the day offline only;
5. record the day as online in the catalog; only then can the version be promoted.

Many snapshots at once (``derm publish --all``, :func:`publish_batch`): each (family, version) is a
chain of days, since the refresh averages each day onto the one before and the gate's drift checks
compare a day to the one before. Every chain is published in day order; a refused day stops its
own chain only: its later days are *blocked* (not even validated) while every other chain goes on.

After a refusal there are two ways on:

* accept it (``derm accept SNAPSHOT_DIR --reason TEXT``, :func:`accept_snapshot`): publish it
  anyway, the reason and the gate's summary recorded in the catalog and shown by ``derm freshness``;
  the blocked days then publish on the next ``derm publish --all``;
* re-derive it (``derm discard SNAPSHOT_DIR``, :func:`discard_snapshots`, then ``derm train-upstream``):
  the refused day and the later days of its chain (none of them published) are moved aside, and the
  refresh writes them again from the last day left: a day whose snapshot is missing is re-exported
  from its checkpoint, averaged onto the day before (checkpoints are kept; they are shared by both
  families of a model). Re-deriving helps when the snapshot itself was broken (an interrupted or
  faulty export, inputs repaired since); identical inputs give identical snapshots.

Example::

    paths, repo = PlatformPaths.from_env(), FeatureRepo()
    result = publish_snapshot(Path("data/snapshots/ctr_user/v1/date=2026-01-05"), paths, repo=repo)
    batch = publish_batch(pending_snapshots(paths), paths, repo=repo)
    print(batch.table())
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import redis

from derm.core.feast_repo import FeatureRepo
from derm.core.files import publish_directory
from derm.core.model_versions import ModelVersions
from derm.core.naming import FAMILIES, feature_name, feature_view_name, objective_of
from derm.core.paths import PlatformPaths
from derm.core.snapshot import MANIFEST_FILE, SnapshotManifest, list_snapshots, read_manifest, snapshot_dir
from derm.core.sql import connect, ident
from derm.feast_plugins.source_index import record_file_timestamps
from derm.materialization.catalog import OFFLINE_DATA_FILE, Catalog
from derm.validation.gate import GateReport, ValidationFailed, load_thresholds, validate_snapshot

# Fault injection for the crash-consistency test: the publisher SIGKILLs itself right
# after the named step, exactly as an OOM kill or a lost node would stop it.
CRASH_AFTER_ENV = "DERM_PUBLISH_CRASH_AFTER"

# The expectation name of the gate's structural failures (see derm.validation.gate.FailedCheck): a
# snapshot that is not even readable as one cannot be served, so it cannot be accepted either.
STRUCTURAL_CHECK = "snapshot_is_readable"
# Gaps of a freshness report printed before "... N more gaps".
MAX_GAPS_SHOWN = 5


class PublishError(ValueError):
    """A snapshot was refused; nothing was written to any store."""


class OnlineWriteRefused(PublishError):
    """Redis refused the day's rows or could not be reached: the day is offline, not online.

    Neither the catalog nor Redis' watermark calls the day online (rows that did land are harmless: a
    re-run or ``derm repair`` writes the whole day again). ``reply``: Redis' answer, ``OOM``,
    ``READONLY``, ``NOPERM``, ``LOADING``..., or the error type (``ConnectionError``) when none came.
    """

    def __init__(self, message: str, reply: str):
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True)
class FamilyFreshness:
    family: str
    version: str | None
    newest_day: date | None
    age: timedelta | None  # now - availability time of the newest promoted snapshot
    missing_days: tuple[date, ...]  # gaps between the first published day and yesterday
    accepted: tuple[tuple[date, str], ...] = ()  # (day, reason) published by `derm accept` despite the gate

    @property
    def ok(self) -> bool:
        return self.version is not None and not self.missing_days

    @property
    def gaps(self) -> list[tuple[date, date]]:
        """``missing_days`` as ranges of consecutive days, ``(first, last)`` inclusive, oldest first."""
        ranges: list[tuple[date, date]] = []
        for day in sorted(self.missing_days):
            if ranges and day == ranges[-1][1] + timedelta(days=1):
                ranges[-1] = (ranges[-1][0], day)
            else:
                ranges.append((day, day))
        return ranges

    def describe(self, max_gaps: int = MAX_GAPS_SHOWN) -> str:
        """One line per family (consecutive missing days collapsed), then one line per accepted day."""
        if self.version is None:
            return f"{self.family}: nothing promoted"
        age = f"{self.age.total_seconds() / 3600:.1f} h" if self.age is not None else "?"
        line = f"{self.family} {self.version}: newest {self.newest_day}, age {age}"
        gaps = self.gaps
        if gaps:
            shown = [_describe_gap(first, last) for first, last in gaps[:max_gaps]]
            more = f", ... {len(gaps) - max_gaps} more gaps" if len(gaps) > max_gaps else ""
            line += f", MISSING {len(self.missing_days)} days: {', '.join(shown)}{more}"
        return "\n".join([line] + [f"  accepted {day}: {reason}" for day, reason in self.accepted])


def _describe_gap(first: date, last: date) -> str:
    if first == last:
        return first.isoformat()
    return f"{first.isoformat()}..{last.isoformat()} ({(last - first).days + 1} days)"


@dataclass(frozen=True)
class PublishResult:
    family: str
    version: str
    day: date
    offline_written: bool  # False when the identical day was already published
    snapshot_rows: int  # rows of the snapshot (the manifest's count)
    online_rows: int  # of its entities, those Redis holds at this day or newer, counted after the write
    promoted: bool
    freshness: tuple[FamilyFreshness, ...]
    accepted: str | None = None  # the gate's summary, when published by accept_snapshot despite the gate

    def summary(self) -> str:
        offline = "written" if self.offline_written else "already published"
        lines = [
            f"{self.family} {self.version} {self.day}: offline {offline}, materialized to Redis "
            f"({self.online_rows} of the snapshot's {self.snapshot_rows} rows held)"
            + (", promoted" if self.promoted else "")
            + (f", ACCEPTED despite the gate ({self.accepted})" if self.accepted else "")
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


def _published_days(
    catalog: Catalog, family: str, version: str, *, before: date | None = None, newest: int | None = None
) -> list[date]:
    """Published days of a (family, version), oldest first: its day folders that hold a manifest.

    One listing of the version folder; no manifest is read. ``before`` keeps the days before it and
    ``newest`` the latest ``newest`` of those, and only their folders are checked for a manifest: the
    gate's history costs the same after 2,000 published days as after 10 (``python -m bench --only
    publish-history``), where a stat of every day folder took 11 ms a call.
    """
    version_dir = catalog.root / family / version
    try:
        names = os.listdir(version_dir)
    except OSError:  # no day published yet (or no version folder): as a glob of it finds nothing
        return []
    candidates = []
    for name in names:
        if not name.startswith("date="):
            continue
        try:
            day = date.fromisoformat(name.removeprefix("date="))
        except ValueError as error:
            if os.path.exists(os.path.join(version_dir, name, MANIFEST_FILE)):  # a broken catalog, not a gap
                raise ValueError(
                    f"{version_dir / name}: a published day folder must be named date=YYYY-MM-DD"
                ) from error
            continue
        if before is None or day < before:
            candidates.append((day, name))
    candidates.sort(reverse=True)
    days = []
    for day, name in candidates:
        if newest is not None and len(days) == newest:
            break
        if os.path.exists(os.path.join(version_dir, name, MANIFEST_FILE)):
            days.append(day)
    return days[::-1]


def _recent_sources(paths: PlatformPaths, catalog: Catalog, manifest: SnapshotManifest, days: int) -> list[Path]:
    """Source snapshots of the ``days`` newest days published before this one: the gate's history, oldest first."""
    family, version = manifest.family, manifest.model_version
    earlier = _published_days(catalog, family, version, before=manifest.snapshot_date, newest=max(days, 0))
    sources = [snapshot_dir(paths.snapshots_dir, family, version, d) for d in earlier]
    return [source for source in sources if source.exists()]


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
    partition = catalog.partition_dir(manifest.family, manifest.model_version, manifest.snapshot_date)
    publish_directory(staging, partition)
    # Every row of a day carries the manifest's timestamp (the gate checks it): reads outside it skip the file.
    record_file_timestamps(
        partition.parent, f"{partition.name}/{OFFLINE_DATA_FILE}", manifest.event_timestamp, manifest.event_timestamp
    )


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


def _check_online(catalog: Catalog, repo: FeatureRepo, manifest: SnapshotManifest, source: Path) -> int:
    """Count the day's rows Redis holds; refuse the day unless all are there; then record the watermark."""
    from derm.materialization.online_state import count_holding, day_ids, record_watermark, redis_connection

    client, project, serialization_version = redis_connection(repo)
    try:
        held = count_holding(client, project, serialization_version, manifest, day_ids(catalog, manifest))
        if held != manifest.row_count:
            raise PublishError(
                f"{source}: after materializing, Redis holds {held} of the day's {manifest.row_count} rows of "
                f"{feature_view_name(manifest.family, manifest.model_version)}; the day is not marked online "
                "(re-run the publish, or `derm repair`)"
            )
        record_watermark(client, project, manifest, held)
    finally:
        client.close()
    return held


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
    return _publish(
        source, paths, repo=repo, thresholds_path=thresholds_path, promote_first_version=promote_first_version, now=now
    )


def accept_snapshot(
    source: Path,
    paths: PlatformPaths,
    *,
    repo: FeatureRepo,
    reason: str,
    thresholds_path: Path | None = None,
    promote_first_version: bool = True,
    now: datetime | None = None,
) -> PublishResult:
    """Publish a snapshot the gate refuses, recording ``reason`` and the gate's summary in the catalog.

    Everything :func:`publish_snapshot` does runs, the gate included; only the gate's failure does
    not stop it (a snapshot that passes is simply published, nothing recorded as accepted). It is
    the way on after ``publish --all`` refused a day: the later days of its chain publish next.

    Raises:
        PublishError: as :func:`publish_snapshot`; also for an empty reason, a snapshot that is not
            readable as one (structural failures cannot be served), an earlier unpublished day of the
            same (family, version) (accept or discard that one first), or a day already published
            without acceptance.
    """
    if not reason.strip():
        raise PublishError("accepting a refused snapshot needs a reason (it is recorded in the catalog)")
    return _publish(
        source,
        paths,
        repo=repo,
        thresholds_path=thresholds_path,
        promote_first_version=promote_first_version,
        now=now,
        accept_reason=reason.strip(),
    )


def _write_refused(source: Path, manifest: SnapshotManifest, error: redis.RedisError) -> OnlineWriteRefused:
    from derm.materialization.online_state import REPLY_HINTS, redis_reply

    reply = redis_reply(error)
    hint = REPLY_HINTS.get(reply, "check that Redis is up and accepts writes")
    view = feature_view_name(manifest.family, manifest.model_version)
    return OnlineWriteRefused(
        f"{source}: Redis refused the rows of {view} {manifest.snapshot_date} ({reply}: {error}); the day is "
        f"published offline but not marked online. {hint}, then re-run the publish (or `derm repair`)",
        reply,
    )


def _publish(
    source: Path,
    paths: PlatformPaths,
    *,
    repo: FeatureRepo,
    thresholds_path: Path | None,
    promote_first_version: bool,
    now: datetime | None,
    accept_reason: str | None = None,
) -> PublishResult:
    source = Path(source)
    try:
        manifest = read_manifest(source)
    except (FileNotFoundError, ValueError) as exc:
        raise PublishError(str(exc)) from exc
    _check_known(paths, manifest, source)
    catalog = Catalog(paths.embeddings_offline_dir)
    accepted_summary = None
    with catalog.locked():
        existing = catalog.published(manifest.family, manifest.model_version, manifest.snapshot_date)
        if existing is not None and existing.data_sha256 != manifest.data_sha256:
            raise PublishError(
                f"{source}: {manifest.family} {manifest.model_version} {manifest.snapshot_date} is already published "
                f"with different content (sha256 {existing.data_sha256[:12]} != {manifest.data_sha256[:12]}); "
                "a published day is immutable: publish a new model version instead"
            )
        if accept_reason is not None:
            _check_acceptable(paths, catalog, manifest, source, existing)
        if existing is None:
            thresholds = load_thresholds(thresholds_path)
            report = validate_snapshot(
                source,
                history_dirs=_recent_sources(paths, catalog, manifest, thresholds.snapshot.history_days),
                thresholds=thresholds,
                docs_dir=paths.validation_dir,
                now=now,
            )
            if accept_reason is None or report.success:
                report.raise_for_failure()
            else:
                accepted_summary = _accept(catalog, manifest, source, report, accept_reason)
            write_offline_partition(catalog, manifest, source)
        elif accept_reason is not None:  # re-run of an accept that stopped after recording it
            day = catalog.read_state().accepted_days(manifest.family, manifest.model_version)
            accepted_summary = day[manifest.snapshot_date.isoformat()]["gate"]
        _crash_point("offline")
        try:
            _ensure_registered(repo, feature_view_name(manifest.family, manifest.model_version))
            _crash_point("apply")
            _materialize_day(repo, manifest)
            online_rows = _check_online(catalog, repo, manifest, source)
        except redis.RedisError as error:
            raise _write_refused(source, manifest, error) from error
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
        online_rows=online_rows,
        promoted=promoted,
        freshness=tuple(freshness(paths, now=now)),
        accepted=accepted_summary,
    )


def _check_acceptable(
    paths: PlatformPaths,
    catalog: Catalog,
    manifest: SnapshotManifest,
    source: Path,
    existing: SnapshotManifest | None,
) -> None:
    day = manifest.snapshot_date
    if existing is not None:
        if day.isoformat() not in catalog.read_state().accepted_days(manifest.family, manifest.model_version):
            raise PublishError(
                f"{source}: {manifest.family} {manifest.model_version} {day} is already published "
                "(it passed the gate): nothing to accept"
            )
        return
    earlier = [
        d
        for d in _chain_days(paths, manifest.family, manifest.model_version)
        if d < day and catalog.published(manifest.family, manifest.model_version, d) is None
    ]
    if earlier:
        raise PublishError(
            f"{source}: the earlier day {min(earlier)} of {manifest.family} {manifest.model_version} is not published: "
            "accept or discard that one first (a day is validated against the day before)"
        )


def _accept(catalog: Catalog, manifest: SnapshotManifest, source: Path, report: GateReport, reason: str) -> str:
    """Record the acceptance before the offline write, so a re-run after a crash still knows it."""
    structural = [f for f in report.failures if f.expectation == STRUCTURAL_CHECK]
    if structural:
        raise PublishError(
            f"{source}: not readable as a snapshot, so it cannot be served even if accepted:\n"
            + "\n".join(f"  - {f}" for f in structural)
        )
    summary = refusal_summary(report)
    state = catalog.read_state()
    state.accepted.setdefault(manifest.family, {}).setdefault(manifest.model_version, {})[
        manifest.snapshot_date.isoformat()
    ] = {
        "reason": reason,
        "gate": summary,
        "data_docs": str(report.data_docs_page or ""),
        "accepted_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    catalog.write_state(state)
    return summary


def refusal_summary(report: GateReport) -> str:
    """One line: the gate's count of passed expectations and the names of the failed ones."""
    failed = list(dict.fromkeys(f.expectation + (f"[{f.column}]" if f.column else "") for f in report.failures))
    return f"{report.summary}; failed: {', '.join(failed)}" if failed else report.summary


def _chain_days(paths: PlatformPaths, family: str, version: str) -> list[date]:
    """Days of (family, version) with a snapshot folder under the snapshots directory."""
    return sorted(_snapshot_key(d)[2] for d in list_snapshots(paths.snapshots_dir, family) if d.parent.name == version)


def _snapshot_key(directory: Path) -> tuple[str, str, date]:
    """(family, version, day) of a snapshot folder: its manifest's, else its place in the snapshot layout."""
    try:
        manifest = read_manifest(directory)
        return manifest.family, manifest.model_version, manifest.snapshot_date
    except (FileNotFoundError, ValueError):
        try:
            return directory.parent.parent.name, directory.parent.name, date.fromisoformat(directory.name[5:])
        except ValueError:
            return str(directory), "", date.min


def pending_snapshots(paths: PlatformPaths) -> list[Path]:
    """Snapshots not yet completely published, in day order (a day's drift check compares to the day before).

    A day offline but newer than its version's online mark (a publish stopped before Redis) is pending
    too: publishing it again completes it.
    """
    catalog = Catalog(paths.embeddings_offline_dir)
    online = catalog.read_state().online
    pending = []
    for directory in list_snapshots(paths.snapshots_dir):
        family, version, day = _snapshot_key(directory)
        done = (
            catalog.published(family, version, day) is not None
            and online.get(family, {}).get(version, "") >= day.isoformat()
        )
        if not done:
            pending.append((day, family, version, directory))
    return [directory for *_, directory in sorted(pending)]


@dataclass(frozen=True)
class Refusal:
    """A snapshot the gate (or a publishing check) refused; nothing of it was written."""

    source: Path
    family: str
    version: str
    day: date
    summary: str  # one line: the failed expectations, or the publishing check's reason
    data_docs: Path | None
    message: str  # the whole error, every failure listed


@dataclass(frozen=True)
class Blocked:
    """A later day of a refused chain: not validated, since its drift check compares to the refused day."""

    source: Path
    family: str
    version: str
    day: date
    behind: date  # the refused day of the same (family, version)


@dataclass
class PublishBatch:
    """What :func:`publish_batch` did: every snapshot is in exactly one of the three lists."""

    published: list[PublishResult] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    blocked: list[Blocked] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refused

    def table(self) -> str:
        lines = [f"published {len(self.published)}, refused {len(self.refused)}, blocked {len(self.blocked)}"]
        for result in self.published:
            offline = "written" if result.offline_written else "completed"
            note = f"  ACCEPTED ({result.accepted})" if result.accepted else ""
            lines.append(
                f"  published  {result.family:<8} {result.version:<4} {result.day}  "
                f"{offline}, {result.snapshot_rows} rows{', promoted' if result.promoted else ''}{note}"
            )
        for refusal in self.refused:
            lines.append(f"  REFUSED    {refusal.family:<8} {refusal.version:<4} {refusal.day}  {refusal.source}")
            lines.append(f"             {refusal.summary}")
            if refusal.data_docs is not None:
                lines.append(f"             Data Docs: {refusal.data_docs}")
        for blocked in self.blocked:
            lines.append(
                f"  blocked    {blocked.family:<8} {blocked.version:<4} {blocked.day}  "
                f"behind refused {blocked.behind}, not validated"
            )
        if self.refused:
            lines += [
                "next, for each refused snapshot, either:",
                "  derm accept SNAPSHOT_DIR --reason TEXT   publish it anyway, the reason recorded in the catalog",
                "  derm discard SNAPSHOT_DIR                move it and its chain's later days aside, then",
                "  derm train-upstream                      re-derive them from the last day left",
                "and run derm publish --all again for the blocked days.",
            ]
        return "\n".join(lines)


def publish_batch(
    sources: Iterable[Path],
    paths: PlatformPaths,
    *,
    repo: FeatureRepo,
    thresholds_path: Path | None = None,
    promote_first_version: bool = True,
    now: datetime | None = None,
    log: Callable[[str], None] | None = None,
) -> PublishBatch:
    """Publish many snapshots, every (family, version) chain in day order; a refusal stops its chain only.

    A refused day (gate failure or :class:`PublishError`) blocks the later given days of the same
    (family, version): they are neither validated nor published. Every other snapshot is published
    with :func:`publish_snapshot` (which holds the catalog lock per snapshot). Errors that are not
    refusals (Redis or Feast down) propagate.

    Example::

        batch = publish_batch(pending_snapshots(paths), paths, repo=FeatureRepo())
        print(batch.table())
    """
    keyed = {}
    for source in sources:
        source = Path(source)
        keyed.setdefault(source.resolve(), (_snapshot_key(source), source))
    refused_at: dict[tuple[str, str], date] = {}
    batch = PublishBatch()
    for (family, version, day), source in sorted(keyed.values(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
        chain = (family, version)
        if chain in refused_at:
            batch.blocked.append(Blocked(source, family, version, day, behind=refused_at[chain]))
            continue
        try:
            result = publish_snapshot(
                source,
                paths,
                repo=repo,
                thresholds_path=thresholds_path,
                promote_first_version=promote_first_version,
                now=now,
            )
        except ValidationFailed as exc:
            refused_at[chain] = day
            batch.refused.append(
                Refusal(source, family, version, day, refusal_summary(exc.report), exc.report.data_docs_page, str(exc))
            )
        except PublishError as exc:
            refused_at[chain] = day
            batch.refused.append(Refusal(source, family, version, day, str(exc).splitlines()[0], None, str(exc)))
        else:
            batch.published.append(result)
        if log is not None:
            log(f"{'refused' if chain in refused_at else 'published'} {family} {version} {day}")
    return batch


def _is_day_folder(directory: Path) -> bool:
    try:
        date.fromisoformat(directory.name.removeprefix("date="))
    except ValueError:
        return False
    return directory.is_dir()


@dataclass(frozen=True)
class Discarded:
    moved: tuple[tuple[Path, Path], ...]  # (snapshot folder, where it now is), newest day first

    def describe(self) -> str:
        lines = [f"moved {source} -> {target}" for source, target in self.moved]
        lines.append("re-derive them with `derm train-upstream`, then `derm publish --all`")
        return "\n".join(lines)


def discard_snapshots(source: Path, paths: PlatformPaths, *, now: datetime | None = None) -> Discarded:
    """Move a refused snapshot and the later days of its (family, version) aside, so the refresh re-derives them.

    The refresh skips a day only when its checkpoint and both families' snapshots exist, so after the
    move ``derm train-upstream`` re-exports the day from its checkpoint, averaged onto the last day
    left, and then each later day onto the one before. The folders go to
    ``<data_dir>/discarded/<UTC time>/<family>/<version>/date=...`` (kept for audits), newest day first,
    so an interrupted discard leaves a chain without holes; run it again to finish.

    Raises:
        PublishError: ``source`` is not a snapshot folder under the snapshots directory, or it or a
            later day of its chain is published (a published day is never discarded: publish a new
            model version, or roll back, instead).
    """
    source = Path(source).resolve()
    snapshots = Path(paths.snapshots_dir).resolve()
    if not source.is_dir() or source.parent.parent.parent != snapshots or not source.name.startswith("date="):
        raise PublishError(f"{source}: not a snapshot folder of {snapshots}/<family>/<version>/date=YYYY-MM-DD")
    family, version = source.parent.parent.name, source.parent.name
    try:
        date.fromisoformat(source.name.removeprefix("date="))
    except ValueError as exc:
        raise PublishError(f"{source}: not a snapshot day folder ({exc})") from exc
    catalog = Catalog(paths.embeddings_offline_dir)
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S%fZ")
    with catalog.locked():  # no publish of these days may start while they move
        # Every later day folder of the chain, a half-written one (no manifest yet) included.
        chain = sorted(
            (d for d in source.parent.glob("date=*") if _is_day_folder(d) and d.name >= source.name),
            key=lambda d: d.name,
            reverse=True,
        )
        published = [d.name[5:] for d in chain if catalog.published(family, version, date.fromisoformat(d.name[5:]))]
        if published:
            raise PublishError(
                f"{family} {version}: {', '.join(sorted(published))} already published; a published day is never "
                "discarded (publish a new model version, or roll back, instead); nothing was moved"
            )
        moved = []
        for directory in chain:
            target = paths.data_dir / "discarded" / stamp / family / version / directory.name
            target.parent.mkdir(parents=True, exist_ok=True)
            directory.rename(target)
            moved.append((directory, target))
    return Discarded(tuple(moved))


def freshness(paths: PlatformPaths, now: datetime | None = None) -> list[FamilyFreshness]:
    """Per family: age of the newest promoted snapshot, days missing up to yesterday, days accepted despite the gate."""
    now = now or datetime.now(UTC)
    catalog = Catalog(paths.embeddings_offline_dir)
    state = catalog.read_state()
    report = []
    for family in FAMILIES:
        version = state.promoted.get(family)
        published = set(_published_days(catalog, family, version)) if version else set()
        if not published:
            report.append(FamilyFreshness(family, version, None, None, ()))
            continue
        newest = catalog.published(family, version, max(published))
        first, last_expected = min(published), now.date() - timedelta(days=1)
        expected = {first + timedelta(days=i) for i in range((last_expected - first).days + 1)}
        accepted = state.accepted_days(family, version)
        report.append(
            FamilyFreshness(
                family=family,
                version=version,
                newest_day=newest.snapshot_date,
                age=now - newest.event_timestamp,
                missing_days=tuple(sorted(expected - published)),
                accepted=tuple((date.fromisoformat(day), accepted[day]["reason"]) for day in sorted(accepted)),
            )
        )
    return report
