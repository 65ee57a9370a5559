"""Model versions: which upstream configuration each ``vN`` stands for, in ``<snapshots_dir>/versions.json``.

The canonical JSON of everything that shapes an upstream model's embeddings
(architecture, dimension, features, training and aggregation config) is hashed;
the registry maps ``{objective: {config_hash: "vN"}}``. A new hash gets the next
version, and a version, once given, never changes: that is what makes a published
(family, version) immutable. Written by the upstream refresh, read by publishing.

Example::

    registry = ModelVersions(paths.snapshots_dir)
    version = registry.resolve("ctr", config_hash)      # registers v<N+1> when new
    registry.version_of("ctr", config_hash)             # the same, or None when unknown
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path

from derm.core.files import atomic_write_text

VERSIONS_FILE = "versions.json"


class ModelVersions:
    """The ``versions.json`` registry under a snapshots folder."""

    def __init__(self, snapshots_dir: Path):
        self.path = Path(snapshots_dir) / VERSIONS_FILE

    def read(self) -> dict[str, dict[str, str]]:
        """``{objective: {config_hash: version}}``; empty when nothing was registered yet."""
        if not self.path.exists():
            return {}
        try:
            return json.loads(self.path.read_text())
        except ValueError as error:
            raise ValueError(f"{self.path}: not a version registry: {error}") from error

    def versions(self, objective: str) -> dict[str, str]:
        return dict(self.read().get(objective, {}))

    def version_of(self, objective: str, config_hash: str) -> str | None:
        return self.versions(objective).get(config_hash)

    def resolve(self, objective: str, config_hash: str) -> str:
        """The version of ``config_hash``, registering ``v<N+1>`` if it is new."""
        # Read-modify-write under an exclusive lock: two refreshes registering new configs at once must not
        # both take v<N+1>.
        with self._locked():
            registry = self.read()
            versions = registry.setdefault(objective, {})
            if config_hash not in versions:
                versions[config_hash] = f"v{1 + max((int(v[1:]) for v in versions.values()), default=0)}"
                atomic_write_text(self.path, json.dumps(registry, indent=2, sort_keys=True) + "\n")
            return versions[config_hash]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(VERSIONS_FILE + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
