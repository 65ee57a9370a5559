"""The compatibility gate: may a new upstream model version replace the promoted one under the rankers?

A new model version (a retrain with another seed, another aggregation, a changed config) is a new
embedding space. The downstream rankers were trained on the old one, so before ``derm promote``
moves a model's families, this gate compares the two versions of one model (both families, on the
newest day both have offline) and the rankers on them:

1. **Geometry.** One orthogonal Procrustes rotation (:func:`scipy.linalg.orthogonal_procrustes`)
   maps the new space onto the old, fitted on a random half of the entities of both families
   (users and Pins share a space: their dot product is the model's score), after centring each
   family; the *agreement* of a family is the median cosine between an entity's aligned new vector
   and its old vector, over the held-out half. Its *chance* level is the same median for mismatched
   entities. A retrain with another seed is a rotated space: low agreement before alignment, clearly
   above chance after; a broken side (Pins shuffled) stays at chance.
2. **Neighbours.** For a sample of users present in both versions, the overlap@k of their top-k Pins
   by dot product in the old space and in the new one (rotation-free), reported with its chance
   level ``k / #Pins`` and as a lift ``(overlap - chance) / (1 - chance)``.
3. **Rankers.** The promoted ranker (the newest saved ``<objective>_ranker`` trained on the old
   version) scores the latest labelled days (the last ``eval_days`` of the log, never before its
   held-out split) once with the old version's embeddings and once with the new one's, read point
   in time through Feast; and, when a saved ranker was trained on the new version, that ranker on
   the new embeddings. ROC-AUC with paired bootstrap 95% CIs (the same rows for all).

Verdict (thresholds: the ``compat:`` section of ``validation/thresholds.yaml``):

* ``incompatible``: a family's aligned agreement or the neighbour lift below its floor (the space
  lost its structure), or a ranker retrained on the new version is worse than the promoted ranker on
  the old one by more than ``max_retrained_auc_drop``;
* ``compatible``: the promoted ranker on the new embeddings loses at most ``max_auc_drop`` ROC-AUC
  (without a promoted ranker: every family's centred cosine before alignment is at least
  ``min_raw_agreement``, i.e. the space did not move);
* ``needs-retrain`` otherwise: the structure is there, the rankers' weights do not read it.

``derm promote`` runs the gate and refuses ``incompatible``, and ``needs-retrain`` unless a ranker
trained on the new version exists (or with an explicit, recorded override). The report is written
as ``<data_dir>/reports/compat_<objective>_<new>_vs_<old>.md`` and ``.png``, beside the ablation
reports.

Example::

    report = compatibility(paths, repo.store(), "ctr", "v2")        # against the promoted version
    report.verdict                                                   # "needs-retrain"
    write_compat_report(paths, report)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from scipy.linalg import orthogonal_procrustes

from derm.core.naming import OBJECTIVES, families_of, feature_name, join_key, objective_of, ranker_service_name
from derm.core.paths import PlatformPaths
from derm.core.training_set import read_training_set
from derm.events.schema import log_days
from derm.experiments.reports import reports_dir
from derm.materialization.catalog import OFFLINE_DATA_FILE, Catalog
from derm.training.downstream.dataset import label_array
from derm.training.downstream.ranker import SPEC_FILE, RankerSpec, load_ranker, ranker_dir
from derm.training.downstream.train import Estimate, bootstrap_metrics
from derm.training.downstream.training_sets import build_training_set, ranker_service

Log = Callable[[str], None] | None

COMPATIBLE, NEEDS_RETRAIN, INCOMPATIBLE = "compatible", "needs-retrain", "incompatible"
VERDICTS = (COMPATIBLE, NEEDS_RETRAIN, INCOMPATIBLE)


class CompatError(ValueError):
    """The gate cannot compare the two versions (unknown model, nothing in common): the message says why."""


# --------------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class CompatThresholds:
    """The ``compat:`` section of the gate's YAML; the reasoning behind each value is written there."""

    eval_days: int = 2
    sample_users: int = 500
    neighbours_k: int = 10
    min_aligned_agreement: float = 0.12
    min_neighbour_lift: float = 0.2
    min_raw_agreement: float = 0.8
    max_auc_drop: float = 0.005
    max_retrained_auc_drop: float = 0.005
    bootstrap: int = 1000
    seed: int = 0

    @classmethod
    def load(cls, path: Path | None = None) -> CompatThresholds:
        """The ``compat:`` section of ``path`` (default ``validation/thresholds.yaml``); unknown keys are errors."""
        import yaml

        from derm.validation.thresholds import DEFAULT_THRESHOLDS_PATH

        path = Path(path) if path is not None else DEFAULT_THRESHOLDS_PATH
        section = (yaml.safe_load(path.read_text()) or {}).get("compat") or {}
        known = {f.name for f in fields(cls)}
        unknown = set(section) - known
        if unknown:
            raise ValueError(f"{path}: unknown compat keys {sorted(unknown)}; expected {sorted(known)}")
        return cls(**section)


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class FamilyAgreement:
    """How well one family's entities keep their place from the old space to the new one."""

    family: str
    entities: int  # present in both versions on the compared day
    held_out: int  # evaluated on (the other half fitted the rotation)
    raw: float  # median cosine, centred, without alignment
    aligned: float  # median cosine after the Procrustes rotation, held-out entities
    chance: float  # the same for mismatched entities: what "no agreement" looks like


@dataclass(frozen=True)
class Geometry:
    day: date
    families: list[FamilyAgreement]
    users_sampled: int
    pins: int
    k: int
    overlap: float  # mean overlap@k of the users' top-k Pins, old space vs new space
    overlap_chance: float  # k / pins

    @property
    def neighbour_lift(self) -> float:
        """``(overlap - chance) / (1 - chance)``: 0 = as random, 1 = the same neighbours."""
        return (self.overlap - self.overlap_chance) / max(1.0 - self.overlap_chance, 1e-9)


def read_family(catalog: Catalog, family: str, version: str, day: date) -> tuple[np.ndarray, np.ndarray]:
    """``(ids (N,) int64, vectors (N, D) float64)`` of one published (family, version, day), ids ascending."""
    path = catalog.partition_dir(family, version, day) / OFFLINE_DATA_FILE
    if not path.exists():
        raise CompatError(f"{family} {version}: no published day {day} ({path})")
    table = pq.read_table(path, columns=[join_key(family), feature_name(family)])
    ids = table.column(0).to_numpy()
    vectors = np.stack(table.column(1).to_numpy(zero_copy_only=False)).astype(np.float64)
    order = np.argsort(ids, kind="stable")
    return ids[order], vectors[order]


def common_day(catalog: Catalog, families: list[str], new: str, old: str) -> date:
    """The newest day every family has published in both versions."""
    days: set[date] | None = None
    for family in families:
        for version in (new, old):
            have = {m.snapshot_date for m in catalog.manifests(family, version)}
            days = have if days is None else days & have
    if not days:
        raise CompatError(f"{', '.join(families)}: versions {new} and {old} have no published day in common")
    return max(days)


def _median_cosine(a: np.ndarray, b: np.ndarray) -> float:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.median((a * b).sum(axis=1) / np.maximum(norms, 1e-12)))


def geometry(
    pairs: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    day: date,
    thresholds: CompatThresholds,
) -> Geometry:
    """Procrustes agreement per family and the users' neighbour overlap, from both versions' vectors.

    Args:
        pairs: family -> ``(new ids, new vectors (N, D), old ids, old vectors (M, D'))``: a user and a Pin family.
        day: the compared day (reported).
        thresholds: sample size, ``k`` and the seed.
    """
    rng = np.random.default_rng(thresholds.seed)
    aligned: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # family -> ids, new, old (common)
    for family, (new_ids, new, old_ids, old) in pairs.items():
        ids, i_new, i_old = np.intersect1d(new_ids, old_ids, assume_unique=True, return_indices=True)
        if len(ids) < 4:
            raise CompatError(f"{family}: only {len(ids)} entities in both versions on {day}; nothing to compare")
        aligned[family] = (ids, new[i_new], old[i_old])
    # Centre each family (its mean direction is shared by all entities and would make any two agree),
    # then one rotation for the model: users and Pins live in one space.
    centred = {f: (n - n.mean(axis=0), o - o.mean(axis=0)) for f, (_, n, o) in aligned.items()}
    halves = {}
    for family, (new, _) in centred.items():
        order = rng.permutation(len(new))
        halves[family] = (order[: len(new) // 2], order[len(new) // 2 :])
    fit_new = np.vstack([centred[f][0][fit] for f, (fit, _) in halves.items()])
    fit_old = np.vstack([centred[f][1][fit] for f, (fit, _) in halves.items()])
    if fit_new.shape[1] != fit_old.shape[1]:
        raise CompatError(
            f"dimensions differ ({fit_new.shape[1]} vs {fit_old.shape[1]}): no rotation maps one onto the other"
        )
    rotation, _ = orthogonal_procrustes(fit_new, fit_old)
    agreements = []
    for family, (_, held) in halves.items():
        new, old = centred[family][0][held], centred[family][1][held]
        mismatched = np.roll(np.arange(len(held)), 1)
        agreements.append(
            FamilyAgreement(
                family=family,
                entities=len(aligned[family][0]),
                held_out=len(held),
                raw=_median_cosine(centred[family][0], centred[family][1]),
                aligned=_median_cosine(new @ rotation, old),
                chance=_median_cosine(new @ rotation, old[mismatched]),
            )
        )
    users = next(f for f in aligned if f.endswith("_user"))
    pins = next(f for f in aligned if f.endswith("_pin"))
    _, user_new, user_old = aligned[users]
    _, pin_new, pin_old = aligned[pins]
    sample = rng.choice(len(user_new), size=min(thresholds.sample_users, len(user_new)), replace=False)
    k = min(thresholds.neighbours_k, len(pin_new))
    top_new = np.argsort(-(user_new[sample] @ pin_new.T), axis=1, kind="stable")[:, :k]  # (S, k)
    top_old = np.argsort(-(user_old[sample] @ pin_old.T), axis=1, kind="stable")[:, :k]
    overlap = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(top_new, top_old, strict=True)]))
    return Geometry(day, agreements, len(sample), len(pin_new), k, overlap, k / len(pin_new))


# --------------------------------------------------------------------------- rankers


@dataclass(frozen=True)
class RankerScore:
    label: str  # e.g. "promoted ranker, v1 embeddings"
    ranker: str  # saved folder
    versions: dict[str, str]  # the embedding versions fed to it
    roc_auc: Estimate
    delta: Estimate  # ROC-AUC minus the promoted ranker on the old embeddings (paired)


def saved_rankers(paths: PlatformPaths, objective: str) -> list[tuple[Path, RankerSpec]]:
    """Every saved ranker of ``objective`` (folder, spec), newest first."""
    found = []
    for spec_file in ranker_dir(paths.models_dir, objective, "*").parent.glob(f"*/{SPEC_FILE}"):
        if spec_file.parent.name.startswith("."):
            continue  # a save in progress
        found.append((spec_file.stat().st_mtime_ns, spec_file.parent, RankerSpec.from_json(spec_file.read_text())))
    return [(d, s) for _, d, s in sorted(found, key=lambda t: (t[0], t[1].name), reverse=True)]


def find_ranker(
    paths: PlatformPaths, objective: str, model: str, version: str, *, registered_only: bool
) -> tuple[Path, RankerSpec] | None:
    """The newest saved ranker whose families of ``model`` were all trained on ``version``.

    A spec that records the versions' config hashes must match the published ones too (a version name
    of another data dir is another space); older specs are matched by version name alone.
    """
    wanted = list(families_of(model).values())
    service = ranker_service_name(objective)
    catalog = Catalog(paths.embeddings_offline_dir)
    published = {f: [m.config_hash for m in catalog.manifests(f, version)][-1:] for f in wanted}
    for directory, spec in saved_rankers(paths, objective):
        if registered_only and spec.feature_service != service:
            continue  # ablation rankers are not what is served
        if not spec.feature_service.startswith(service):
            continue
        if not all(spec.embedding_versions.get(f) == version for f in wanted):
            continue
        hashes = spec.embedding_config_hashes
        if all(f not in hashes or [hashes[f]] == published[f] for f in wanted):
            return directory, spec
    return None


def eval_window(paths: PlatformPaths, eval_days: int, specs: list[RankerSpec]) -> tuple[datetime, datetime]:
    """The last ``eval_days`` days of the log, starting no earlier than any ranker's held-out split."""
    last = log_days(paths.events_dir)[-1]
    start = datetime.combine(last - timedelta(days=eval_days - 1), datetime.min.time(), UTC)
    for spec in specs:
        split = spec.extra.get("split")
        if split:
            start = max(start, datetime.fromisoformat(split))
    return start, datetime.combine(last + timedelta(days=1), datetime.min.time(), UTC)


# --------------------------------------------------------------------------- the gate


@dataclass
class CompatReport:
    objective: str  # the upstream model compared
    new: str
    old: str
    thresholds: CompatThresholds
    geometry: Geometry
    ranker_objective: str = ""
    window: tuple[datetime, datetime] | None = None
    rows: int = 0
    rankers: list[RankerScore] = field(default_factory=list)
    retrained: str | None = None  # folder of a ranker trained on the new version
    verdict: str = ""
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    report_path: Path | None = None

    @property
    def promotable(self) -> bool:
        """``compatible``, or ``needs-retrain`` with a ranker trained on the new version."""
        return self.verdict == COMPATIBLE or (self.verdict == NEEDS_RETRAIN and self.retrained is not None)

    @property
    def name(self) -> str:
        return f"compat_{self.objective}_{self.new}_vs_{self.old}"

    def summary(self) -> str:
        geo = self.geometry
        agree = ", ".join(f"{a.family} {a.aligned:.3f} (chance {a.chance:.3f})" for a in geo.families)
        auc = "; ".join(f"{r.label}: {r.roc_auc.value:.4f} ({r.delta.value:+.4f})" for r in self.rankers)
        return (
            f"{self.objective} {self.new} vs {self.old}: {self.verdict} - aligned agreement {agree}; "
            f"neighbour overlap@{geo.k} {geo.overlap:.3f} (chance {geo.overlap_chance:.3f})"
            + (f"; ROC-AUC {auc}" if auc else "")
        )

    def record(self) -> dict[str, Any]:
        """What the catalog keeps for a promotion (see ``derm.materialization.catalog``)."""
        return {
            "against": self.old,
            "verdict": self.verdict,
            "report": str(self.report_path) if self.report_path else None,
            "retrained_ranker": self.retrained,
            "serve_older_rankers": self.verdict == COMPATIBLE,
            "reasons": self.reasons,
        }


def _verdict(report: CompatReport) -> None:
    t, geo = report.thresholds, report.geometry
    reasons = []
    for agreement in geo.families:
        if agreement.aligned < t.min_aligned_agreement:
            reasons.append(
                f"{agreement.family}: aligned agreement {agreement.aligned:.3f} < {t.min_aligned_agreement} "
                f"(chance {agreement.chance:.3f}): the space lost its entities"
            )
    if geo.neighbour_lift < t.min_neighbour_lift:
        reasons.append(
            f"neighbour lift {geo.neighbour_lift:.3f} < {t.min_neighbour_lift} (overlap@{geo.k} {geo.overlap:.3f}, "
            f"chance {geo.overlap_chance:.3f}): users' nearest Pins are as good as random"
        )
    by_label = {r.label: r for r in report.rankers}
    retrained = next((r for r in report.rankers if r.label.startswith("retrained")), None)
    if retrained is not None and retrained.delta.value < -t.max_retrained_auc_drop:
        reasons.append(
            f"the ranker retrained on {report.new} loses {-retrained.delta.value:.4f} ROC-AUC "
            f"(> {t.max_retrained_auc_drop}) against the promoted one"
        )
    if reasons:
        report.verdict, report.reasons = INCOMPATIBLE, reasons
        return
    swapped = by_label.get(f"promoted ranker, {report.new} embeddings")
    if swapped is not None:
        drop = -swapped.delta.value
        if drop <= t.max_auc_drop:
            report.verdict = COMPATIBLE
            report.reasons = [
                f"the promoted ranker's ROC-AUC on {report.new} changes by {-drop:+.4f} "
                f"(a loss of at most {t.max_auc_drop} is compatible)"
            ]
        else:
            report.verdict = NEEDS_RETRAIN
            report.reasons = [
                f"the promoted ranker loses {drop:.4f} ROC-AUC on {report.new} (> {t.max_auc_drop}) although the "
                "space keeps its structure: train a ranker on the new version"
            ]
        return
    moved = [a for a in geo.families if a.raw < t.min_raw_agreement]
    if moved:
        report.verdict = NEEDS_RETRAIN
        report.reasons = [
            f"no promoted ranker to measure; {a.family} moved (centred cosine before alignment {a.raw:.3f} "
            f"< {t.min_raw_agreement})"
            for a in moved
        ]
    else:
        report.verdict = COMPATIBLE
        report.reasons = [f"no promoted ranker to measure; every family kept its place (>= {t.min_raw_agreement})"]


def _score_rankers(
    report: CompatReport, paths: PlatformPaths, store: Any, objective: str, work_dir: Path, log: Log
) -> None:
    model = report.objective
    model_families = list(families_of(model).values())
    promoted = find_ranker(paths, objective, model, report.old, registered_only=True)
    if promoted is None:
        report.notes.append(
            f"no saved {ranker_service_name(objective)} ranker trained on {report.old}: ROC-AUC not measured"
        )
        return
    old_dir, old_spec = promoted
    retrained = find_ranker(paths, objective, model, report.new, registered_only=False)
    if retrained is not None:
        others = {f: v for f, v in retrained[1].embedding_versions.items() if f not in model_families}
        if any(old_spec.embedding_versions.get(f, v) != v for f, v in others.items()):
            report.notes.append(f"{retrained[0].name} was trained on other versions of other families: not compared")
            retrained = None
    report.window = eval_window(paths, report.thresholds.eval_days, [old_spec] + ([retrained[1]] if retrained else []))
    report.ranker_objective = objective
    old_versions = dict(old_spec.embedding_versions)
    if retrained is not None:  # its other families (the same versions) join the evaluation sets
        old_versions = {**retrained[1].embedding_versions, **old_versions}
    new_versions = {f: report.new if f in model_families else v for f, v in old_versions.items()}
    tables = {}
    for tag, versions in (("old", old_versions), ("new", new_versions)):
        service = ranker_service(store, objective, list(versions), versions)
        path = work_dir / f"{report.name}-{objective}-{tag}.parquet"
        if log:
            log(f"  {objective} ranker: features at {versions} over {report.window[0]:%F} .. {report.window[1]:%F}")
        build_training_set(store, paths, objective, service, report.window, path)
        tables[tag], _ = read_training_set(path)
    old_table, new_table = tables["old"], tables["new"]
    if not np.array_equal(old_table.column("event_id").to_numpy(), new_table.column("event_id").to_numpy()):
        raise CompatError("the two evaluation sets hold different events; cannot pair them")
    labels = label_array(old_table)
    if len(np.unique(labels)) < 2:
        report.notes.append(f"the evaluation days hold one class only ({len(labels)} rows): ROC-AUC not measured")
        return
    columns = {tag: {n: t.column(n) for n in t.column_names} for tag, t in tables.items()}
    old_ranker = load_ranker(old_dir)
    scores = {
        f"promoted ranker, {report.old} embeddings": old_ranker.score(columns["old"]),
        f"promoted ranker, {report.new} embeddings": old_ranker.score(columns["new"]),
    }
    used = {
        f"promoted ranker, {report.old} embeddings": (old_dir, dict(old_spec.embedding_versions)),
        f"promoted ranker, {report.new} embeddings": (
            old_dir,
            {f: report.new if f in model_families else v for f, v in old_spec.embedding_versions.items()},
        ),
    }
    if retrained is not None:
        label = f"retrained ranker ({retrained[0].name}), {report.new} embeddings"
        scores[label] = load_ranker(retrained[0]).score(columns["new"])
        used[label] = (retrained[0], dict(retrained[1].embedding_versions))
        report.retrained = str(retrained[0])
    baseline = f"promoted ranker, {report.old} embeddings"
    estimates, deltas = bootstrap_metrics(
        labels, scores, resamples=report.thresholds.bootstrap, seed=report.thresholds.seed, baseline=baseline
    )
    report.rows = len(labels)
    report.rankers = [
        RankerScore(label, str(used[label][0]), used[label][1], estimates[label]["roc_auc"], deltas[label]["roc_auc"])
        for label in scores
    ]


def compatibility(
    paths: PlatformPaths,
    store: Any,
    model_or_family: str,
    new: str,
    old: str | None = None,
    *,
    thresholds: CompatThresholds | None = None,
    rankers: tuple[str, ...] = ("ctr", "cvr"),
    log: Log = None,
) -> CompatReport:
    """Run the gate on model version ``new`` against ``old`` (default: the promoted version).

    Args:
        paths: platform locations.
        store: the ``feast.FeatureStore`` the rankers' features are read from (point in time).
        model_or_family: ``"ctr"`` / ``"cvr"``, or one of their families (the whole model is compared).
        new: the candidate version.
        old: the version it would replace (default: the model's promoted version).
        thresholds: default: the ``compat:`` section of ``validation/thresholds.yaml``.
        rankers: the ranker objectives measured (each one's promoted ranker, when saved).

    Raises:
        CompatError: unknown model, no promoted version to compare with, nothing in common.
    """
    thresholds = thresholds or CompatThresholds.load()
    model = model_or_family if model_or_family in OBJECTIVES else None
    if model is None:
        try:
            model = objective_of(model_or_family)
        except ValueError as error:
            raise CompatError(str(error)) from error
    families = list(families_of(model).values())
    catalog = Catalog(paths.embeddings_offline_dir)
    state = catalog.read_state()
    if old is None:
        promoted = {state.promoted.get(f) for f in families}
        if len(promoted) != 1 or None in promoted:
            raise CompatError(f"{model}: no single promoted version to compare {new} with ({promoted}); give --against")
        old = promoted.pop()
    if old == new:
        raise CompatError(f"{model} {new} is the version compared against")
    day = common_day(catalog, families, new, old)
    if log:
        log(f"{model} {new} vs {old}: geometry on {day}")
    pairs = {f: (*read_family(catalog, f, new, day), *read_family(catalog, f, old, day)) for f in families}
    report = CompatReport(model, new, old, thresholds, geometry(pairs, day, thresholds))
    work_dir = paths.data_dir / "training_sets" / "compat"
    work_dir.mkdir(parents=True, exist_ok=True)
    for objective in rankers:
        if report.rankers:
            break  # one ranker objective decides; the first with a promoted ranker
        _score_rankers(report, paths, store, objective, work_dir, log)
    _verdict(report)
    return report


# --------------------------------------------------------------------------- report


def _plot(report: CompatReport, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    geo, t = report.geometry, report.thresholds
    names = [a.family for a in geo.families] + [f"overlap@{geo.k}"]
    x = np.arange(len(names))
    raw = [a.raw for a in geo.families] + [np.nan]
    aligned = [a.aligned for a in geo.families] + [geo.overlap]
    chance = [a.chance for a in geo.families] + [geo.overlap_chance]
    ax = axes[0]
    ax.bar(x - 0.27, raw, 0.27, label="before alignment (centred)")
    ax.bar(x, aligned, 0.27, label="after Procrustes / overlap")
    ax.bar(x + 0.27, chance, 0.27, label="chance")
    ax.axhline(t.min_aligned_agreement, color="grey", ls="--", lw=0.8)
    ax.set_xticks(x, names)
    ax.set_ylim(min(-0.1, np.nanmin(raw + chance) - 0.05), 1.05)
    ax.set_title(f"{report.objective} {report.new} vs {report.old}: geometry ({geo.day})", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    if report.rankers:
        y = np.arange(len(report.rankers))
        values = np.array([r.roc_auc.value for r in report.rankers])
        err = np.array(
            [
                [r.roc_auc.value - r.roc_auc.lo for r in report.rankers],
                [r.roc_auc.hi - r.roc_auc.value for r in report.rankers],
            ]
        )
        ax.errorbar(values, y, xerr=err, fmt="o", capsize=4)
        ax.set_yticks(y, [r.label for r in report.rankers], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{report.ranker_objective.upper()} ranker ROC-AUC, {report.rows:,} rows (95% CI)", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no promoted ranker measured", ha="center", va="center")
        ax.set_axis_off()
    fig.suptitle(f"verdict: {report.verdict}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compat_markdown(report: CompatReport, png_name: str | None = None) -> str:
    geo, t = report.geometry, report.thresholds
    lines = [
        f"# Compatibility of {report.objective} {report.new} with {report.old}: **{report.verdict}**",
        "",
        *[f"- {reason}" for reason in report.reasons],
        *(
            [f"- a ranker trained on {report.new} is saved ({report.retrained}): `derm promote` accepts {report.new}"]
            if report.verdict == NEEDS_RETRAIN and report.retrained
            else []
        ),
        "",
        f"## Geometry ({geo.day}, both families; one orthogonal Procrustes rotation fitted on half the entities)",
        "",
        "| family | entities in both | held out | centred cosine before alignment | after alignment | chance |",
        "|---|---|---|---|---|---|",
        *[
            f"| {a.family} | {a.entities:,} | {a.held_out:,} | {a.raw:.3f} | {a.aligned:.3f} | {a.chance:.3f} |"
            for a in geo.families
        ],
        "",
        f"Neighbour overlap@{geo.k} of {geo.users_sampled:,} users' top Pins ({geo.pins:,} Pins): "
        f"{geo.overlap:.3f} (chance {geo.overlap_chance:.3f}, lift {geo.neighbour_lift:.3f}).",
        "",
    ]
    if report.rankers:
        window = report.window
        lines += [
            f"## {report.ranker_objective.upper()} ranker on the latest labelled days"
            f" ({window[0]:%F} .. {window[1] - timedelta(microseconds=1):%F}, {report.rows:,} rows)",
            "",
            "| ranker | embeddings fed | ROC-AUC [95% CI] | vs promoted ranker on old [95% CI] |",
            "|---|---|---|---|",
            *[
                f"| {r.label} | {', '.join(f'{f}={v}' for f, v in sorted(r.versions.items()))} | {r.roc_auc} | "
                f"{r.delta.value:+.4f} [{r.delta.lo:+.4f}, {r.delta.hi:+.4f}] |"
                for r in report.rankers
            ],
            "",
        ]
    lines += [*[f"- {note}" for note in report.notes], ""]
    lines += [
        "Thresholds (`compat:` in validation/thresholds.yaml): " + ", ".join(f"{k}={v}" for k, v in asdict(t).items()),
        "",
    ]
    if png_name:
        lines += [f"![{report.name}]({png_name})", ""]
    return "\n".join(lines)


def write_compat_report(paths: PlatformPaths, report: CompatReport, name: str | None = None) -> Path:
    """``reports/<name>.md`` and ``.png`` (default name ``compat_<model>_<new>_vs_<old>``); returns the markdown."""
    directory = reports_dir(paths)
    name = name or report.name
    png = _plot(report, directory / f"{name}.png")
    markdown = directory / f"{name}.md"
    report.report_path = markdown
    markdown.write_text(compat_markdown(report, png.name))
    (directory / f"{name}.json").write_text(json.dumps(_jsonable(report), indent=2, default=str) + "\n")
    return markdown


def _jsonable(report: CompatReport) -> dict[str, Any]:
    return {
        **report.record(),
        "objective": report.objective,
        "new": report.new,
        "geometry": asdict(report.geometry),
        "rankers": [asdict(r) for r in report.rankers],
        "notes": report.notes,
        "thresholds": asdict(report.thresholds),
    }


__all__ = [
    "COMPATIBLE",
    "INCOMPATIBLE",
    "NEEDS_RETRAIN",
    "VERDICTS",
    "CompatError",
    "CompatReport",
    "CompatThresholds",
    "FamilyAgreement",
    "Geometry",
    "compat_markdown",
    "compatibility",
    "find_ranker",
    "geometry",
    "write_compat_report",
]
