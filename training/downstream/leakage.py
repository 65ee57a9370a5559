"""Leakage audit: prove a training set's embeddings are point-in-time correct, against an oracle that is not Feast.

Paper: "Decoupled Entity Representation Learning for Pinterest Ads Ranking",
https://arxiv.org/abs/2509.04337 -- decoupling upstream and downstream only works
when training sees, for every labelled event, the embedding that existed then.

For every embedding column ``<family>_emb`` of a training set (Parquet), the oracle
is one DuckDB ``ASOF LEFT JOIN`` of the rows' ``(join key, event_timestamp)`` with
the published offline partitions ``offline/embeddings/<family>/<version>/date=*/data.parquet``:
the newest snapshot with ``snapshot_timestamp <= event_timestamp``, and nothing when
that snapshot is older than the TTL. The training set need not carry snapshot
timestamps: the oracle's *vector* is compared with the training set's vector, and
a mismatching vector is looked up among all snapshots of the entity to name the
snapshot it came from. Violation kinds:

* ``future``: the vector belongs to a snapshot published after the event (leakage);
* ``expired``: it belongs to a snapshot older than the TTL;
* ``stale``: it belongs to an older snapshot than the newest available one;
* ``missing``: the training set has no vector where one was available;
* ``unknown``: the vector is in no published snapshot of that version.

The version audited per family comes from the training set's metadata
(``derm.training_set``, see :mod:`derm.training.downstream.training_sets`), else from the
catalog's promoted version, unless given explicitly.

Labels have times too (issue 17), and the audit checks them as it checks embeddings,
against oracles computed here from the event log (DuckDB):

* ``label``: each row's label is recomputed from the log by ``event_id`` -- a click, or a
  conversion known within the attribution window and before the set's label cut-off
  (its window end); ``future`` when the set has a positive the cut-off did not know yet,
  ``mismatch`` otherwise;
* ``<entity>_conversions_1d``: the newest daily stats row an event may see (end of a day
  with ads activity or a conversion known, within the counting TTL) must count the
  conversions *known* that day; ``future`` when the set counts more (a conversion not
  yet known at the row's event time), ``mismatch`` otherwise.

Example::

    paths = PlatformPaths.from_env()
    report = audit_training_set(Path("data/training_sets/ctr/run.parquet"), paths)
    print(report.describe())
    sys.exit(0 if report.ok else 1)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq

from derm.core.days import day_end
from derm.core.files import atomic_path
from derm.core.naming import (
    COUNTING_TTL,
    COUNTING_VIEWS,
    EMBEDDING_TTL,
    ENTITIES,
    FAMILIES,
    OBJECTIVES,
    feature_name,
    join_key,
)
from derm.core.paths import PlatformPaths
from derm.core.sql import connect, ident
from derm.core.training_set import LABEL, METADATA_KEY, TrainingSetInfo, read_training_set_info
from derm.events.schema import CONVERSION_KNOWN_SQL, event_columns_sql, event_files, partition_day, read_events_sql
from derm.materialization.catalog import OFFLINE_DATA_FILE, Catalog
from derm.training.downstream.training_sets import ATTRIBUTION_WINDOW


@dataclass(frozen=True)
class Violation:
    row: int  # 0-based row of the training set file
    event_id: int | None
    feature: str  # e.g. ctr_user_emb
    version: str
    entity: int
    event_timestamp: datetime
    expected_snapshot: datetime | None  # what the oracle joins (None: nothing available)
    found_snapshot: datetime | None  # the snapshot the training set's vector belongs to (None: no vector/unknown)
    kind: str  # future | expired | stale | missing | unknown

    def __str__(self) -> str:
        def ts(value: datetime | None) -> str:
            return value.isoformat() if value is not None else "none"

        event = f" event_id={self.event_id}" if self.event_id is not None else ""
        return (
            f"row {self.row}{event} {self.feature}@{self.version} entity={self.entity} "
            f"event_time={ts(self.event_timestamp)}: {self.kind}; expected snapshot {ts(self.expected_snapshot)}, "
            f"found {ts(self.found_snapshot)}"
        )


@dataclass(frozen=True)
class TimingViolation:
    """A label or conversion count the event log's oracle does not give (see the module docstring)."""

    row: int
    event_id: int | None
    column: str  # label | user_conversions_1d | pin_conversions_1d
    event_timestamp: datetime
    expected: int | None  # the oracle's value (None: no stats row available)
    found: int | None
    kind: str  # future | mismatch

    def __str__(self) -> str:
        event = f" event_id={self.event_id}" if self.event_id is not None else ""
        return (
            f"row {self.row}{event} {self.column} event_time={self.event_timestamp.isoformat()}: {self.kind}; "
            f"expected {self.expected}, found {self.found}"
        )


@dataclass
class AuditReport:
    path: Path
    rows: int
    checked: dict[str, str]  # feature -> version audited (labels and counts: "event log")
    violation_counts: dict[str, int] = field(default_factory=dict)  # feature -> number of violating rows
    violations: list[Violation] = field(default_factory=list)  # the first ``max_reported`` per feature
    timing_violations: list[TimingViolation] = field(default_factory=list)  # labels and conversion counts

    @property
    def ok(self) -> bool:
        return not any(self.violation_counts.values())

    def describe(self, limit: int = 20) -> str:
        lines = [
            f"leakage audit of {self.path}: {self.rows:,} rows, "
            + ", ".join(f"{f}@{v}" for f, v in self.checked.items())
        ]
        for feature, count in self.violation_counts.items():
            lines.append(f"  {feature}: {count:,} violating rows" if count else f"  {feature}: ok")
        listed = [*self.violations, *self.timing_violations]
        for violation in listed[:limit]:
            lines.append(f"    {violation}")
        if len(listed) > limit:
            lines.append(f"    ... {len(listed) - limit} more listed, {sum(self.violation_counts.values())} total")
        lines.append(
            "PASS: every embedding, label and conversion count was known at its time"
            if self.ok
            else "FAIL: leakage or mismatch"
        )
        return "\n".join(lines)


def training_set_versions(path: Path) -> dict[str, str]:
    """family -> version from the training set's metadata (empty if absent)."""
    info = read_training_set_info(path)
    return dict(info.embedding_versions) if info else {}


def _snapshots_sql(embeddings_dir: Path, family: str, version: str, name: str) -> tuple[str, dict[str, str]]:
    """The published snapshots of ``family@version`` as ``(entity, snapshot_ts, vector)``; the glob over
    their partitions is bound as ``$<name>``."""
    pattern = Path(embeddings_dir) / family / version / "date=*" / OFFLINE_DATA_FILE
    key, feature = ident(join_key(family)), ident(feature_name(family))
    sql = (
        f"(SELECT {key} AS entity, event_timestamp AS snapshot_ts, CAST({feature} AS FLOAT[]) AS vector "
        f"FROM read_parquet(${name}))"
    )
    return sql, {name: str(pattern)}


# Per family: the training set's rows ``t``, the published snapshots ``s``, the oracle's ASOF pick within the
# TTL, the rows whose vector differs from it, and the snapshot each differing vector came from.
_ORACLE_SQL = """
    WITH t AS (
        SELECT file_row_number AS row_nr, {event_id} AS event_id, {key} AS entity,
               CAST(event_timestamp AS TIMESTAMPTZ) AS event_ts,
               CAST({feature} AS FLOAT[]) AS found
        FROM read_parquet($training_set, file_row_number = true)
    ),
    s AS {snapshots},
    oracle AS (
        SELECT t.*, s.snapshot_ts AS asof_ts, s.vector AS asof_vector
        FROM t ASOF LEFT JOIN s ON t.entity = s.entity AND t.event_ts >= s.snapshot_ts
    ),
    expected AS (
        SELECT *,
               CASE WHEN asof_ts IS NOT NULL AND epoch_us(event_ts) - epoch_us(asof_ts) <= $ttl_us
                    THEN asof_ts END AS expected_ts,
               CASE WHEN asof_ts IS NOT NULL AND epoch_us(event_ts) - epoch_us(asof_ts) <= $ttl_us
                    THEN asof_vector END AS expected_vector
        FROM oracle
    ),
    bad AS (SELECT * FROM expected WHERE expected_vector IS DISTINCT FROM found),
    located AS (
        SELECT bad.row_nr, max(s.snapshot_ts) FILTER (WHERE s.snapshot_ts <= bad.event_ts) AS found_past,
               min(s.snapshot_ts) FILTER (WHERE s.snapshot_ts > bad.event_ts) AS found_future
        FROM bad JOIN s ON s.entity = bad.entity AND s.vector = bad.found
        GROUP BY bad.row_nr
    )
    SELECT bad.row_nr, bad.event_id, bad.entity, bad.event_ts, bad.expected_ts,
           coalesce(located.found_future, located.found_past) AS found_ts,
           CASE WHEN bad.found IS NULL THEN 'missing'
                WHEN located.found_future IS NOT NULL THEN 'future'
                WHEN located.found_past IS NULL THEN 'unknown'
                WHEN epoch_us(bad.event_ts) - epoch_us(located.found_past) > $ttl_us THEN 'expired'
                ELSE 'stale' END AS kind,
           count(*) OVER () AS total
    FROM bad LEFT JOIN located USING (row_nr)
    ORDER BY bad.row_nr
    LIMIT $limit"""


def _oracle_query(
    path: Path, embeddings_dir: Path, family: str, version: str, *, has_event_id: bool, ttl: timedelta, limit: int
) -> tuple[str, dict[str, object]]:
    """The first ``limit`` rows of ``path`` whose ``family`` vector is not the oracle's (with the snapshot
    expected, the one found, the kind of violation and the total count), and the query's parameters."""
    snapshots, params = _snapshots_sql(embeddings_dir, family, version, "snapshots")
    query = _ORACLE_SQL.format(
        event_id="event_id" if has_event_id else "NULL::BIGINT",
        key=ident(join_key(family)),
        feature=ident(feature_name(family)),
        snapshots=snapshots,
    )
    ttl_us = int(ttl / timedelta(microseconds=1))
    return query, {**params, "training_set": str(path), "ttl_us": ttl_us, "limit": int(limit)}


def _violations(rows: list[tuple], feature: str, version: str) -> list[Violation]:
    """The oracle query's rows as violations of ``feature@version``."""
    return [
        Violation(
            row=int(row_nr),
            event_id=None if eid is None else int(eid),
            feature=feature,
            version=version,
            entity=int(entity),
            event_timestamp=event_ts,
            expected_snapshot=expected_ts,
            found_snapshot=found_ts,
            kind=kind,
        )
        for row_nr, eid, entity, event_ts, expected_ts, found_ts, kind, _ in rows
    ]


def _audited_versions(
    path: Path, columns: set[str], paths: PlatformPaths, versions: dict[str, str] | None
) -> dict[str, str]:
    """family -> version for every embedding column of the training set (explicit, else metadata, else
    promoted)."""
    promoted = Catalog(paths.embeddings_offline_dir).read_state().promoted
    chosen = {**promoted, **training_set_versions(path), **(versions or {})}
    families = [f for f in FAMILIES if feature_name(f) in columns]
    missing_version = [f for f in families if f not in chosen]
    if missing_version:
        raise ValueError(f"{path}: no version known for {missing_version}; pass versions={{family: version}}")
    return {family: chosen[family] for family in families}


def audit_training_set(
    path: Path,
    paths: PlatformPaths,
    *,
    versions: dict[str, str] | None = None,
    ttl: timedelta = EMBEDDING_TTL,
    max_reported: int = 50,
    events_dir: Path | None = None,
) -> AuditReport:
    """Check every embedding column of a training set against the ASOF oracle, and its labels and
    conversion counts against the event log's (see module docstring).

    Args:
        path: the training set (Parquet) with ``event_timestamp``, the join keys and ``<family>_emb`` columns.
        paths: platform locations (the offline store).
        versions: family -> version to audit against (default: the file's metadata, else promoted).
        ttl: the embedding views' TTL.
        max_reported: violations listed per feature (all are counted).
        events_dir: the event log the labels come from (default: ``paths.events_dir`` when it exists).
    """
    path = Path(path)
    if events_dir is None and Path(paths.events_dir).exists() and any(Path(paths.events_dir).glob("date=*")):
        events_dir = paths.events_dir
    columns = set(pq.read_schema(path).names)
    audited = _audited_versions(path, columns, paths, versions)
    if "event_timestamp" not in columns:
        raise ValueError(f"{path}: no event_timestamp column; the audit needs each row's event time")
    report = AuditReport(path=path, rows=pq.ParquetFile(path).metadata.num_rows, checked={})
    with connect() as con:
        for family, version in audited.items():
            feature = feature_name(family)
            report.checked[feature] = version
            query, params = _oracle_query(
                path,
                paths.embeddings_offline_dir,
                family,
                version,
                has_event_id="event_id" in columns,
                ttl=ttl,
                limit=max_reported,
            )
            rows = con.execute(query, params).fetchall()
            report.violation_counts[feature] = int(rows[0][-1]) if rows else 0
            report.violations.extend(_violations(rows, feature, version))
        if events_dir is not None and "event_id" in columns:
            for column, (query, params) in _timing_queries(path, columns, events_dir, max_reported).items():
                rows = con.execute(query, params).fetchall()
                report.checked[column] = "event log"
                report.violation_counts[column] = int(rows[0][-1]) if rows else 0
                report.timing_violations.extend(
                    TimingViolation(int(r[0]), r[1], column, r[2], r[3], r[4], r[5]) for r in rows
                )
    return report


def _log_files(events_dir: Path) -> list[str]:
    return [str(path) for path in event_files(events_dir)]


def _ads_sql(files: list[str]) -> str:
    """The log's ads impressions in canonical columns, with ``known`` (when a conversion became known)."""
    return (
        f"(SELECT *, {CONVERSION_KNOWN_SQL} AS known FROM (SELECT {event_columns_sql(files)} "
        f"FROM {read_events_sql('log_files', files)}) WHERE is_ad)"
    )


# Each row's label recomputed from the log by event id (the policy of training_sets.labelled_events).
_LABEL_SQL = """
    WITH t AS (
        SELECT file_row_number AS row_nr, event_id, CAST(event_timestamp AS TIMESTAMPTZ) AS event_ts,
               CAST({label} AS BIGINT) AS found
        FROM read_parquet($training_set, file_row_number = true)
    ),
    e AS (SELECT * FROM {ads}),
    o AS (
        SELECT t.*, {oracle} AS expected,
               coalesce(e.converted AND e.known >= $cutoff, false) AS known_later
        FROM t LEFT JOIN e USING (event_id)
    )
    SELECT row_nr, event_id, event_ts, expected, found,
           CASE WHEN found = 1 AND (known_later OR expected = 0) THEN 'future' ELSE 'mismatch' END,
           count(*) OVER ()
    FROM o WHERE expected IS DISTINCT FROM found ORDER BY row_nr LIMIT $limit"""

# Each row's <entity>_conversions_1d recomputed: the newest stats day (ads activity or a conversion known that
# day, within the log) stamped at or before the event and within the TTL, counting conversions known that day.
_COUNT_SQL = """
    WITH ads AS (SELECT * FROM {ads}),
    days AS (
        SELECT {key} AS entity, CAST(timezone('UTC', event_timestamp) AS DATE) AS day FROM ads
        UNION
        SELECT {key}, CAST(timezone('UTC', known) AS DATE) FROM ads WHERE converted AND known < $known_by
    ),
    conversions AS (
        SELECT {key} AS entity, CAST(timezone('UTC', known) AS DATE) AS day, count(*) AS n
        FROM ads WHERE converted AND known < $known_by GROUP BY ALL
    ),
    s AS (
        SELECT d.entity, timezone('UTC', CAST(d.day + 1 AS TIMESTAMP)) AS stats_ts, coalesce(c.n, 0) AS n
        FROM days d LEFT JOIN conversions c USING (entity, day)
    ),
    t AS (
        SELECT file_row_number AS row_nr, event_id, {key} AS entity,
               CAST(event_timestamp AS TIMESTAMPTZ) AS event_ts, CAST({feature} AS BIGINT) AS found
        FROM read_parquet($training_set, file_row_number = true)
    ),
    o AS (
        SELECT t.*, CASE WHEN epoch_us(t.event_ts) - epoch_us(s.stats_ts) <= $ttl_us THEN s.n END AS expected
        FROM t ASOF LEFT JOIN s ON t.entity = s.entity AND t.event_ts >= s.stats_ts
    )
    SELECT row_nr, event_id, event_ts, expected, found,
           CASE WHEN found > coalesce(expected, 0) THEN 'future' ELSE 'mismatch' END, count(*) OVER ()
    FROM o WHERE expected IS DISTINCT FROM found ORDER BY row_nr LIMIT $limit"""


def _timing_queries(
    path: Path, columns: set[str], events_dir: Path, limit: int
) -> dict[str, tuple[str, dict[str, object]]]:
    """column -> (query, parameters) of the label and conversion-count oracles the training set's columns allow."""
    files = _log_files(events_dir)
    ads = _ads_sql(files)
    base = {"training_set": str(path), "log_files": files, "limit": int(limit)}
    queries: dict[str, tuple[str, dict[str, object]]] = {}
    info = read_training_set_info(path)
    if info is not None and LABEL in columns:
        label = OBJECTIVES[info.objective][0]
        if label == "converted":
            oracle = (
                "CAST(coalesce(e.converted AND e.known <= e.event_timestamp + $attribution "
                "AND e.known < $cutoff, false) AS BIGINT)"
            )
        else:
            oracle = f"CAST(e.{ident(label)} AS BIGINT)"
        cutoff = datetime.fromisoformat(info.window_end)
        queries[LABEL] = (
            _LABEL_SQL.format(label=ident(LABEL), ads=ads, oracle=oracle),
            {**base, "cutoff": cutoff, **({"attribution": ATTRIBUTION_WINDOW} if label == "converted" else {})},
        )
    known_by = day_end(max(partition_day(Path(f)) for f in files))
    for entity in COUNTING_VIEWS.values():
        feature, key = f"{entity}_conversions_1d", ENTITIES[entity]
        if feature in columns and key in columns:
            query = _COUNT_SQL.format(ads=ads, key=ident(key), feature=ident(feature))
            ttl_us = int(COUNTING_TTL / timedelta(microseconds=1))
            queries[feature] = (query, {**base, "known_by": known_by, "ttl_us": ttl_us})
    return queries


def build_leaky_training_set(
    source: Path, out_path: Path, paths: PlatformPaths, versions: dict[str, str] | None = None
) -> Path:
    """A deliberately leaky copy of a training set: every embedding is the entity's *latest* snapshot.

    Same rows, same other columns; each ``<family>_emb`` is replaced by the newest
    published vector of the entity, regardless of the event time (what a naive
    "join the current embedding table" pipeline does). The metadata is kept, with a note.
    """
    source, out_path = Path(source), Path(out_path)
    source_schema = pq.read_schema(source)
    names = source_schema.names
    chosen = {**Catalog(paths.embeddings_offline_dir).read_state().promoted, **training_set_versions(source)}
    chosen.update(versions or {})
    families = [f for f in FAMILIES if feature_name(f) in names]
    joins, select, params = [], [], {"source": str(source)}
    for i, family in enumerate(families):
        snapshots, snapshot_params = _snapshots_sql(
            paths.embeddings_offline_dir, family, chosen[family], f"snapshots_{i}"
        )
        params.update(snapshot_params)
        latest = f"(SELECT entity, arg_max(vector, snapshot_ts) AS vector FROM {snapshots} GROUP BY entity)"
        joins.append(f"LEFT JOIN {latest} l{i} ON l{i}.entity = t.{ident(join_key(family))}")
    for name in names:
        family = next((f for f in families if feature_name(f) == name), None)
        select.append(f"l{families.index(family)}.vector AS {ident(name)}" if family else f"t.{ident(name)}")
    with connect() as con:
        table = con.sql(
            f"""SELECT {", ".join(select)}
                FROM read_parquet($source, file_row_number = true) t {" ".join(joins)}
                ORDER BY t.file_row_number""",
            params=params,
        ).to_arrow_table()
    metadata = dict(source_schema.metadata or {})
    if METADATA_KEY in metadata:
        info = TrainingSetInfo.from_json(metadata[METADATA_KEY])
        leaky = info.with_note("LEAKY: latest snapshot joined regardless of event time")
        metadata[METADATA_KEY] = leaky.to_json().encode()
    table = table.cast(source_schema.remove_metadata()).replace_schema_metadata(metadata)
    with atomic_path(out_path) as tmp:
        pq.write_table(table, tmp)
    return out_path


__all__ = [
    "AuditReport",
    "TimingViolation",
    "Violation",
    "audit_training_set",
    "build_label_leaky_training_set",
    "build_leaky_training_set",
    "training_set_versions",
]


def build_label_leaky_training_set(source: Path, out_path: Path, paths: PlatformPaths) -> Path:
    """A copy of a training set whose labels and conversion counts ignore conversion time.

    Same rows and other columns; a CVR ``label`` is 1 for every conversion the log holds, however
    late it became known (after the set's cut-off, beyond the attribution window), and each
    ``<entity>_conversions_1d`` counts conversions on their click's day, stamped at that day's end
    (what a pipeline that takes conversions as known at impression time computes). The audit must
    refuse it; it is also what the leakage experiment trains on to show the inflation.
    """
    source, out_path = Path(source), Path(out_path)
    source_schema = pq.read_schema(source)
    names = source_schema.names
    info = read_training_set_info(source)
    files = _log_files(paths.events_dir)
    joins, replaced = [], {}
    if info is not None and OBJECTIVES[info.objective][0] == "converted" and LABEL in names:
        replaced[LABEL] = "CAST(coalesce(e.converted, false) AS BIGINT)"
        if "label_timestamp" in names:
            replaced["label_timestamp"] = "CASE WHEN e.converted THEN e.known END"
    ttl_us = int(COUNTING_TTL / timedelta(microseconds=1))
    for i, entity in enumerate(COUNTING_VIEWS.values()):
        feature, key = f"{entity}_conversions_1d", ENTITIES[entity]
        if feature in names and key in names:
            joins.append(
                f"""ASOF LEFT JOIN (
                    SELECT {ident(key)} AS entity, count(*) FILTER (WHERE converted) AS n,
                           timezone('UTC', CAST(CAST(timezone('UTC', event_timestamp) AS DATE) + 1 AS TIMESTAMP))
                               AS stats_ts
                    FROM ads GROUP BY ALL
                ) c{i} ON c{i}.entity = t.{ident(key)} AND CAST(t.event_timestamp AS TIMESTAMPTZ) >= c{i}.stats_ts"""
            )
            replaced[feature] = (
                f"CASE WHEN epoch_us(CAST(t.event_timestamp AS TIMESTAMPTZ)) - epoch_us(c{i}.stats_ts) <= $ttl_us "
                f"THEN c{i}.n END"
            )
    select = ", ".join(f"{replaced.get(name, f't.{ident(name)}')} AS {ident(name)}" for name in names)
    with connect() as con:
        table = con.sql(
            f"""WITH ads AS (SELECT * FROM {_ads_sql(files)})
                SELECT {select}
                FROM read_parquet($source, file_row_number = true) t
                LEFT JOIN ads e USING (event_id) {" ".join(joins)}
                ORDER BY t.file_row_number""",
            params={"source": str(source), "log_files": files, "ttl_us": ttl_us},
        ).to_arrow_table()
    metadata = dict(source_schema.metadata or {})
    if METADATA_KEY in metadata:
        leaky = TrainingSetInfo.from_json(metadata[METADATA_KEY]).with_note(
            "LEAKY: labels and conversion counts ignore conversion time"
        )
        metadata[METADATA_KEY] = leaky.to_json().encode()
    table = table.cast(source_schema.remove_metadata()).replace_schema_metadata(metadata)
    with atomic_path(out_path) as tmp:
        pq.write_table(table, tmp)
    return out_path
