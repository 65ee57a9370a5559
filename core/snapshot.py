"""Embedding snapshot contract between the upstream refresh, the validation gate and publishing.

A snapshot is one (family, model version, day)::

    <snapshots_dir>/<family>/<model_version>/date=YYYY-MM-DD/
        embeddings.parquet   <join_key> int64, event_timestamp timestamp[us, UTC],
                             embedding list<float32> (exactly ``dim`` values),
                             model_version string
        manifest.json        SnapshotManifest

``event_timestamp`` is the moment the snapshot becomes available to consumers:
never earlier than the newest event used to compute it (end of day plus the
publish delay). Families are ``ctr_user``, ``ctr_pin``, ``cvr_user`` and
``cvr_pin``; a model version (``v1``, ``v2``...) is immutable: a change of
architecture, dimension or training config gets a new one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import pyarrow as pa
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from derm.core.naming import FAMILIES, join_key

DATA_FILE = "embeddings.parquet"
MANIFEST_FILE = "manifest.json"


def snapshot_schema(family: str) -> pa.Schema:
    """Arrow schema of a family's ``embeddings.parquet``."""
    return pa.schema(
        [
            pa.field(join_key(family), pa.int64(), nullable=False),
            pa.field("event_timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field("embedding", pa.list_(pa.float32()), nullable=False),
            pa.field("model_version", pa.string(), nullable=False),
        ]
    )


@dataclass(frozen=True)
class SnapshotManifest:
    """What a snapshot claims about itself; validated against its data before publishing."""

    family: str
    model_version: str  # e.g. "v3"; immutable, see derm.core.model_versions
    config_hash: str  # sha256 of the canonical model + training config that defines the version
    weights_sha256: str  # checkpoint of that day's (warm-started) weights
    dim: int
    snapshot_date: date
    event_timestamp: datetime  # availability time, identical to every row's event_timestamp
    data_window_start: datetime  # oldest event used
    data_window_end: datetime  # newest event used (<= event_timestamp)
    row_count: int
    aggregation: str  # "ema" or "overwrite"
    ema_weight: float
    created_at: datetime
    data_file: str = DATA_FILE
    data_sha256: str = ""
    # Upstream quality on the next day's events (derm.training.upstream.refresh.upstream_quality): ROC-AUC and
    # recall@k of user x Pin dot products vs popularity and yesterday's embeddings; None when not measured.
    quality: dict | None = None

    @property
    def entity(self) -> str:
        return FAMILIES[self.family]

    @property
    def join_key(self) -> str:
        return join_key(self.family)

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=_iso, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SnapshotManifest:
        """Parse a manifest, validated against :class:`ManifestSchema` first.

        Raises:
            ManifestError: naming the first key at fault (a missing key, a wrong type, a ``data_file``
                that is not a plain file name inside the snapshot folder, ...).
        """
        try:
            ManifestSchema.model_validate_json(text, strict=True)
        except ValidationError as exc:
            error = exc.errors()[0]
            key = ".".join(str(part) for part in error["loc"]) or "(document)"
            message = _HINTS.get(key, error["msg"]) if error["type"] == "string_pattern_mismatch" else error["msg"]
            got = error.get("input")
            shown = "" if error["type"] == "missing" or isinstance(got, dict) else f" (got {repr(got)[:80]})"
            if key == "family" and error["type"] == "literal_error":
                message, shown = f"unknown family {got!r}: expected one of {sorted(FAMILIES)}", ""
            raise ManifestError(f"key {key!r}: {message}{shown}", key=key) from None
        raw = json.loads(text)
        for name in ("event_timestamp", "data_window_start", "data_window_end", "created_at"):
            raw[name] = datetime.fromisoformat(raw[name])
        raw["snapshot_date"] = date.fromisoformat(raw["snapshot_date"])
        return cls(**raw)


class ManifestError(ValueError):
    """A manifest that breaks the snapshot contract; ``key`` names the key at fault."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


# A plain file name inside the snapshot folder: no separator, no "..", no quote, space or SQL; a Parquet file.
PLAIN_FILE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\.parquet$"
# Model versions become folder names and parts of Feast view names.
_PLAIN_NAME = r"^[A-Za-z0-9_]{1,64}$"
_HASH = r"^[A-Za-z0-9]{0,128}$"
_HINTS = {
    "data_file": "must be a plain file name inside the snapshot folder (letters, digits, '.', '_', '-'; *.parquet)",
    "model_version": "must be a plain name (letters, digits, '_')",
}


class ManifestSchema(BaseModel):
    """The JSON schema of ``manifest.json``, checked on every read (strict types, no unknown keys).

    The dataclass :class:`SnapshotManifest` stays the type the code passes around; this model only
    says what a file may contain, so a manifest written by hand (or by an attacker) cannot smuggle a
    path or SQL into the stages that read it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Literal[tuple(FAMILIES)]  # type: ignore[valid-type]
    model_version: Annotated[StrictStr, Field(pattern=_PLAIN_NAME)]
    config_hash: Annotated[StrictStr, Field(pattern=_HASH)]
    weights_sha256: Annotated[StrictStr, Field(pattern=_HASH)]
    dim: Annotated[StrictInt, Field(gt=0)]
    snapshot_date: date
    event_timestamp: AwareDatetime
    data_window_start: AwareDatetime
    data_window_end: AwareDatetime
    row_count: Annotated[StrictInt, Field(ge=0)]
    aggregation: Literal["ema", "overwrite"]
    ema_weight: Annotated[StrictFloat | StrictInt, Field(ge=0, le=1)]
    created_at: AwareDatetime
    data_file: Annotated[StrictStr, Field(pattern=PLAIN_FILE_NAME)] = DATA_FILE
    data_sha256: Annotated[StrictStr, Field(pattern=_HASH)] = ""
    quality: dict[str, Any] | None = None


def _iso(value: object) -> str:
    if isinstance(value, date | datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {value!r}")


def snapshot_dir(snapshots_dir: Path, family: str, model_version: str, day: date) -> Path:
    return Path(snapshots_dir) / family / model_version / f"date={day.isoformat()}"


def read_manifest(directory: Path) -> SnapshotManifest:
    path = Path(directory) / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: snapshot manifest missing")
    try:
        return SnapshotManifest.from_json(path.read_text())
    except ManifestError as exc:
        raise ManifestError(f"{path}: malformed manifest: {exc}", key=exc.key) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{path}: malformed manifest: {exc}", key="(document)") from exc


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_snapshots(snapshots_dir: Path, family: str | None = None) -> list[Path]:
    """Snapshot folders (those with a manifest), ordered by family, version, day."""
    pattern = f"{family or '*'}/*/date=*/{MANIFEST_FILE}"
    return sorted(p.parent for p in Path(snapshots_dir).glob(pattern))
