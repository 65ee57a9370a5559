"""Online serving: candidate retrieval and ranking with DERM embedding features read from Redis.

Endpoints (FastAPI; ``derm serve`` runs them with uvicorn, see ``cli/serving.py``):

``POST /rank``
    ``{"user_id": 7, "pin_ids": [1, 2, 3]}`` or ``{"user_id": 7, "k": 100}`` (retrieve the
    candidates first). Reads the user's and the Pins' embeddings and counting features
    from Redis (Feast's format, at the versions the loaded rankers were trained on),
    scores them with the CTR (and CVR) ranker and returns the Pins best first, with the
    embedding versions used. Optional: ``surface`` (request context, default
    ``home_feed``), ``sort_by`` (``ctr`` or ``cvr``).
``POST /retrieve``
    ``{"user_id": 7, "k": 50}``: the top-k Pins by approximate nearest neighbours (faiss
    HNSW, inner product) over the promoted Pin embedding version, queried with the user's
    embedding of the same upstream model version. Reports the index's recall@k.
``GET /health``
    Redis reachability, loaded rankers and their versions (and whether the feature
    services have moved on since they were trained), the retrieval index.

Defaults and errors (documented contract):

* an unknown user or Pin, or one whose stored vector is older than its view's TTL, gets
  the default the rankers were trained with: a zero embedding with its family's
  "missing" flag set, and missing (NaN) counting features with their view's flag set.
  ``user_missing`` / ``pins_missing`` in the response say how many defaults were used.
  An unknown user in ``/retrieve`` is answered with the Pin centroid as the query
  (``user_found: false``). A Pin absent from the event log gets advertiser and
  category ``-1`` as context.
* empty candidate lists, both or neither of ``pin_ids``/``k``, unknown ``surface`` or
  ``sort_by`` -> 422; more than ``max_candidates`` Pins, ``k`` above ``max_k`` or a
  body above ``max_body_bytes`` -> 413; each with a message saying what to change.
* Redis down, unreachable or too slow -> 503 within the reader's connect/read timeouts
  (no retries; after a failure further requests fail fast for a short cooldown).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Protocol

import numpy as np
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from feast.value_type import ValueType
from pydantic import BaseModel, ConfigDict, Field, model_validator

from derm.core.naming import EMBEDDING_TTL, feature_name, feature_view_name, ranker_service_name
from derm.events.schema import SURFACES
from derm.materialization.catalog import Catalog
from derm.serving.ann import AnnSettings, PinIndex, PinIndexManager
from derm.serving.embedding_reader import (
    EmbeddingReader,
    FeatureSpec,
    OnlineFeatures,
    RedisHashReader,
    RedisTimeouts,
    RedisUnavailable,
    ViewSpec,
    redis_reader_for,
)

log = logging.getLogger(__name__)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
EntityId = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
UNKNOWN_CONTEXT_ID = -1  # advertiser / category of a Pin the event log never showed


class Ranker(Protocol):
    """What serving needs of a downstream ranker (``derm.training.downstream.ranker.Ranker`` provides it)."""

    @property
    def feature_refs(self) -> list[str]: ...

    @property
    def embedding_versions(self) -> dict[str, str]: ...

    def score(self, frame: Mapping[str, Any]) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------------
# Settings and request context
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServingSettings:
    max_candidates: int = 1000  # Pins per /rank request
    max_k: int = 1000  # candidates retrieved per request
    max_body_bytes: int = 1 << 20
    enforce_ttl: bool = True  # stale vectors are "missing", as in the point-in-time training set
    retrieval_family: str = "ctr_pin"
    default_surface: str = "home_feed"
    redis_timeouts: RedisTimeouts = field(default_factory=RedisTimeouts)
    ann: AnnSettings = field(default_factory=AnnSettings)
    index_check_seconds: float = 1.0


class PinAttributes:
    """Advertiser and category of each Pin (the rankers' context features), from the event log.

    Pins are static in the event log, so the newest row per Pin is its catalogue entry.
    """

    def __init__(self, pin_ids: np.ndarray, advertiser_ids: np.ndarray, category_ids: np.ndarray):
        order = np.argsort(pin_ids, kind="stable")
        self.pin_ids = np.asarray(pin_ids, dtype=np.int64)[order]
        self.advertiser_ids = np.asarray(advertiser_ids, dtype=np.int64)[order]
        self.category_ids = np.asarray(category_ids, dtype=np.int64)[order]

    @classmethod
    def empty(cls) -> PinAttributes:
        nothing = np.empty(0, dtype=np.int64)
        return cls(nothing, nothing, nothing)

    @classmethod
    def from_event_log(cls, events_dir: Path) -> PinAttributes:
        files = sorted(Path(events_dir).glob("date=*/*.parquet"))
        if not files:
            log.warning("no event log under %s: every Pin gets advertiser/category %s", events_dir, UNKNOWN_CONTEXT_ID)
            return cls.empty()
        import duckdb

        table = (
            duckdb.connect()
            .execute(
                """SELECT pin_id, arg_max(advertiser_id, event_timestamp) AS advertiser_id,
                          arg_max(category_id, event_timestamp) AS category_id
                   FROM read_parquet(?) GROUP BY pin_id""",
                [[str(f) for f in files]],
            )
            .fetchnumpy()
        )
        return cls(table["pin_id"], table["advertiser_id"], table["category_id"])

    def lookup(self, pin_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(self.pin_ids) == 0:
            default = np.full(len(pin_ids), UNKNOWN_CONTEXT_ID, dtype=np.int64)
            return default, default.copy()
        position = np.clip(np.searchsorted(self.pin_ids, pin_ids), 0, len(self.pin_ids) - 1)
        known = self.pin_ids[position] == pin_ids
        advertisers = np.where(known, self.advertiser_ids[position], UNKNOWN_CONTEXT_ID)
        categories = np.where(known, self.category_ids[position], UNKNOWN_CONTEXT_ID)
        return advertisers, categories


# ---------------------------------------------------------------------------------------------
# The service (no HTTP): what /rank, /retrieve and /health do
# ---------------------------------------------------------------------------------------------


class ServingError(Exception):
    """A request the service refuses, with the HTTP status and a message for the caller."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Scored:
    pin_ids: np.ndarray
    scores: dict[str, np.ndarray]  # objective -> probabilities
    pin_found: np.ndarray  # every Pin embedding family found
    user_missing: list[str]
    pins_missing: int


@dataclass
class Retrieved:
    pin_ids: np.ndarray
    scores: np.ndarray
    user_found: bool
    index: PinIndex


class RankingService:
    """Reads features from Redis, retrieves with the ANN index and scores with the rankers.

    Args:
        store: a ``feast.FeatureStore`` (registry: view definitions; config: project, Redis).
        rankers: objective (``"ctr"``, ``"cvr"``) -> ranker. Each ranker's ``feature_refs`` pin the
            versions read for it; views shared by several rankers are read once.
        catalog: the published-embeddings catalog, for retrieval (None: no /retrieve).
        pin_attributes: context features of the Pins.
        settings: limits, TTL policy, retrieval family, Redis timeouts.
        redis_reader: the transport (default: the store's online store, with the settings' timeouts).
        clock: "now" for TTL checks and the day-of-week context (default: the UTC wall clock).
    """

    def __init__(
        self,
        store: Any,
        rankers: Mapping[str, Ranker],
        *,
        catalog: Catalog | None = None,
        pin_attributes: PinAttributes | None = None,
        settings: ServingSettings | None = None,
        redis_reader: RedisHashReader | None = None,
        clock: Callable[[], datetime] | None = None,
    ):
        if not rankers:
            raise ValueError("no ranker to serve: train one with the downstream stage or pass --model")
        self.store = store
        self.clock = clock or (lambda: datetime.now(UTC))  # TTL checks and day_of_week; tests pin it
        self.rankers = dict(rankers)
        self.settings = settings or ServingSettings()
        self.redis = redis_reader or redis_reader_for(store, self.settings.redis_timeouts)
        self.pin_attributes = pin_attributes or PinAttributes.empty()
        refs = list(dict.fromkeys(ref for ranker in self.rankers.values() for ref in ranker.feature_refs))
        self.reader = EmbeddingReader.for_features(store, refs, self.redis, enforce_ttl=self.settings.enforce_ttl)
        self._entity_of_ref = {
            view.ref(feature): view.join_key for view in self.reader.views for feature in view.features
        }
        self._vector_refs = {
            view.ref(feature) for view in self.reader.views for feature in view.features if feature.dim
        }
        self.index_manager = (
            PinIndexManager(
                catalog, self.settings.retrieval_family, self.settings.ann, self.settings.index_check_seconds
            )
            if catalog is not None
            else None
        )
        self._query_readers: dict[str, EmbeddingReader] = {}
        self._query_lock = threading.Lock()

    # ----------------------------------------------------------------------------- ranking

    def _frame(
        self, ranker: Ranker, features: OnlineFeatures, user_id: int, pin_ids: np.ndarray, context: dict[str, Any]
    ) -> dict[str, Any]:
        """The columns ``ranker.score`` reads: ids, context, counting features (NaN = missing), embeddings
        (``(B, D)``, NaN rows = missing; the ranker turns them into zeros plus the family's missing flag)."""
        n = len(pin_ids)
        frame: dict[str, Any] = {"user_id": np.full(n, user_id, dtype=np.int64), "pin_id": pin_ids, **context}
        for ref in ranker.feature_refs:
            name = ref.partition(":")[2]
            values, found = features.columns[ref], features.found[ref]
            if ref in self._vector_refs:
                column = values.astype(np.float32, copy=True)
                column[~found] = np.nan
            else:
                column = values.astype(np.float64, copy=True)
                column[~found] = np.nan
            if self._entity_of_ref[ref] == "user_id":
                column = np.broadcast_to(column, (n, *column.shape[1:]))
            frame[name] = column
        return frame

    def model_inputs(
        self,
        user_id: int,
        pin_ids: Sequence[int] | np.ndarray,
        surface: str | None = None,
        now: datetime | None = None,
    ) -> tuple[dict[str, dict[str, Any]], OnlineFeatures]:
        """Per ranker, the frame its ``score`` gets for (user, each Pin); and the features read from Redis."""
        now = now or self.clock()
        pins = np.asarray(pin_ids, dtype=np.int64)
        features = self.reader.read({"user_id": np.array([user_id], dtype=np.int64), "pin_id": pins}, now=now)
        advertisers, categories = self.pin_attributes.lookup(pins)
        context = {
            "advertiser_id": advertisers,
            "category_id": categories,
            "surface": np.full(len(pins), surface or self.settings.default_surface, dtype=object),
            "day_of_week": np.full(len(pins), now.weekday(), dtype=np.int64),
        }
        frames = {
            objective: self._frame(ranker, features, user_id, pins, context)
            for objective, ranker in self.rankers.items()
        }
        return frames, features

    def score(
        self,
        user_id: int,
        pin_ids: Sequence[int] | np.ndarray,
        surface: str | None = None,
        now: datetime | None = None,
    ) -> Scored:
        """Scores of every ranker for (user, each Pin); Pins keep their request order."""
        pins = np.asarray(pin_ids, dtype=np.int64)
        frames, features = self.model_inputs(user_id, pins, surface, now)
        scores = {
            objective: np.asarray(ranker.score(frames[objective]), np.float64)
            for objective, ranker in self.rankers.items()
        }
        pin_found = np.ones(len(pins), dtype=bool)
        user_missing = []
        for ref, found in features.found.items():
            if self._entity_of_ref[ref] == "user_id":
                if not found[0]:
                    user_missing.append(ref)
            elif ref in self._vector_refs:
                pin_found &= found
        return Scored(pins, scores, pin_found, sorted(user_missing), int((~pin_found).sum()))

    # ----------------------------------------------------------------------------- retrieval

    def _index(self) -> PinIndex:
        if self.index_manager is None:
            raise ServingError(503, "retrieval is not configured (no embeddings catalog)")
        index = self.index_manager.current()
        if index is None:
            error = self.index_manager.last_error
            raise ServingError(
                503,
                f"no Pin index: {error}"
                if error
                else f"nothing promoted and online for {self.index_manager.family}: publish and promote a version",
            )
        return index

    def _query_reader(self, index: PinIndex) -> EmbeddingReader:
        """Reader of the user family in the index's embedding space (same model version)."""
        view_name = feature_view_name(index.query_family, index.version)
        with self._query_lock:
            reader = self._query_readers.get(view_name)
            if reader is None:
                view = ViewSpec(
                    name=view_name,
                    join_key="user_id",
                    join_key_type=ValueType.INT64,
                    features=(FeatureSpec(feature_name(index.query_family), ValueType.FLOAT_LIST, index.dim),),
                    ttl=EMBEDDING_TTL,
                )
                try:  # the registry is the authority when it has the view; else the catalog's conventions
                    view = ViewSpec.from_feature_view(
                        self.store.get_feature_view(view_name, allow_registry_cache=False), self.store.config
                    )
                except Exception as error:
                    log.info("view %s not in the registry (%s); using the catalog's naming", view_name, error)
                reader = EmbeddingReader(
                    [view],
                    self.redis,
                    project=self.store.config.project,
                    entity_key_serialization_version=self.store.config.entity_key_serialization_version,
                    enforce_ttl=self.settings.enforce_ttl,
                )
                self._query_readers[view_name] = reader
        return reader

    def retrieve(self, user_id: int, k: int, now: datetime | None = None) -> Retrieved:
        index = self._index()
        reader = self._query_reader(index)
        features = reader.read({"user_id": np.array([user_id], dtype=np.int64)}, now=now or self.clock())
        ref = next(iter(features.columns))
        user_found = bool(features.found[ref][0])
        query = features.columns[ref][0] if user_found else index.centroid
        ids, scores = index.search(query[None, :], k)
        keep = ids[0] >= 0
        return Retrieved(ids[0][keep], scores[0][keep].astype(np.float64), user_found, index)

    # ----------------------------------------------------------------------------- health

    def feature_service_drift(self) -> dict[str, dict[str, str]]:
        """Per ranker: families whose feature service now points at another version than it was trained on."""
        drift: dict[str, dict[str, str]] = {}
        for objective, ranker in self.rankers.items():
            service_name = getattr(getattr(ranker, "spec", None), "feature_service", None) or ranker_service_name(
                objective
            )
            try:
                service = self.store.get_feature_service(service_name, allow_cache=True)
            except Exception:
                continue
            now_serving = {key.removesuffix("_version"): value for key, value in service.tags.items()}
            moved = {
                family: f"{trained} -> {now_serving[family]}"
                for family, trained in ranker.embedding_versions.items()
                if family in now_serving and now_serving[family] != trained
            }
            if moved:
                drift[objective] = moved
        return drift

    def health(self) -> dict[str, Any]:
        redis_ok = self.redis.ping()
        return {
            "status": "ok" if redis_ok else "unavailable",
            "redis": "ok" if redis_ok else f"unreachable at {self.redis.connection_string.split(',', 1)[0]}",
            "models": {
                objective: {"embedding_versions": ranker.embedding_versions, "features": len(ranker.feature_refs)}
                for objective, ranker in self.rankers.items()
            },
            "feature_service_drift": self.feature_service_drift(),
            "retrieval": self.index_manager.describe() if self.index_manager else None,
        }


# ---------------------------------------------------------------------------------------------
# HTTP API
# ---------------------------------------------------------------------------------------------


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: EntityId
    pin_ids: list[EntityId] | None = Field(
        default=None, description="Candidate Pins to rank; duplicates are ranked once. Give this or k."
    )
    k: int | None = Field(default=None, ge=1, description="Retrieve this many candidates by ANN first, then rank.")
    surface: str | None = Field(default=None, description=f"Request surface, one of {list(SURFACES)}.")
    sort_by: str | None = Field(default=None, description="Ranker whose score orders the Pins (default: ctr).")

    @model_validator(mode="after")
    def _candidates_or_k(self) -> RankRequest:
        if self.pin_ids is None and self.k is None:
            raise ValueError("give either pin_ids (candidates to rank) or k (retrieve k candidates, then rank)")
        if self.pin_ids is not None and self.k is not None:
            raise ValueError("give pin_ids or k, not both")
        if self.pin_ids is not None and not self.pin_ids:
            raise ValueError("pin_ids is empty: send at least one candidate Pin id, or k to retrieve candidates")
        if self.surface is not None and self.surface not in SURFACES:
            raise ValueError(f"unknown surface {self.surface!r}: expected one of {list(SURFACES)}")
        return self


class RankedPin(BaseModel):
    pin_id: int
    score: float = Field(description="Probability from the sort_by ranker.")
    scores: dict[str, float] = Field(description="Probability from every loaded ranker.")
    embedding_found: bool = Field(description="False: a Pin embedding was missing and the default zero vector used.")


class RetrievalInfo(BaseModel):
    family: str
    version: str
    day: str
    k: int
    recall_at_k: float = Field(description="Recall of the ANN index against exact search, measured at build.")
    recall_k: int
    user_found: bool


class RankResponse(BaseModel):
    user_id: int
    sort_by: str
    items: list[RankedPin]
    embedding_versions: dict[str, dict[str, str]] = Field(description="Per ranker: family -> version read.")
    user_missing: list[str] = Field(description="User features that were missing (defaults used).")
    pins_missing: int = Field(description="Pins with a missing embedding (defaults used).")
    retrieval: RetrievalInfo | None = None


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: EntityId
    k: int = Field(ge=1, description="Number of Pins to return.")


class RetrievedPin(BaseModel):
    pin_id: int
    score: float = Field(description="Inner product of the user and Pin embeddings.")


class RetrieveResponse(BaseModel):
    user_id: int
    items: list[RetrievedPin]
    retrieval: RetrievalInfo
    index: dict[str, Any]


def _retrieval_info(retrieved: Retrieved, k: int) -> RetrievalInfo:
    index = retrieved.index
    return RetrievalInfo(
        family=index.family,
        version=index.version,
        day=index.day.isoformat(),
        k=k,
        recall_at_k=index.recall_at_k,
        recall_k=index.recall_k,
        user_found=retrieved.user_found,
    )


class BodySizeLimit:
    """Refuse bodies above ``limit`` bytes before they are read (pure ASGI: no per-request overhead)."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.limit:
                response = JSONResponse(
                    {"detail": f"request body of {int(length)} bytes is above the limit of {self.limit} bytes"},
                    status_code=413,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(service: RankingService) -> FastAPI:
    """The HTTP API over a :class:`RankingService`."""
    settings = service.settings
    app = FastAPI(
        title="derm serving",
        summary="Retrieval and ranking with DERM embedding features read from Redis in Feast's format.",
    )
    app.state.service = service

    @app.exception_handler(RedisUnavailable)
    async def _redis_unavailable(_request: Any, error: RedisUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(ServingError)
    async def _refused(_request: Any, error: ServingError) -> JSONResponse:
        return JSONResponse({"detail": error.message}, status_code=error.status)

    def _check_k(k: int) -> None:
        if k > settings.max_k:
            raise HTTPException(413, f"k={k} is above the limit of {settings.max_k} candidates per request")

    @app.post("/rank", response_model=RankResponse)
    def rank(request: RankRequest) -> RankResponse:
        sort_by = request.sort_by or ("ctr" if "ctr" in service.rankers else next(iter(service.rankers)))
        if sort_by not in service.rankers:
            raise HTTPException(422, f"sort_by={sort_by!r}: loaded rankers are {sorted(service.rankers)}")
        retrieval = None
        if request.pin_ids is not None:
            if len(request.pin_ids) > settings.max_candidates:
                raise HTTPException(
                    413,
                    f"{len(request.pin_ids)} candidate Pins is above the limit of {settings.max_candidates} "
                    "per request: split the request",
                )
            pin_ids = np.fromiter(dict.fromkeys(request.pin_ids), dtype=np.int64)
        else:
            assert request.k is not None
            _check_k(request.k)
            retrieved = service.retrieve(request.user_id, request.k)
            retrieval = _retrieval_info(retrieved, request.k)
            pin_ids = retrieved.pin_ids
        scored = service.score(request.user_id, pin_ids, request.surface)
        order = np.argsort(-scored.scores[sort_by], kind="stable")
        objectives = list(scored.scores)
        columns = [scored.scores[objective][order].tolist() for objective in objectives]
        items = [
            RankedPin(
                pin_id=pin_id,
                score=row[objectives.index(sort_by)],
                scores=dict(zip(objectives, row, strict=True)),
                embedding_found=found,
            )
            for pin_id, found, row in zip(
                scored.pin_ids[order].tolist(),
                scored.pin_found[order].tolist(),
                zip(*columns, strict=True),
                strict=True,
            )
        ]
        return RankResponse(
            user_id=request.user_id,
            sort_by=sort_by,
            items=items,
            embedding_versions={objective: ranker.embedding_versions for objective, ranker in service.rankers.items()},
            user_missing=scored.user_missing,
            pins_missing=scored.pins_missing,
            retrieval=retrieval,
        )

    @app.post("/retrieve", response_model=RetrieveResponse)
    def retrieve(request: RetrieveRequest) -> RetrieveResponse:
        _check_k(request.k)
        retrieved = service.retrieve(request.user_id, request.k)
        return RetrieveResponse(
            user_id=request.user_id,
            items=[
                RetrievedPin(pin_id=p, score=s)
                for p, s in zip(retrieved.pin_ids.tolist(), retrieved.scores.tolist(), strict=True)
            ],
            retrieval=_retrieval_info(retrieved, request.k),
            index=retrieved.index.describe(),
        )

    @app.get("/health")
    def health() -> JSONResponse:
        report = service.health()
        return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)

    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    return app


def build_service(
    paths: Any,
    store: Any,
    rankers: Mapping[str, Ranker],
    settings: ServingSettings | None = None,
) -> RankingService:
    """A service over a Feast store (``feast.FeatureStore``) and the catalog and event log under ``paths``."""
    return RankingService(
        store,
        rankers,
        catalog=Catalog(paths.embeddings_offline_dir),
        pin_attributes=PinAttributes.from_event_log(paths.events_dir),
        settings=settings,
    )
