"""Planted upstream embeddings: the synthetic generator's own tastes, published as a DERM version.

A positive control for the paper's ablation (https://arxiv.org/abs/2509.04337, issue 17). The
synthetic generator (:mod:`derm.events.synthetic`) plants what each ablation step needs: interests
that organic engagement shows clearly, a purchase intent that drives conversions and nudges clicks,
churn, drift and a daily taste that does not persist. Whether the *learnt* DERM embeddings carry it is
one question; whether the ablation would find it if they did is another. This module answers the
second: it writes, for every day ``t`` of a log that ``derm generate`` wrote, the generator's own
taste of day ``t`` as the day's embeddings, and passes them through exactly what the refresh does
after its towers (the moving average or overwrite, carry-forward of idle entities, re-normalisation,
atomic snapshots stamped ``t+1 00:00 UTC + publish_delay``, the next-day quality check in the
manifest). Published and ablated like any version, it shows what the ablation finds when the
embeddings hold the planted signal; the gap to the learnt version is what the upstream models miss.

What each family holds (``u`` user, ``p`` Pin; generator factors of the day, see ``_World``):

* ``ctr_user`` / ``ctr_pin``: ``[u.click, u.interest]`` / ``[p.click, p.interest]`` -- what drives
  clicks, ads and organic (purchase intent is left out: the generator makes it too weak in clicks for
  a click model to learn, so it is the CVR families' to carry);
* ``cvr_user`` / ``cvr_pin``: ``[u.click[:K/2], u.intent]`` / ``[p.click[:K/2], p.intent]`` -- what
  drives conversions.

Each is rotated into the upstream's ``dim`` by one fixed orthonormal map per objective (so user x Pin
dot products are the generator's) and L2-normalised, as the towers normalise theirs. Only entities
with an event in the refresh's active window get a row, and only those with an event on day ``t``
get the day's taste; the others keep their last vector, as the refresh does. The entities' tastes are
known exactly, without the sampling noise of a day's events: an upper bound on what any upstream
could learn from the log, not a model.

Example::

    planted = PlantedUpstream(SyntheticConfig.preset("local", start_date=date(2026, 1, 1)))
    manifests = plant_upstream(PlatformPaths.from_env(), planted)  # then `derm publish --all`
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from functools import partial
from pathlib import Path

import numpy as np

from derm.core.files import atomic_write_text
from derm.core.model_versions import ModelVersions
from derm.core.naming import OBJECTIVES, families_of
from derm.core.paths import PlatformPaths
from derm.core.snapshot import SnapshotManifest, file_sha256
from derm.events.schema import event_files
from derm.events.synthetic import SyntheticConfig, daily_worlds, generate_event_log
from derm.training.upstream.config import UpstreamConfig
from derm.training.upstream.refresh import (
    RefreshDay,
    export_family,
    manifest_template,
    record_quality,
    refresh_days,
    window_entity_batches,
)
from derm.training.upstream.train import VERSION_CONFIG_FILE, version_dir

PLANTED_KEY = "planted"  # the key of config.json that marks a planted version (the generator's config under it)
_ROTATION_SEED = 20_250_904  # fixed: the same planted version always writes the same bytes


class PlantedLogMismatch(ValueError):
    """The event log was not written by the generator config the planted version claims."""


@dataclass(frozen=True)
class PlantedUpstream:
    """A planted version: the generator config whose tastes it publishes, and the refresh settings it shares.

    Args:
        synthetic: the config ``derm generate`` wrote the log with (preset, seed, start date, sizes).
        upstream: the upstream config whose aggregation, idle-entity policy, active window, publish delay and
            ``model.dim`` the planted snapshots follow (model and training settings play no part).
    """

    synthetic: SyntheticConfig
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)

    def version_payload(self, objective: str) -> dict:
        generator = {
            key: value.isoformat() if isinstance(value, date) else value
            for key, value in dataclasses.asdict(self.synthetic).items()
        }
        payload = self.upstream.version_payload(objective)
        return {
            "objective": objective,
            "model": {"dim": self.upstream.model.dim},
            "aggregation": payload["aggregation"],
            PLANTED_KEY: generator,
        }

    def config_hash(self, objective: str) -> str:
        canonical = json.dumps(self.version_payload(objective), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @classmethod
    def from_version_payload(cls, payload: dict) -> PlantedUpstream:
        """The planted version a ``config.json`` written by :func:`plant_upstream` stands for."""
        generator = dict(payload[PLANTED_KEY])
        generator["start_date"] = date.fromisoformat(generator["start_date"])
        defaults = SyntheticConfig()
        tuples = {f.name for f in dataclasses.fields(defaults) if isinstance(getattr(defaults, f.name), tuple)}
        synthetic = SyntheticConfig(**{k: tuple(v) if k in tuples else v for k, v in generator.items()})
        base = UpstreamConfig()
        aggregation = {k: v for k, v in payload["aggregation"].items() if v is not None}
        return cls(
            synthetic,
            dataclasses.replace(
                base,
                model=dataclasses.replace(base.model, dim=payload["model"]["dim"]),
                refresh=dataclasses.replace(base.refresh, **aggregation),
            ),
        )

    def with_aggregation(self, aggregation: str, ema_weight: float) -> PlantedUpstream:
        refresh = dataclasses.replace(self.upstream.refresh, aggregation=aggregation, ema_weight=ema_weight)
        return dataclasses.replace(self, upstream=dataclasses.replace(self.upstream, refresh=refresh))


def planted_config(paths: PlatformPaths, objective: str, version: str) -> PlantedUpstream | None:
    """The planted version ``version`` of ``objective`` stands for, or None when it is a trained one."""
    config_file = version_dir(paths.models_dir, objective, version) / VERSION_CONFIG_FILE
    if not config_file.exists():
        return None
    payload = json.loads(config_file.read_text())
    return PlantedUpstream.from_version_payload(payload) if PLANTED_KEY in payload else None


def planted_vectors(world: object, objective: str, entity: str, ids: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """``(n, D)`` unit vectors of the day's planted taste of ``ids`` for one family.

    Args:
        world: the generator's ``_World`` of the day (:func:`derm.events.synthetic.daily_worlds`).
        objective: ``"ctr"`` or ``"cvr"`` (which factors the family holds; module docstring).
        entity: ``"user"`` or ``"pin"``.
        ids: ``(n,)`` entity ids (the generator's indices).
        rotation: ``(D, F)`` orthonormal columns, the objective's map into ``D`` dimensions.
    """
    if objective == "ctr":
        parts = [getattr(world, f"{entity}_factor"), getattr(world, f"{entity}_interest")]
    else:
        factor = getattr(world, f"{entity}_factor")
        parts = [factor[:, : factor.shape[1] // 2], getattr(world, f"{entity}_cvr_factor")]
    taste = np.concatenate([part[ids] for part in parts], axis=1)  # (n, F)
    vectors = taste @ rotation.T  # (n, D): dot products kept
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _rotation(objective: str, dim: int, width: int) -> np.ndarray:
    if dim < width:
        raise ValueError(f"planted {objective} tastes have {width} dimensions; the upstream dim {dim} is smaller")
    rng = np.random.default_rng([_ROTATION_SEED, list(OBJECTIVES).index(objective)])
    q, _ = np.linalg.qr(rng.normal(size=(dim, width)))
    return q  # (D, F)


def check_log_is_generated(paths: PlatformPaths, synthetic: SyntheticConfig) -> None:
    """Raise :class:`PlantedLogMismatch` unless the log under ``paths.events_dir`` is, byte for byte, the one
    ``synthetic`` writes (the tastes are only the log's truth if they made it)."""
    have = {p.relative_to(paths.events_dir).as_posix(): p for p in event_files(paths.events_dir)}
    with tempfile.TemporaryDirectory(dir=paths.events_dir.parent, prefix=".planted-check-") as scratch:
        expected_dir = Path(scratch) / "events"
        expected = {p.relative_to(expected_dir).as_posix(): p for p in generate_event_log(synthetic, expected_dir)}
        for name in sorted(set(have) | set(expected)):
            if name not in have or name not in expected or file_sha256(have[name]) != file_sha256(expected[name]):
                raise PlantedLogMismatch(
                    f"{paths.events_dir / name}: not what `derm generate` writes with {_describe(synthetic)}; "
                    "planted embeddings are the truth of that log only"
                )


def _describe(synthetic: SyntheticConfig) -> str:
    return (
        f"seed {synthetic.seed}, start date {synthetic.start_date}, {synthetic.n_days} days, "
        f"{synthetic.events_per_day} ads impressions a day, {synthetic.n_users} users, {synthetic.n_pins} Pins"
    )


def _planted_batches(
    job: RefreshDay, paths: PlatformPaths, cfg: UpstreamConfig, entity: str, world: object, rotation: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The refresh's own entities of the day, in its batches (:func:`window_entity_batches`), with the day's
    planted tastes as their vectors."""
    for batch in window_entity_batches(job, paths, cfg, entity):
        ids = batch[f"{entity}_id"]
        yield ids, planted_vectors(world, job.objective, entity, ids, rotation)


def plant_upstream(
    paths: PlatformPaths,
    planted: PlantedUpstream,
    objectives: tuple[str, ...] = tuple(OBJECTIVES),
    check_log: bool = True,
) -> dict[str, list[SnapshotManifest]]:
    """Write the planted version's snapshots of every day of the log (days already written are kept).

    Args:
        paths: where the event log is and the snapshots and version configs go.
        planted: the generator config of the log and the refresh settings to follow.
        objectives: ``"ctr"`` and/or ``"cvr"``.
        check_log: regenerate the log and refuse (:class:`PlantedLogMismatch`) when it differs.

    Returns:
        ``{objective: [manifests of every day, user and Pin]}``, ready for the gate and ``derm publish``.
    """
    if check_log:
        check_log_is_generated(paths, planted.synthetic)
    cfg, dim = planted.upstream, planted.upstream.model.dim
    days = refresh_days(paths)  # every calendar day of the log, as the refresh exports them
    # Checked before anything is registered or written: a dim too small for the tastes leaves no version behind.
    rotations = {o: _rotation(o, dim, planted.synthetic.latent_dim * (2 if o == "ctr" else 1)) for o in objectives}
    jobs = {}
    for objective in objectives:
        config_hash = planted.config_hash(objective)
        version = ModelVersions(paths.snapshots_dir).resolve(objective, config_hash)
        config_file = version_dir(paths.models_dir, objective, version) / VERSION_CONFIG_FILE
        if not config_file.exists():
            payload = {"model_version": version, "config_hash": config_hash, **planted.version_payload(objective)}
            atomic_write_text(config_file, json.dumps(payload, indent=2, sort_keys=True) + "\n")
        jobs[objective] = (version, config_hash, rotations[objective])
    out: dict[str, list[SnapshotManifest]] = {objective: [] for objective in objectives}
    worlds = daily_worlds(planted.synthetic)
    for day in days:
        world = next(w for i, w, _, _ in worlds if planted.synthetic.days[i] == day)
        for objective, (version, config_hash, rotation) in jobs.items():
            job = RefreshDay(objective, version, config_hash, day, warm_start=day != days[0])
            # No weights: the generator config is what made the vectors.
            template = manifest_template(job, paths, cfg, weights_sha256=config_hash)
            manifests = [
                export_family(
                    job,
                    paths,
                    cfg,
                    family,
                    partial(_planted_batches, job, paths, cfg, entity, world, rotation),
                    template,
                )
                for entity, family in families_of(objective).items()
            ]
            out[objective].extend(record_quality(job, paths, cfg, manifests))
    return out


__all__ = [
    "PLANTED_KEY",
    "PlantedLogMismatch",
    "PlantedUpstream",
    "check_log_is_generated",
    "plant_upstream",
    "planted_config",
    "planted_vectors",
]
