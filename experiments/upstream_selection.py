"""Choose the upstream training schedule on the daily next-day quality check (issue 17).

Every refreshed snapshot's manifest carries the pair's next-day quality
(:func:`derm.training.upstream.refresh.upstream_quality`: day ``t``'s user x Pin
dot products scored on day ``t+1``'s events, against Pin popularity). This module
reads those figures for every upstream version of an objective, over a range of
snapshot days, and compares the versions: which training settings set each one
apart, and how far above popularity its embeddings rank the next day's positives.

Why this check and not another: the generator's planted truth exists only for
synthetic logs, and the rankers' validation and evaluation days must stay unseen by
whatever chooses the upstream schedule, so the choice is made on the next-day check
over snapshot days before them (:attr:`UpstreamComparison.notes` says when the range
reaches into them).

The user and Pin families of an objective carry the same quality dict (it is
measured once per pair); the figures are checked to agree and counted once per
(objective, version, day).

Example::

    comparison = compare_upstream_versions(PlatformPaths.from_env(), objectives=("ctr",),
                                           through_date=date(2026, 1, 6))
    for row in comparison.rows:
        print(row.objective, row.version, row.settings, row.margin, row.margin_ci, row.best)
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from scipy import stats

from derm.core.naming import OBJECTIVES, families_of
from derm.core.paths import PlatformPaths
from derm.core.snapshot import MANIFEST_FILE
from derm.core.sql import connect
from derm.events.schema import log_days
from derm.events.synthetic import SyntheticConfig
from derm.experiments.planted import PLANTED_KEY, PlantedUpstream
from derm.training.downstream.train import DownstreamConfig
from derm.training.upstream.config import UpstreamConfig
from derm.training.upstream.train import VERSION_CONFIG_FILE, version_dir


class UpstreamQualityError(ValueError):
    """Nothing to compare (unknown objective, no scored day in range) or manifests that disagree."""


@dataclass(frozen=True)
class VersionQuality:
    """One upstream version of one objective, summarised over its scored snapshot days.

    A day is *scored* when its manifest's quality has ``evaluated_on`` and both ROC-AUCs (the last day
    of the log has no next day yet; a next day without both label classes has no ROC-AUC).
    """

    objective: str
    version: str
    settings: dict[str, Any]  # what sets the version apart from the default config (see _settings)
    days: tuple[date, ...]  # scored snapshot days, ascending
    roc_auc: float  # mean over days of the dot-product ROC-AUC on day t+1
    roc_auc_popularity: float  # mean over days of Pin popularity's ROC-AUC on the same rows
    margin: float  # mean over days of roc_auc - roc_auc_popularity
    margin_ci: tuple[float, float] | None  # 95% t-interval of the mean margin over days; None under 2 days
    daily_margin: tuple[float, ...]  # roc_auc - roc_auc_popularity of each day of ``days``
    recall_at_k: float | None  # mean over days (days with a figure) of recall@k of next-day positive Pins
    recall_at_k_popularity: float | None
    k: int | None  # recall cut-off, when every day used the same
    flagged_days: int  # days flagged ``no_better_than_popularity``
    best: bool = False  # the largest mean margin among the objective's versions scored on the same days
    comparable: bool = True  # scored on the day set the objective's best was chosen on
    # On the best row: its mean margin minus the runner-up's, with a 95% paired t-interval over the shared days
    # (the day-to-day swing both versions share cancels out); None without a runner-up.
    lead: tuple[float, float, float] | None = None  # (mean, low, high)

    def to_json(self) -> dict[str, Any]:
        payload = dataclasses.asdict(self)
        payload["days"] = [d.isoformat() for d in self.days]
        payload["margin_ci"] = list(self.margin_ci) if self.margin_ci else None
        payload["lead"] = list(self.lead) if self.lead else None
        return payload


@dataclass(frozen=True)
class UpstreamComparison:
    """The rows (objective, then version order) and plain-sentence notes about what was compared."""

    rows: list[VersionQuality]
    from_date: date | None
    through_date: date | None
    snapshots_dir: Path
    notes: list[str] = field(default_factory=list)


def compare_upstream_versions(
    paths: PlatformPaths,
    objectives: Sequence[str] = tuple(OBJECTIVES),
    from_date: date | None = None,
    through_date: date | None = None,
) -> UpstreamComparison:
    """Compare every upstream version of ``objectives`` on the next-day quality in its manifests.

    Per (objective, version): the settings of its ``config.json`` that differ from the default
    :class:`~derm.training.upstream.config.UpstreamConfig` (diffed, not listed by name, so a new field
    shows up by itself; the aggregation and ``ema_weight`` always), the scored days in
    ``[from_date, through_date]``, the mean ROC-AUC, popularity ROC-AUC and margin with a 95%
    **t-interval over days** (mean +- t_{0.975, n-1} * sd / sqrt(n); days are treated as independent,
    which the moving average makes optimistic), mean recall@k against popularity's, and the days
    flagged no better than popularity. The best version of an objective (largest mean margin) is
    chosen only among versions scored on the same set of days: when the day sets differ, the set shared
    by most versions (then the longest, then the latest) is used and a note says which versions were
    left out of the choice. The best row's ``lead`` is its mean margin minus the runner-up's with a 95%
    paired t-interval over the shared days; a note says when that interval reaches zero (no clear lead).

    Args:
        paths: platform locations; the manifests are read under ``paths.snapshots_dir``.
        objectives: ``"ctr"`` and/or ``"cvr"``.
        from_date: first snapshot day (inclusive); ``None``: the first one.
        through_date: last snapshot day (inclusive); ``None``: the last one.

    Returns:
        An :class:`UpstreamComparison`; its rows are sorted by objective, then version number.

    Raises:
        UpstreamQualityError: an unknown objective, ``from_date`` after ``through_date``, no scored
            manifest in range (the message names the snapshots directory and the range), or a user and
            a Pin manifest of the same day with different quality figures.

    Example::

        rows = compare_upstream_versions(paths, ("ctr",)).rows   # [VersionQuality(version="v1", ...), ...]
    """
    unknown = sorted(set(objectives) - set(OBJECTIVES))
    if unknown or not objectives:
        raise UpstreamQualityError(
            f"unknown objective {unknown or list(objectives)}: expected some of {list(OBJECTIVES)}"
        )
    if from_date and through_date and from_date > through_date:
        raise UpstreamQualityError(f"--from-date {from_date} is after --through-date {through_date}")
    span = f"{from_date or 'first'} .. {through_date or 'last'}"
    per_day = _scored_days(paths.snapshots_dir, objectives, from_date, through_date)
    if not per_day:
        raise UpstreamQualityError(
            f"no {'/'.join(objectives)} snapshot with a next-day quality figure under {paths.snapshots_dir} "
            f"for snapshot days {span}: run `derm train-upstream` first, or widen the range"
        )
    rows: list[VersionQuality] = []
    notes: list[str] = []
    for objective in objectives:
        versions = sorted({v for o, v, _ in per_day if o == objective}, key=_version_order)
        found = [_summarise(paths, objective, v, per_day) for v in versions]
        if found:
            chosen, note = _mark_best(objective, found)
            rows.extend(chosen)
            notes.extend(note)
    notes.extend(_held_out_note(paths, rows))
    return UpstreamComparison(rows, from_date, through_date, Path(paths.snapshots_dir), notes)


# --------------------------------------------------------------------------- reading the manifests

_QUALITY_FIGURES = (
    "roc_auc",
    "roc_auc_popularity",
    "recall_at_k",
    "recall_at_k_popularity",
    "k",
    "no_better_than_popularity",
    "evaluated_on",
)


def _scored_days(
    snapshots_dir: Path, objectives: Sequence[str], from_date: date | None, through_date: date | None
) -> dict[tuple[str, str, date], dict[str, Any]]:
    """(objective, version, snapshot day) -> its quality figures, one entry per pair of families.

    DuckDB reads every manifest of the objectives' families at once (``quality`` kept as JSON, so a
    figure added later needs no schema change here); a day counts once per objective and version, after
    checking that its user and Pin manifests carry the same figures.
    """
    family_objective = {f: o for o in objectives for f in families_of(o).values()}
    files = [
        str(p) for f in family_objective for p in sorted(Path(snapshots_dir).glob(f"{f}/*/date=*/{MANIFEST_FILE}"))
    ]
    if not files:
        return {}
    figures = ", ".join(f"quality->>'$.{name}' AS {name}" for name in _QUALITY_FIGURES)
    sql = f"""
        SELECT family, model_version, snapshot_date, filename, {figures}
        FROM read_json($files, format = 'auto', filename = true,
                       columns = {{family: 'VARCHAR', model_version: 'VARCHAR',
                                  snapshot_date: 'DATE', quality: 'JSON'}})
        WHERE quality->>'$.evaluated_on' IS NOT NULL
          AND quality->>'$.roc_auc' IS NOT NULL AND quality->>'$.roc_auc_popularity' IS NOT NULL
          AND ($from_date IS NULL OR snapshot_date >= $from_date)
          AND ($through_date IS NULL OR snapshot_date <= $through_date)
        ORDER BY snapshot_date, family
    """
    with connect() as con:
        cursor = con.execute(sql, {"files": files, "from_date": from_date, "through_date": through_date})
        names = [d[0] for d in cursor.description]
        records = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    out: dict[tuple[str, str, date], dict[str, Any]] = {}
    seen_in: dict[tuple[str, str, date], str] = {}
    for record in records:
        key = (family_objective[record["family"]], record["model_version"], record["snapshot_date"])
        figures_of_day = {name: record[name] for name in _QUALITY_FIGURES}
        if key in out and out[key] != figures_of_day:
            raise UpstreamQualityError(
                f"{record['filename']} and {seen_in[key]}: the user and Pin manifests of {key[0]} {key[1]} "
                f"{key[2]} record different quality figures (the check is measured once per pair)"
            )
        out.setdefault(key, figures_of_day)
        seen_in.setdefault(key, record["filename"])
    return out


def _version_order(version: str) -> tuple[int, int, str]:
    """v2 before v10 (versions are numbered in the order they were first trained)."""
    digits = version.removeprefix("v")
    return (0, int(digits), version) if digits.isdigit() else (1, 0, version)


# --------------------------------------------------------------------------- one version


def _settings(paths: PlatformPaths, objective: str, version: str) -> dict[str, Any]:
    """What the version's ``config.json`` sets apart from the default config: every entry that differs
    (``train`` entries by name, other sections as ``section.name``), then the aggregation and w."""
    config_file = version_dir(paths.models_dir, objective, version) / VERSION_CONFIG_FILE
    if not config_file.exists():
        return {"config": f"missing ({config_file})"}
    payload = json.loads(config_file.read_text())
    defaults = json.loads(json.dumps(UpstreamConfig().version_payload(objective)))
    out: dict[str, Any] = {}
    if PLANTED_KEY in payload:  # the generator's tastes: its settings are diffed from the generator's defaults
        generator = PlantedUpstream(SyntheticConfig()).version_payload(objective)[PLANTED_KEY]
        defaults[PLANTED_KEY] = json.loads(json.dumps(generator))
        out[PLANTED_KEY] = True
    for section, values in sorted(payload.items()):
        if not isinstance(values, dict) or section == "aggregation":
            continue
        default = defaults.get(section, {})
        for name, value in sorted(values.items()):
            if name not in default or default[name] != value:
                out[name if section == "train" else f"{section}.{name}"] = value
    aggregation = payload.get("aggregation", {})
    for name, value in sorted(aggregation.items()):
        if name not in ("aggregation", "ema_weight") and defaults["aggregation"].get(name) != value:
            out[f"aggregation.{name}"] = value
    out["aggregation"] = aggregation.get("aggregation")
    if aggregation.get("ema_weight") is not None:
        out["ema_weight"] = aggregation["ema_weight"]
    return out


def _mean(values: list[float | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _t_interval(values: list[float]) -> tuple[float, float] | None:
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return (mean - half, mean + half)


def _summarise(
    paths: PlatformPaths, objective: str, version: str, per_day: dict[tuple[str, str, date], dict[str, Any]]
) -> VersionQuality:
    days = sorted(d for o, v, d in per_day if (o, v) == (objective, version))
    figures = [per_day[(objective, version, d)] for d in days]
    auc = [float(f["roc_auc"]) for f in figures]
    popularity = [float(f["roc_auc_popularity"]) for f in figures]
    margins = [a - p for a, p in zip(auc, popularity, strict=True)]
    ks = {f["k"] for f in figures}
    return VersionQuality(
        objective=objective,
        version=version,
        settings=_settings(paths, objective, version),
        days=tuple(days),
        roc_auc=sum(auc) / len(auc),
        roc_auc_popularity=sum(popularity) / len(popularity),
        margin=sum(margins) / len(margins),
        margin_ci=_t_interval(margins),
        daily_margin=tuple(margins),
        recall_at_k=_mean([f["recall_at_k"] for f in figures]),
        recall_at_k_popularity=_mean([f["recall_at_k_popularity"] for f in figures]),
        k=int(ks.pop()) if len(ks) == 1 and None not in ks else None,
        flagged_days=sum(f["no_better_than_popularity"] == "true" for f in figures),
    )


# --------------------------------------------------------------------------- the choice


def _span(days: tuple[date, ...]) -> str:
    return f"{len(days)} day(s) {days[0]} .. {days[-1]}" if days else "no day"


def _mark_best(objective: str, rows: list[VersionQuality]) -> tuple[list[VersionQuality], list[str]]:
    """The rows with ``best`` on the largest margin among the versions of the chosen day set."""
    groups: dict[tuple[date, ...], list[VersionQuality]] = {}
    for row in rows:
        groups.setdefault(row.days, []).append(row)
    chosen_days = max(groups, key=lambda days: (len(groups[days]), len(days), days[-1]))
    ranked = sorted(groups[chosen_days], key=lambda row: row.margin, reverse=True)
    best, lead, notes = ranked[0], None, []
    if len(ranked) > 1:
        runner_up = ranked[1]
        differences = [b - r for b, r in zip(best.daily_margin, runner_up.daily_margin, strict=True)]
        interval = _t_interval(differences)
        lead = (best.margin - runner_up.margin, *interval) if interval else None
        if interval is not None and interval[0] <= 0.0:
            notes.append(
                f"{objective}: {best.version} leads {runner_up.version} by {lead[0]:+.4f} mean margin, 95% paired "
                f"t-interval over days [{interval[0]:+.4f}, {interval[1]:+.4f}]: not a clear lead on these days."
            )
    marked = [
        dataclasses.replace(
            row, best=row is best, comparable=row.days == chosen_days, lead=lead if row is best else None
        )
        for row in rows
    ]
    if len(groups) > 1:
        left_out = ", ".join(f"{r.version} ({_span(r.days)})" for r in marked if not r.comparable)
        notes.append(
            f"{objective}: versions were scored on different days; the best is chosen only among "
            f"{', '.join(r.version for r in marked if r.comparable)} ({_span(chosen_days)}). Left out: {left_out}. "
            + _shared_days(rows)
        )
    return marked, notes


def _shared_days(rows: list[VersionQuality]) -> str:
    shared = sorted(set.intersection(*(set(r.days) for r in rows)))
    if not shared:
        return "They share no scored day."
    return f"They share {_span(tuple(shared))}: narrow --from-date/--through-date to it to compare them all."


def _held_out_note(paths: PlatformPaths, rows: list[VersionQuality]) -> list[str]:
    """A note when a scored day's next day falls on the rankers' validation or evaluation days (by default
    the last ``eval_days + validation_days`` days of the log): choosing the schedule there would tune the
    upstream on the days the rankers are judged on."""
    try:
        last = log_days(paths.events_dir)[-1]
    except ValueError:  # EventLogError: no event log here: nothing to compare the range with
        return []
    downstream = DownstreamConfig()
    held_out = last - timedelta(days=downstream.eval_days + downstream.validation_days - 1)
    reaching = sorted({d for row in rows for d in row.days if d + timedelta(days=1) >= held_out})
    if not reaching:
        return []
    return [
        f"{len(reaching)} scored day(s) ({reaching[0]} .. {reaching[-1]}) score events of {held_out} or later, "
        f"the rankers' validation/evaluation days by default: choose the schedule with "
        f"--through-date {held_out - timedelta(days=2)} or earlier."
    ]
