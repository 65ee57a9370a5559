"""The HTTP API over :class:`derm.serving.service.RankingService` (FastAPI; ``derm serve`` runs it with uvicorn).

This module only maps JSON to service calls and back, and errors to statuses; what a
request means (ordering, duplicates, defaults, limits) is the service's.

``POST /rank``
    ``{"user_id": 7, "pin_ids": [1, 2, 3]}`` or ``{"user_id": 7, "k": 100}`` (retrieve the
    candidates first). Reads the user's and the Pins' embeddings, counting features and the
    Pins' advertiser and category from Redis (Feast's format, at the versions the loaded
    rankers were trained on), scores them with the CTR (and CVR) ranker and returns the
    distinct Pins best first, with the embedding versions used. Optional: ``surface``
    (request context, default ``home_feed``), ``sort_by`` (``ctr`` or ``cvr``).
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
  (``user_found: false``). A Pin without a row in the ``pin_attributes`` feature view
  (never in the event log, or not shown for longer than the view's TTL) gets advertiser
  and category ``-1`` as context.
* empty candidate lists, both or neither of ``pin_ids``/``k``, unknown ``surface`` or
  ``sort_by`` -> 422; more than ``max_candidates`` Pins, ``k`` above ``max_k`` or a
  body above ``max_body_bytes`` -> 413; each with a message saying what to change.
* Redis down, unreachable or too slow -> 503 within the reader's connect/read timeouts
  (no retries; after a failure further requests fail fast for a short cooldown).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from derm.events.schema import SURFACES
from derm.serving.embedding_reader import RedisUnavailable
from derm.serving.service import Ranked, RankingService, Retrieved, ServingError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
EntityId = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: EntityId
    pin_ids: list[EntityId] | None = Field(
        default=None, description="Candidate Pins to rank; duplicates are ranked once. Give this or k."
    )
    k: int | None = Field(default=None, ge=1, description="Retrieve this many candidates by ANN first, then rank.")
    surface: str | None = Field(default=None, description=f"Request surface, one of {list(SURFACES)}.")
    sort_by: str | None = Field(default=None, description="Ranker whose score orders the Pins (default: ctr).")


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


def retrieval_info(retrieved: Retrieved) -> RetrievalInfo:
    index = retrieved.index
    return RetrievalInfo(
        family=index.family,
        version=index.version,
        day=index.day.isoformat(),
        k=retrieved.k,
        recall_at_k=index.recall_at_k,
        recall_k=index.recall_k,
        user_found=retrieved.user_found,
    )


def rank_response(ranked: Ranked) -> RankResponse:
    objectives = list(ranked.scores)
    sort_column = objectives.index(ranked.sort_by)
    rows = zip(*(ranked.scores[objective].tolist() for objective in objectives), strict=True)
    items = [
        RankedPin(
            pin_id=pin_id,
            score=row[sort_column],
            scores=dict(zip(objectives, row, strict=True)),
            embedding_found=found,
        )
        for pin_id, found, row in zip(ranked.pin_ids.tolist(), ranked.pin_found.tolist(), rows, strict=True)
    ]
    return RankResponse(
        user_id=ranked.user_id,
        sort_by=ranked.sort_by,
        items=items,
        embedding_versions=ranked.embedding_versions,
        user_missing=ranked.user_missing,
        pins_missing=ranked.pins_missing,
        retrieval=retrieval_info(ranked.retrieved) if ranked.retrieved is not None else None,
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

    @app.post("/rank", response_model=RankResponse)
    def rank(request: RankRequest) -> RankResponse:
        ranked = service.rank(request.user_id, request.pin_ids, request.k, request.surface, request.sort_by)
        return rank_response(ranked)

    @app.post("/retrieve", response_model=RetrieveResponse)
    def retrieve(request: RetrieveRequest) -> RetrieveResponse:
        retrieved = service.retrieve(request.user_id, request.k)
        return RetrieveResponse(
            user_id=request.user_id,
            items=[
                RetrievedPin(pin_id=p, score=s)
                for p, s in zip(retrieved.pin_ids.tolist(), retrieved.scores.tolist(), strict=True)
            ],
            retrieval=retrieval_info(retrieved),
            index=retrieved.index.describe(),
        )

    @app.get("/health")
    def health() -> JSONResponse:
        report = service.health()
        return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)

    app.add_middleware(BodySizeLimit, limit=service.settings.max_body_bytes)
    return app
