"""Validation gate: no bad embedding snapshot or training set ever reaches a store.

A snapshot (see ``derm.core.snapshot``) is first checked for being readable at all (manifest,
Parquet file, exact Arrow schema, at least one row); those structural problems come back as
failures naming the file and column. Then DuckDB derives one scalar per vector property
(dimension, L2 norm, all-finite flag, cosine to the same entity in the previous snapshot) and
per-dimension statistics, and Great Expectations validates those frames with built-in
expectations (``derm.validation.suites``) so that Data Docs stay readable. Every GE run stores its
result in a file-backed GE project under ``docs_dir`` (the pipeline passes ``PlatformPaths.validation_dir``)
and renders that result's Data Docs page (the report's ``data_docs_page``).

Thresholds come from one YAML file, ``validation/thresholds.yaml`` (:mod:`derm.validation.thresholds`),
whose comments state the policy: one broken vector or row (NaN/Inf or NULL element, wrong dimension,
all zeros, duplicate key, timestamp other than the manifest's) fails a snapshot; distribution checks
tolerate a fraction of outliers and are judged against the previous snapshot of the same family and
version with absolute floors for small populations; a version's first snapshot runs the per-row
checks only (:data:`FIRST_SNAPSHOT_POLICY`, recorded in the report's notes). Training sets: label
rate within sanity bounds (and, given the event log's rate, close to it); missing embeddings counted
only on rows whose entity could have had a snapshot (not cold start).

Data Docs cost the same on day 1,000 as on day 10: a validation renders its own pages only, the site
index is built on demand (:func:`build_data_docs_index`, ``derm docs``), and each suite keeps its
newest :data:`VALIDATION_RESULTS_KEPT_PER_SUITE` results (older results and their pages are deleted).
GE 1.24's index builder deserialises every stored result, and its section builders list them all, on
every build: building the whole site per validation made a publish take 2.2 s with 300 earlier
results against 1.0 s with 10 (``python -m bench --only publish-history``).
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from derm.core.naming import FAMILIES
from derm.core.snapshot import (
    SnapshotManifest,
    file_sha256,
    list_snapshots,
    read_manifest,
    snapshot_schema,
)
from derm.validation.thresholds import (
    DEFAULT_THRESHOLDS_PATH,
    GateThresholds,
    SnapshotThresholds,
    TrainingSetThresholds,
    load_thresholds,
)

if TYPE_CHECKING:
    import pandas as pd

MAX_OFFENDING_IDS = 5
# Retention of validation results (and their Data Docs pages) per suite, e.g. one family and version's
# row checks: a month of daily publishes. It bounds what GE lists and deserialises per build; a refusal's
# failed expectations outlive it in the publish report and, for an accepted day, in the catalog.
VALIDATION_RESULTS_KEPT_PER_SUITE = 30

FIRST_SNAPSHOT_POLICY = (
    "ran the per-row checks (dimension, NaN/Inf, NULL elements, all-zero vectors, duplicate keys, "
    "timestamps equal to the manifest's, model version, row count) and the norm bounds; skipped coverage change, "
    "overlap with the previous snapshot, cosine drift and per-dimension mean shift / std ratio"
)

_DATASOURCE = "derm_validation"
_STRUCTURE_CHECK = "snapshot_is_readable"
_TRAINING_STRUCTURE_CHECK = "training_set_is_readable"


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class FailedCheck:
    """One failed expectation (or structural problem) with a few offending entity ids."""

    expectation: str  # GE expectation type, or snapshot_is_readable for structural problems
    description: str
    observed: str
    entity_ids: list[Any] = field(default_factory=list)
    column: str | None = None

    def __str__(self) -> str:
        where = f" [{self.column}]" if self.column else ""
        ids = f"; offending ids: {', '.join(map(str, self.entity_ids))}" if self.entity_ids else ""
        return f"{self.expectation}{where}: {self.description} -- observed {self.observed}{ids}"


class ValidationFailed(ValueError):
    """Raised by GateReport.raise_for_failure; the message lists every failure."""

    def __init__(self, report: GateReport) -> None:
        self.report = report
        lines = [f"validation failed for {report.subject}: {report.summary}"]
        lines += [f"  - {failure}" for failure in report.failures]
        if report.data_docs_page is not None:
            lines.append(f"  Data Docs: {report.data_docs_page}")
        super().__init__("\n".join(lines))


@dataclass
class GateReport:
    success: bool
    failures: list[FailedCheck]
    data_docs_page: Path | None  # the Data Docs page of this validation's (first) result
    summary: str
    subject: str = ""  # the snapshot path (or training-set description) that was validated
    notes: list[str] = field(default_factory=list)  # non-failing remarks, e.g. drift checks skipped

    def raise_for_failure(self) -> None:
        if not self.success:
            raise ValidationFailed(self)


# --------------------------------------------------------------------------- GE project


class _GXProject:
    """One file-backed GE context per root folder and process: creating it costs seconds."""

    _lock: ClassVar[threading.Lock] = threading.Lock()
    _contexts: ClassVar[dict[Path, Any]] = {}

    @classmethod
    def context(cls, root: Path) -> Any:
        root = Path(root).resolve()
        with cls._lock:
            if root not in cls._contexts:
                import great_expectations as gx
                from great_expectations.data_context.types.base import ProgressBarsConfig

                root.mkdir(parents=True, exist_ok=True)
                context = gx.get_context(mode="file", project_root_dir=root)
                # tqdm bars on stderr would drown the CLI's own report.
                context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
                cls._contexts[root] = context
            return cls._contexts[root]


def _run_suite(
    context: Any, asset_name: str, suite: Any, frame: pd.DataFrame, id_columns: list[str], run_name: str
) -> Any:
    """Validate ``frame`` against ``suite``; the result is stored for Data Docs under ``run_name``."""
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    try:
        source = context.data_sources.get(_DATASOURCE)
    except KeyError:
        source = context.data_sources.add_pandas(_DATASOURCE)
    try:
        asset = source.get_asset(asset_name)
    except LookupError:
        asset = source.add_dataframe_asset(asset_name)
    try:
        batch_definition = asset.get_batch_definition(suite.name)
    except KeyError:
        batch_definition = asset.add_batch_definition_whole_dataframe(suite.name)
    suite = context.suites.add_or_update(suite)
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=suite.name, data=batch_definition, suite=suite)
    )
    return definition.run(
        batch_parameters={"dataframe": frame},
        result_format={
            "result_format": "SUMMARY",
            "unexpected_index_column_names": id_columns,
            "partial_unexpected_count": MAX_OFFENDING_IDS,
        },
        # The run name becomes a Data Docs folder and URL: keep it to safe characters.
        run_id=RunIdentifier(run_name=re.sub(r"[^\w.=-]+", "_", run_name).strip("_"), run_time=datetime.now(UTC)),
    )


def _result_identifier(result: Any) -> Any:
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    return ValidationResultIdentifier(
        expectation_suite_identifier=ExpectationSuiteIdentifier(name=result.suite_name),
        run_id=result.meta["run_id"],
        batch_identifier=result.batch_id,
    )


def _page_path(context: Any, identifier: Any) -> Path | None:
    for site in context.get_docs_sites_urls(resource_identifier=identifier, only_if_exists=False):
        if site.get("site_url"):
            return Path(site["site_url"].removeprefix("file://"))
    return None


def _build_data_docs(context: Any, results: list[Any]) -> Path | None:
    """Render these results' Data Docs pages (not the index), prune their suites; the first result's page."""
    identifiers = [_result_identifier(result) for result in results if result.batch_id]
    if not identifiers:
        return None
    context.build_data_docs(resource_identifiers=identifiers, build_index=False)
    page = _page_path(context, identifiers[0])
    for suite_name in dict.fromkeys(result.suite_name for result in results):
        _prune_results(context, suite_name, VALIDATION_RESULTS_KEPT_PER_SUITE, page, identifiers[0])
    return page


def _prune_results(context: Any, suite_name: str, keep: int, page: Path | None, page_key: Any) -> int:
    """Delete a suite's validation results beyond the newest ``keep``, with their Data Docs pages.

    ``page`` is the rendered page of ``page_key``: GE lays pages out like results (suite name split on
    ".", run name, run time, batch), so the other pages' paths follow from it without asking GE for
    each (which costs a site-builder instantiation per call).
    """
    from great_expectations.data_context.types.resource_identifiers import ValidationResultIdentifier

    store = context.validation_results_store
    prefix = tuple(suite_name.split("."))
    keys = [ValidationResultIdentifier.from_tuple(key) for key in store.store_backend.list_keys(prefix=prefix)]
    keys = [key for key in keys if key.expectation_suite_identifier.name == suite_name]
    keys.sort(key=lambda key: key.run_id.run_time, reverse=True)
    pages_root = page.parents[len(page_key.to_tuple()) - 1] if page is not None else None
    results_root = Path(store.store_backend.full_base_directory)
    for key in keys[keep:]:
        store.remove_key(key)
        *folders, batch = key.to_tuple()
        if pages_root is not None:
            pages_root.joinpath(*folders, f"{batch}.html").unlink(missing_ok=True)
        # GE leaves the run name and run time folders behind; walking them would grow with history again.
        for root in (results_root, pages_root):
            if root is not None:
                _remove_empty_folders(root.joinpath(*folders), stop=root.joinpath(*prefix))
    return max(len(keys) - keep, 0)


def _remove_empty_folders(folder: Path, stop: Path) -> None:
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty (another result of this run), or already gone
            if folder.exists():
                return
        folder = folder.parent


def build_data_docs_index(docs_dir: Path) -> Path | None:
    """Build the whole Data Docs site (index and pages of every kept result); its index path."""
    context = _GXProject.context(Path(docs_dir))
    sites = context.build_data_docs()
    url = sites.get("local_site")
    return Path(url.removeprefix("file://")) if url else None


def _failures_from(result: Any, id_columns: list[str]) -> list[FailedCheck]:
    failures = []
    for outcome in result.results:
        if outcome.success:
            continue
        config = outcome.expectation_config
        kwargs = config.kwargs
        column = kwargs.get("column") or (", ".join(kwargs["column_list"]) if "column_list" in kwargs else None)
        details = outcome.result or {}
        if outcome.exception_info and outcome.exception_info.get("raised_exception"):
            observed = f"error: {outcome.exception_info.get('exception_message')}"
        elif "unexpected_count" in details and "observed_value" not in details:
            observed = (
                f"{details['unexpected_count']} of {details.get('element_count')} rows unexpected "
                f"({details.get('unexpected_percent') or 0:.1f}%)"
            )
            samples = [_plain(value) for value in details.get("partial_unexpected_list") or []]
            if samples and not isinstance(samples[0], dict):  # compound keys repeat the offending ids
                observed += f", e.g. {samples}"
        else:
            observed = str(_plain(details.get("observed_value")))
        failures.append(
            FailedCheck(
                expectation=config.type,
                description=config.description or _describe_kwargs(kwargs),
                observed=observed,
                entity_ids=_offending_ids(details.get("partial_unexpected_index_list") or [], id_columns),
                column=column,
            )
        )
    return failures


def _describe_kwargs(kwargs: dict[str, Any]) -> str:
    shown = {k: v for k, v in kwargs.items() if k not in ("batch_id", "result_format")}
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def _offending_ids(rows: list[dict[str, Any]], id_columns: list[str]) -> list[Any]:
    ids: list[Any] = []
    for row in rows:
        values = [_plain(row.get(column)) for column in id_columns]
        pairs = zip(id_columns, values, strict=True)
        entity = values[0] if len(values) == 1 else ", ".join(f"{c}={v}" for c, v in pairs)
        if entity not in ids:
            ids.append(entity)
        if len(ids) == MAX_OFFENDING_IDS:
            break
    return ids


def _plain(value: Any) -> Any:
    # numpy scalars print as np.int64(3) in lists; entity ids should read as 3.
    return value.item() if hasattr(value, "item") and not isinstance(value, list | tuple) else value


def _count_expectations(results: list[Any]) -> tuple[int, int]:
    passed = sum(outcome.success for result in results for outcome in result.results)
    total = sum(len(result.results) for result in results)
    return passed, total


# --------------------------------------------------------------------------- snapshots


def recent_snapshots(snapshot_dir: Path, days: int) -> list[Path]:
    """The ``days`` latest earlier-dated snapshots of the same family and model version, oldest first."""
    snapshot_dir = Path(snapshot_dir)
    version_dir = snapshot_dir.parent
    family = version_dir.parent.name
    if family not in FAMILIES or days < 1:
        return []
    earlier = [
        candidate
        for candidate in list_snapshots(version_dir.parent.parent, family)
        if candidate.parent.name == version_dir.name and candidate.name < snapshot_dir.name
    ]
    return earlier[-days:]


def previous_snapshot(snapshot_dir: Path) -> Path | None:
    """The latest earlier-dated snapshot of the same family and model version, if any."""
    recent = recent_snapshots(snapshot_dir, 1)
    return recent[-1] if recent else None


def _snapshot_label(snapshot_dir: Path, manifest: SnapshotManifest | None = None) -> str:
    if manifest is not None:
        return f"{manifest.family} {manifest.model_version} {manifest.snapshot_date.isoformat()}"
    path = Path(snapshot_dir)
    return f"{path.parent.parent.name} {path.parent.name} {path.name.removeprefix('date=')}"


def _read_snapshot_structure(snapshot_dir: Path) -> tuple[SnapshotManifest | None, list[FailedCheck]]:
    """Manifest plus structural problems that make the folder unreadable as a snapshot."""
    import pyarrow.parquet as pq

    def problem(description: str, column: str | None = None, observed: str = "unreadable") -> FailedCheck:
        return FailedCheck(_STRUCTURE_CHECK, description, observed, column=column)

    snapshot_dir = Path(snapshot_dir)
    try:
        manifest = read_manifest(snapshot_dir)
    except (FileNotFoundError, ValueError) as exc:
        return None, [problem(str(exc))]
    if manifest.family not in FAMILIES:
        return manifest, [problem(f"{snapshot_dir}/manifest.json: unknown family {manifest.family!r}")]
    data_path = snapshot_dir / manifest.data_file
    if not data_path.exists():
        return manifest, [problem(f"{data_path}: data file missing")]
    try:
        parquet = pq.ParquetFile(data_path)
        schema = parquet.schema_arrow
    except Exception as exc:  # any Arrow/IO error means the file is unusable
        return manifest, [problem(f"{data_path}: not a readable Parquet file: {exc}")]

    failures = []
    for expected in snapshot_schema(manifest.family):
        index = schema.get_field_index(expected.name)
        if index < 0:
            failures.append(problem(f"{data_path}: required column {expected.name} missing", expected.name, "absent"))
        elif not schema.field(index).type.equals(expected.type):
            actual = schema.field(index).type
            failures.append(
                problem(f"{data_path}: column {expected.name} must be {expected.type}", expected.name, str(actual))
            )
    if parquet.metadata.num_rows == 0:
        failures.append(problem(f"{data_path}: snapshot is empty", observed="0 rows"))
    if manifest.dim <= 0:
        failures.append(problem(f"{snapshot_dir}/manifest.json: dim must be positive", observed=str(manifest.dim)))
    if manifest.data_sha256 and not failures and file_sha256(data_path) != manifest.data_sha256:
        failures.append(problem(f"{data_path}: content does not match the manifest's data_sha256", observed="mismatch"))
    folder_claims = {"family": snapshot_dir.parent.parent.name, "model_version": snapshot_dir.parent.name}
    for name, folder_value in folder_claims.items():
        if folder_value != getattr(manifest, name) and snapshot_dir.name.startswith("date="):
            failures.append(
                problem(
                    f"{snapshot_dir}/manifest.json: {name} disagrees with the folder layout",
                    observed=f"{getattr(manifest, name)!r} vs folder {folder_value!r}",
                )
            )
    return manifest, failures


def _derive_snapshot_frames(
    snapshot_dir: Path,
    manifest: SnapshotManifest,
    history: list[tuple[Path, SnapshotManifest]],
    norm_bounds: tuple[float, float],
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Per-row scalar view of the vectors and, with a history, per-dimension shift.

    The cosine compares each entity with the newest snapshot of ``history`` (the day before: the
    refresh averages each day onto it); the per-dimension mean and std are compared with all of
    ``history`` pooled, so that one unusual day in the reference does not decide the next one.
    """
    previous = history[-1] if history else None
    from derm.core.sql import connect, ident
    from derm.validation import suites

    key = ident(manifest.join_key)
    with connect() as con:
        parameters = {"current": str(snapshot_dir / manifest.data_file)}
        if previous is None:
            previous_rows = f"SELECT NULL::BIGINT AS {key}, NULL::FLOAT[] AS embedding WHERE false"
            cosine = seen = closer = ""
        else:
            parameters["previous"] = str(previous[0] / previous[1].data_file)
            history_files = [str(directory / recent.data_file) for directory, recent in history]
            # One vector per entity even if the previous snapshot (wrongly) had duplicates.
            # ``other``: another entity's vector of the day before (the next one in a fixed hash order,
            # wrapping around), the reference of the closer-to-own-previous check.
            previous_rows = f"""
                SELECT {key}, embedding,
                       coalesce(lead(embedding) OVER w, first_value(embedding) OVER w) AS other
                FROM (SELECT {key}, any_value(embedding) AS embedding FROM read_parquet($previous) GROUP BY {key})
                WINDOW w AS (ORDER BY hash({key}), {key})
            """
            # list_cosine_similarity rejects lists of unequal length or with NULL elements; those fail
            # their own checks.
            # Retention: which of today's entities the day before had; their count against the day before's
            # row count is the fraction of yesterday's entities still here (growth is not a failure).
            seen = f", (c.{key} IN (SELECT {key} FROM read_parquet($previous)))::INT AS {suites.IN_PREVIOUS_DAY}"
            cosine = (
                ", CASE WHEN len(c.embedding) = len(p.embedding) AND list_count(c.embedding) = len(c.embedding) "
                "AND list_count(p.embedding) = len(p.embedding) "
                "THEN list_cosine_similarity(c.embedding::DOUBLE[], p.embedding::DOUBLE[]) END "
                f"AS {suites.COSINE_TO_PREVIOUS}"
            )
            # Reuses the cosine column (NULL where a vector is malformed); only ``other`` needs its own guard.
            closer = (
                f", CASE WHEN {suites.COSINE_TO_PREVIOUS} IS NOT NULL AND len(p.other) = len(c.embedding) "
                f"AND list_count(p.other) = len(p.other) THEN ({suites.COSINE_TO_PREVIOUS} > "
                "list_cosine_similarity(c.embedding::DOUBLE[], p.other::DOUBLE[]))::INT END "
                f"AS {suites.CLOSER_TO_OWN_PREVIOUS}"
            )
        rows = con.execute(
            f"""
            WITH p AS ({previous_rows})
            SELECT c.{key}, c.event_timestamp, c.model_version,
                   len(c.embedding) AS {suites.EMBEDDING_DIM},
                   sqrt(list_sum(list_transform(c.embedding, lambda x: x::DOUBLE * x::DOUBLE))) AS {suites.L2_NORM},
                   -- NULL elements are their own check, not a non-finite value.
                   coalesce(list_bool_and(list_transform(c.embedding, lambda x: x IS NULL OR isfinite(x))), false)
                       AS {suites.ALL_VALUES_FINITE},
                   coalesce(list_count(c.embedding) = len(c.embedding), false) AS {suites.NO_NULL_VALUES},
                   coalesce(list_bool_or(list_transform(c.embedding, lambda x: x <> 0)), false)
                       AS {suites.HAS_NONZERO_VALUE}
                   {cosine} {closer} {seen}
            FROM read_parquet($current, file_row_number = true) AS c LEFT JOIN p USING ({key})
            ORDER BY c.file_row_number  -- the file's order: offending ids are reported as written
            """,
            parameters,
        ).df()
        if previous is None:
            return rows, None
        # Only well-formed vectors within the norm bounds say something about the distribution:
        # broken ones fail above, and outliers are counted (and tolerated) by the norm check.
        dimensions = con.execute(
            f"""
            WITH stats AS (
                SELECT source, d AS {suites.DIMENSION}, avg(v) AS mean, stddev_pop(v) AS std
                FROM (
                    SELECT source, generate_subscripts(embedding, 1) AS d, unnest(embedding)::DOUBLE AS v
                    FROM (
                        -- Entities of both sides only: new entities change the population, not the space.
                        SELECT 'current' AS source, embedding FROM read_parquet($current)
                        WHERE {key} IN (SELECT {key} FROM read_parquet($history))
                        UNION ALL
                        SELECT 'previous' AS source, embedding FROM read_parquet($history)
                        WHERE {key} IN (SELECT {key} FROM read_parquet($current))
                    )
                    WHERE len(embedding) = $dim AND list_count(embedding) = $dim
                      AND list_bool_and(list_transform(embedding, lambda x: isfinite(x)))
                      AND sqrt(list_sum(list_transform(embedding, lambda x: x::DOUBLE * x::DOUBLE)))
                          BETWEEN $norm_min AND $norm_max
                )
                GROUP BY ALL
            )
            SELECT c.{suites.DIMENSION},
                   abs(c.mean - p.mean) / nullif(p.std, 0) AS {suites.MEAN_SHIFT},
                   c.std / nullif(p.std, 0) AS {suites.STD_RATIO}
            FROM stats c JOIN stats p USING ({suites.DIMENSION})
            WHERE c.source = 'current' AND p.source = 'previous'
            ORDER BY c.{suites.DIMENSION}
            """,
            {
                "current": parameters["current"],
                "history": history_files,
                "dim": manifest.dim,
                "norm_min": norm_bounds[0],
                "norm_max": norm_bounds[1],
            },
        ).df()
        return rows, dimensions


def validate_snapshot(
    snapshot_dir: Path,
    previous_dir: Path | None = None,
    *,
    history_dirs: list[Path] | None = None,
    thresholds: GateThresholds | None = None,
    docs_dir: Path,
    now: datetime | None = None,
) -> GateReport:
    """Validate one embedding snapshot before it is published.

    Args:
        snapshot_dir: the snapshot folder.
        previous_dir: the snapshot of the day before (cosine drift, overlap); default: the newest of
            ``history_dirs``.
        history_dirs: earlier snapshots of the same family and version, oldest first, that coverage
            and per-dimension statistics are judged against; default: the ``history_days`` latest
            earlier snapshot folders next to ``snapshot_dir`` (or ``[previous_dir]`` when given), so
            that a caller cannot skip the drift checks by accident. The first snapshot of a version has none.
        thresholds: default ``validation/thresholds.yaml``.
        docs_dir: root of the Great Expectations project and Data Docs.
        now: the clock of the "not in the future" check.
    """
    snapshot_dir = Path(snapshot_dir)
    thresholds = thresholds or GateThresholds.load()
    now = now or datetime.now(UTC)
    manifest, structural = _read_snapshot_structure(snapshot_dir)
    label = _snapshot_label(snapshot_dir, manifest)
    if structural or manifest is None:
        return GateReport(
            success=False,
            failures=structural,
            data_docs_page=None,
            summary=f"{label}: unreadable as a snapshot ({len(structural)} structural problems)",
            subject=str(snapshot_dir),
        )

    snapshot_thresholds = thresholds.snapshot
    if history_dirs is None:
        history_dirs = (
            [Path(previous_dir)]
            if previous_dir is not None
            else recent_snapshots(snapshot_dir, snapshot_thresholds.history_days)
        )
    elif previous_dir is not None:
        history_dirs = [*[Path(d) for d in history_dirs if Path(d) != Path(previous_dir)], Path(previous_dir)]
    notes: list[str] = []
    history: list[tuple[Path, SnapshotManifest]] = []
    for directory in history_dirs:
        recent_manifest, problems = _read_snapshot_structure(directory)
        if problems or recent_manifest is None:
            # A broken earlier snapshot was never published; comparing against it says nothing.
            notes.append(f"earlier snapshot {directory} is unreadable: left out of the history")
        else:
            history.append((Path(directory), recent_manifest))
    if not history:
        notes.append(
            f"drift checks skipped: no earlier snapshot of this family and version (or none readable); "
            f"{FIRST_SNAPSHOT_POLICY}"
        )

    from derm.validation import suites

    norm_bounds = (snapshot_thresholds.norm_min, snapshot_thresholds.norm_max)
    rows, dimensions = _derive_snapshot_frames(snapshot_dir, manifest, history, norm_bounds)
    previous = history[-1] if history else None
    previous_label = _snapshot_label(previous[0], previous[1]) if previous else None
    history_label = None
    if history:
        first, last = history[0][1].snapshot_date, history[-1][1].snapshot_date
        history_label = (
            previous_label
            if len(history) == 1
            else f"the {len(history)} earlier days {first.isoformat()}..{last.isoformat()} of "
            f"{manifest.family} {manifest.model_version}"
        )
    judge_relative = True
    if previous is not None:
        smallest = min(len(rows), previous[1].row_count)
        minimum = snapshot_thresholds.min_population_for_relative_checks
        judge_relative = smallest >= minimum
        if not judge_relative:
            notes.append(
                f"overlap with {previous_label} and per-dimension mean/std shift skipped: {smallest} entities, "
                f"fewer than min_population_for_relative_checks={minimum}"
            )
    suite_prefix = f"embedding_snapshot.{manifest.family}.{manifest.model_version}"
    context = _GXProject.context(Path(docs_dir))
    results = [
        _run_suite(
            context,
            "embedding_snapshot_rows",
            suites.snapshot_rows_suite(
                f"{suite_prefix}.rows",
                manifest,
                snapshot_thresholds,
                now=now,
                recent_row_counts=[recent.row_count for _, recent in history] or None,
                previous_label=previous_label,
                history_label=history_label,
                judge_overlap=judge_relative,
            ),
            rows,
            [manifest.join_key],
            label,
        )
    ]
    failures = _failures_from(results[0], [manifest.join_key])
    if dimensions is not None and history_label is not None and judge_relative:
        results.append(
            _run_suite(
                context,
                "embedding_snapshot_dimensions",
                suites.snapshot_dimensions_suite(f"{suite_prefix}.dimensions", snapshot_thresholds, history_label),
                dimensions,
                [suites.DIMENSION],
                label,
            )
        )
        failures += _failures_from(results[1], [suites.DIMENSION])
    passed, total = _count_expectations(results)
    return GateReport(
        success=not failures,
        failures=failures,
        data_docs_page=_build_data_docs(context, results),
        summary=f"{label}: {passed}/{total} expectations passed",
        subject=str(snapshot_dir),
        notes=notes,
    )


# --------------------------------------------------------------------------- training sets


def validate_training_set(
    df: pd.DataFrame,
    *,
    label: str,
    embedding_columns: list[str],
    required_columns: list[str],
    window: tuple[datetime, datetime],
    thresholds: GateThresholds | None = None,
    docs_dir: Path,
    entity_columns: dict[str, str] | None = None,
    expected_label_rate: float | None = None,
) -> GateReport:
    """Validate a point-in-time-joined training set (embedding cells: list of float32, or null if missing).

    Args:
        entity_columns: embedding column -> the id column of its entity (``ctr_user_emb`` -> ``user_id``).
            For those columns a row whose entity first appears in the set less than
            ``cold_start_hours`` earlier is cold start: no snapshot could hold the entity yet, so its
            missing embedding does not count against ``max_missing_embedding_rate``. Columns without
            an entity are judged on every row.
        expected_label_rate: label rate of the same labelled events in the event log; the training
            set's must be within ``max_label_rate_difference`` of it. ``None``: sanity bounds only.
    """
    import pandas as pd

    from derm.validation import suites

    thresholds = thresholds or GateThresholds.load()
    entity_columns = {c: e for c, e in (entity_columns or {}).items() if c in embedding_columns}
    start, end = (_utc_timestamp(bound) for bound in window)
    subject = f"training set ({len(df)} rows, {start:%Y-%m-%d %H:%M}..{end:%Y-%m-%d %H:%M})"
    needed = list(
        dict.fromkeys(["event_timestamp", label, *embedding_columns, *required_columns, *entity_columns.values()])
    )
    structural = [
        FailedCheck(_TRAINING_STRUCTURE_CHECK, f"required column {column} missing", "absent", column=column)
        for column in needed
        if column not in df.columns
    ]
    if not structural and not (pd.api.types.is_numeric_dtype(df[label]) or pd.api.types.is_bool_dtype(df[label])):
        structural.append(
            FailedCheck(
                _TRAINING_STRUCTURE_CHECK, f"label {label} must be numeric or bool", str(df[label].dtype), column=label
            )
        )
    if not structural and df.empty:
        structural.append(FailedCheck(_TRAINING_STRUCTURE_CHECK, "training set is empty", "0 rows"))
    if structural:
        return GateReport(False, structural, None, f"{subject}: unreadable ({len(structural)} problems)", subject)

    id_columns = [c for c in required_columns if c not in {label, "event_timestamp", *embedding_columns}]
    id_columns = id_columns or ["event_timestamp"]
    frame = df[list(dict.fromkeys([*id_columns, *needed]))].copy()
    timestamps = pd.to_datetime(frame["event_timestamp"])
    frame["event_timestamp"] = timestamps.dt.tz_localize("UTC") if timestamps.dt.tz is None else timestamps
    frame[label] = frame[label].astype("float64")
    for column in embedding_columns:
        # GE cannot reason about list cells; their length (null when missing) keeps the null semantics.
        frame[column] = frame[column].map(_vector_length).astype("Float64")

    notes: list[str] = []
    warm_columns: dict[str, str] = {}
    grace = pd.Timedelta(hours=thresholds.training_set.cold_start_hours)
    for column, entity in entity_columns.items():
        warm = f"warm_{column}"
        first_seen = frame.groupby(entity, dropna=False)["event_timestamp"].transform("min")
        frame[warm] = (frame["event_timestamp"] >= first_seen + grace).astype(bool)
        warm_columns[column] = warm
        missing = frame[column].isna()
        notes.append(
            f"{column}: {int(missing.sum())} of {len(frame)} rows miss the embedding, "
            f"{int((missing & ~frame[warm]).sum())} of them cold start ({entity} first seen in the set less than "
            f"{thresholds.training_set.cold_start_hours:g} h earlier); judged on {int(frame[warm].sum())} warm rows"
        )
    if expected_label_rate is None:
        notes.append("label rate checked against sanity bounds only: no event-log label rate given")

    suite = suites.training_set_suite(
        "training_set",
        label=label,
        embedding_columns=embedding_columns,
        required_columns=required_columns,
        window=(start, end),
        thresholds=thresholds.training_set,
        warm_columns=warm_columns,
        expected_label_rate=expected_label_rate,
    )
    context = _GXProject.context(Path(docs_dir))
    result = _run_suite(context, "training_set", suite, frame, id_columns, subject)
    failures = _failures_from(result, id_columns)
    passed, total = _count_expectations([result])
    return GateReport(
        success=not failures,
        failures=failures,
        data_docs_page=_build_data_docs(context, [result]),
        summary=f"{subject}: {passed}/{total} expectations passed",
        subject=subject,
        notes=notes,
    )


def _vector_length(cell: Any) -> int | None:
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return None
    return len(cell)


def _utc_timestamp(value: datetime) -> Any:
    import pandas as pd

    stamp = pd.Timestamp(value)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


__all__ = [
    "DEFAULT_THRESHOLDS_PATH",
    "FailedCheck",
    "GateReport",
    "GateThresholds",
    "SnapshotThresholds",
    "TrainingSetThresholds",
    "ValidationFailed",
    "load_thresholds",
    "previous_snapshot",
    "recent_snapshots",
    "validate_snapshot",
    "validate_training_set",
]
