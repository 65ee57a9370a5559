"""What is published: the single source of truth the Feast definitions are generated from.

Published embeddings live in the offline store, one folder per (family, version, day)::

    <offline_dir>/embeddings/<family>/<version>/date=YYYY-MM-DD/
        data.parquet    <join_key>, event_timestamp, <family>_emb list<float32>, model_version
        manifest.json   the snapshot's manifest, as validated
    <offline_dir>/embeddings/catalog.json
        {"promoted": {family: version}, "history": {family: [earlier promoted versions]},
         "retired": {family: [versions]}, "online": {family: {version: newest day fully in Redis}},
         "accepted": {family: {version: {day: {"reason", "gate", "data_docs", "accepted_at"}}}},
         "overrides": [{"action", "families", "version", "reason", "by", "at"}],
         "compat": {objective: {new version: {"against", "verdict", "report", "serve_older_rankers", "at", ...}}},
         "pending": null | {"action", "families", "from", "to", "views", "at"},
         "last_change": null | the last pending record completed}

``overrides`` records every promotion, rollback or retirement that moved one family of a model alone
(``--family-only``) or promoted past the compatibility gate's verdict, with who, when and why.
``compat`` keeps the gate's verdict each promoted model version got against the version it replaced;
serving lets a ranker trained on the older version score the newer one only when that record says so
(:func:`ranker_version_skew`). ``pending`` is set while a catalog change waits for its ``feast apply``:
the next promote, rollback or retire finishes it first instead of repeating it. ``last_change`` is the
last change completed (its ``pending`` record): a rollback retried with the version it rolled back from
(``rollback(..., from_version=...)``) finds it there and does not go back a second version.

``accepted`` records the days published by ``derm accept`` although the gate refused them: the
operator's reason and the gate's one-line summary. Catalogs written before it existed lack the key
and read as "nothing accepted".

A day folder appears only by an atomic rename, so every folder here is complete.
``feature_repo/embedding_views.py`` turns this catalog into one Feast feature view
per live (family, version) and into the feature services, which is why
``feast apply`` always matches the stores.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from derm.core.files import atomic_write_text
from derm.core.naming import FAMILIES, feature_view_name, objective_of
from derm.core.snapshot import MANIFEST_FILE, SnapshotManifest, read_manifest

OFFLINE_DATA_FILE = "data.parquet"
CATALOG_FILE = "catalog.json"


@dataclass(frozen=True)
class PublishedVersion:
    family: str
    version: str
    dim: int
    days: tuple[date, ...]
    path: Path  # folder the Feast FileSource reads

    @property
    def feature_view(self) -> str:
        return feature_view_name(self.family, self.version)


@dataclass
class CatalogState:
    promoted: dict[str, str] = field(default_factory=dict)
    history: dict[str, list[str]] = field(default_factory=dict)
    retired: dict[str, list[str]] = field(default_factory=dict)
    online: dict[str, dict[str, str]] = field(default_factory=dict)
    # family -> version -> ISO day -> {"reason", "gate", "data_docs", "accepted_at"}
    accepted: dict[str, dict[str, dict[str, dict[str, str]]]] = field(default_factory=dict)
    overrides: list[dict[str, Any]] = field(default_factory=list)
    # objective -> new version -> the compatibility gate's record (see the module docstring)
    compat: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    pending: dict[str, Any] | None = None
    last_change: dict[str, Any] | None = None

    def accepted_days(self, family: str, version: str) -> dict[str, dict[str, str]]:
        """The days of (family, version) published despite the gate, by ISO day."""
        return self.accepted.get(family, {}).get(version, {})


class Catalog:
    """Read and update what is published under ``<offline_dir>/embeddings``."""

    def __init__(self, embeddings_dir: Path):
        self.root = Path(embeddings_dir)

    @property
    def state_path(self) -> Path:
        return self.root / CATALOG_FILE

    def partition_dir(self, family: str, version: str, day: date) -> Path:
        return self.root / family / version / f"date={day.isoformat()}"

    def staging_dir(self, family: str, version: str, day: date) -> Path:
        # Outside the family folders, so a Feast source never reads a half-written day.
        return self.root / ".staging" / f"{family}-{version}-{day.isoformat()}-{os.getpid()}"

    def read_state(self) -> CatalogState:
        if not self.state_path.exists():
            return CatalogState()
        return CatalogState(**json.loads(self.state_path.read_text()))

    def write_state(self, state: CatalogState) -> None:
        # Readers see the old or the new catalog, never half of one.
        atomic_write_text(self.state_path, json.dumps(state.__dict__, indent=2, sort_keys=True) + "\n")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialize publishers: two concurrent promotes must not interleave their catalog updates."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as lock:  # "a": taking the lock must not touch the file
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def manifests(self, family: str | None = None, version: str | None = None) -> list[SnapshotManifest]:
        pattern = f"{family or '*'}/{version or '*'}/date=*/{MANIFEST_FILE}"
        return [read_manifest(p.parent) for p in sorted(self.root.glob(pattern))]

    def published(self, family: str, version: str, day: date) -> SnapshotManifest | None:
        directory = self.partition_dir(family, version, day)
        return read_manifest(directory) if (directory / MANIFEST_FILE).exists() else None

    def versions(self, include_retired: bool = False) -> list[PublishedVersion]:
        """Every published (family, version), oldest version first, retired ones left out by default."""
        state = self.read_state()
        grouped: dict[tuple[str, str], list[SnapshotManifest]] = {}
        for manifest in self.manifests():
            grouped.setdefault((manifest.family, manifest.model_version), []).append(manifest)
        result = []
        for (family, version), manifests in sorted(grouped.items(), key=lambda kv: (kv[0][0], _version_key(kv[0][1]))):
            if family not in FAMILIES:
                continue
            if not include_retired and version in state.retired.get(family, []):
                continue
            result.append(
                PublishedVersion(
                    family=family,
                    version=version,
                    dim=manifests[-1].dim,
                    days=tuple(m.snapshot_date for m in manifests),
                    path=self.root / family / version,
                )
            )
        return result


def ranker_version_skew(state: CatalogState, trained: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Families a ranker was trained on at another version than the promoted one, not allowed by a compat report.

    Args:
        state: the catalog.
        trained: the ranker's family -> version (its spec's ``embedding_versions``).

    Returns:
        family -> (trained version, promoted version) for every family that must not be scored: empty when
        the ranker matches the promoted versions, or when the gate's record of the promoted version (against
        the trained one) said older rankers may serve it (verdict ``compatible``, or an override recorded).
    """
    skew = {}
    for family, version in trained.items():
        promoted = state.promoted.get(family)
        if promoted is None or promoted == version:
            continue
        record = state.compat.get(objective_of(family), {}).get(promoted, {})
        if not (record.get("against") == version and record.get("serve_older_rankers")):
            skew[family] = (version, promoted)
    return skew


def _version_key(version: str) -> tuple[int, str]:
    digits = version.lstrip("v")
    return (int(digits), version) if digits.isdigit() else (1 << 30, version)
