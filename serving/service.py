"""The serving service (no HTTP): rank, retrieve and report health over features read from Redis.

:class:`RankingService` reads the user's and the candidate Pins' features from the
online store (Feast's Redis format, at the versions the loaded rankers were trained
on), retrieves candidates with the ANN index over the promoted Pin embeddings, scores
with the CTR (and CVR) rankers and orders the Pins. :mod:`derm.serving.http_api` maps
HTTP requests onto it; anything else (benchmarks, notebooks) can call it directly.

Contract (the HTTP API documents the same):

* :meth:`RankingService.rank` takes either candidate ``pin_ids`` (duplicates ranked once,
  in first-seen order) or ``k`` (retrieve ``k`` candidates first) and returns the Pins
  best first by the ``sort_by`` ranker (default ``ctr``); equal scores keep the
  candidates' order.
* an unknown user or Pin, or one whose stored value is older than its view's TTL, gets
  the default the rankers were trained with: a zero embedding with its family's
  "missing" flag set, and missing (NaN) counting features with their view's flag set.
* the Pins' advertiser and category (the rankers' context) are read from the
  ``pin_attributes`` feature view in the same Redis round trip as the other Pin
  features; a Pin without a row there gets :data:`UNKNOWN_CONTEXT_ID` (``-1``).
* refusals raise :class:`ServingError` with an HTTP-style status: 422 for a request that
  can never succeed (both or neither of ``pin_ids``/``k``, no candidates, unknown
  ``surface`` or ``sort_by``), 413 for one above a limit (``max_candidates``, ``max_k``).
  Redis down, too slow or answering an error reply raises
  :class:`derm.serving.embedding_reader.RedisUnavailable`; a stored vector with NULL/NaN/inf
  elements raises :class:`CorruptOnlineValue` (502) naming the feature and the entity.
* every :class:`Ranked` names the rankers that scored it (``rankers``: objective -> id) and the
  embedding versions each read; every result carries its stage timings (``timings``).
* version consistency (issue 15): a ranker scores with the embedding versions it was trained on
  (its feature refs). When the catalog promotes another version of one of those families, the
  service answers **409** (clear error, no fallback) naming the ranker, the families and both
  versions, unless the compatibility gate's record of that promotion allows rankers of the older
  version to serve it (``derm compat`` said ``compatible``, or the operator overrode it, recorded):
  train a ranker on the promoted version and restart serving, or ``derm rollback``. A fallback to
  an older ranker is not attempted: it would silently score with weights nobody checked against
  the promoted space. The catalog is re-read when its file changes.

Example::

    service = build_service(paths, FeatureRepo().store(), load_rankers(paths.models_dir), ServingSettings())
    ranked = service.rank(user_id=7, pin_ids=[1, 2, 3])
    ranked.pin_ids, ranked.score          # best first
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
from feast.errors import FeatureViewNotFoundException
from feast.value_type import ValueType

from derm.core.naming import (
    EMBEDDING_TTL,
    PIN_ATTRIBUTES,
    PIN_ATTRIBUTES_VIEW,
    feature_name,
    feature_view_name,
    ranker_service_name,
)
from derm.events.schema import SURFACES
from derm.materialization.catalog import Catalog, CatalogState, ranker_version_skew
from derm.serving.ann import AnnSettings, PinIndex, PinIndexManager
from derm.serving.embedding_reader import (
    EmbeddingReader,
    FeatureSpec,
    OnlineFeatures,
    RedisHashReader,
    RedisTimeouts,
    ViewSpec,
    redis_reader_for,
)

log = logging.getLogger(__name__)

UNKNOWN_CONTEXT_ID = -1  # advertiser / category of a Pin the pin_attributes view has no (live) row of
# The column a ranker with a user-sequence encoder reads (derm.training.downstream.ranker.SEQUENCE_COLUMN):
# the user's engaged Pins before the request, most recent first. Serving takes it from the request.
RECENT_PINS = "recent_pins"
MAX_RECENT_PINS = 1000
PIN_ATTRIBUTE_REFS = tuple(f"{PIN_ATTRIBUTES_VIEW}:{name}" for name in PIN_ATTRIBUTES)


class Ranker(Protocol):
    """What serving needs of a downstream ranker (``derm.training.downstream.ranker.Ranker`` provides it)."""

    @property
    def feature_refs(self) -> list[str]: ...

    @property
    def embedding_versions(self) -> dict[str, str]: ...

    def score(self, frame: Mapping[str, Any]) -> np.ndarray: ...


@dataclass(frozen=True)
class ServingSettings:
    max_candidates: int = 1000  # Pins per /rank request
    max_k: int = 1000  # candidates retrieved per request
    max_body_bytes: int = 1 << 20
    enforce_ttl: bool = True  # stale values are "missing", as in the point-in-time training set
    retrieval_family: str = "ctr_pin"
    default_surface: str = "home_feed"
    redis_timeouts: RedisTimeouts = field(default_factory=RedisTimeouts)
    ann: AnnSettings = field(default_factory=AnnSettings)
    index_check_seconds: float = 1.0
    # Score with the rankers' models traced by TorchScript (same weights, same outputs, checked on the
    # first batch): the profile of a loaded worker is dominated by per-layer Python overhead.
    trace_rankers: bool = True


class ServingError(Exception):
    """A request the service refuses, with the HTTP status and a message for the caller."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class CorruptOnlineValue(ServingError):
    """The online store holds a value no ranker may score (a vector with NULL/NaN/inf elements).

    Answered 502 (the store behind the service gave an unusable answer) instead of scoring
    ``null``; ``feature`` is the ``view:feature`` at fault.
    """

    def __init__(self, feature: str, message: str):
        super().__init__(502, message)
        self.feature = feature


@dataclass
class Scored:
    """Every ranker's scores of (user, each Pin), Pins in the order they were given."""

    pin_ids: np.ndarray
    scores: dict[str, np.ndarray]  # objective -> probabilities
    pin_found: np.ndarray  # every Pin embedding family found
    user_missing: list[str]
    pins_missing: int
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds: redis, model:<objective>


@dataclass
class Retrieved:
    """The ``k`` nearest Pins of a user (fewer when the index is smaller), best first."""

    pin_ids: np.ndarray
    scores: np.ndarray
    user_found: bool
    index: PinIndex
    k: int
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds: redis, ann


@dataclass
class Ranked:
    """The answer of :meth:`RankingService.rank`: distinct candidates, best first by ``sort_by``."""

    user_id: int
    sort_by: str
    pin_ids: np.ndarray  # best first
    scores: dict[str, np.ndarray]  # objective -> probabilities, aligned with pin_ids
    pin_found: np.ndarray  # aligned with pin_ids: every Pin embedding family found
    embedding_versions: dict[str, dict[str, str]]  # objective -> family -> version read
    user_missing: list[str]
    pins_missing: int
    retrieved: Retrieved | None = None  # when the candidates came from retrieval
    rankers: dict[str, str] = field(default_factory=dict)  # objective -> id of the ranker that scored
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds: redis, ann, model:<objective>

    @property
    def score(self) -> np.ndarray:
        """The ``sort_by`` ranker's scores, descending."""
        return self.scores[self.sort_by]


def ranker_id(objective: str, ranker: Ranker) -> str:
    """A name for the ranker a response was scored with: ``<objective>@<digest of its spec>``.

    Two rankers with the same spec (features, versions, normalisation, architecture) get the
    same name; :func:`build_service` callers may pass the saved folder's name instead.
    """
    spec = getattr(ranker, "spec", None)
    text = spec.to_json() if hasattr(spec, "to_json") else repr(sorted(ranker.embedding_versions.items()))
    return f"{objective}@{hashlib.sha256(text.encode()).hexdigest()[:12]}"


class TracedModel:
    """A ranker's ``torch.nn.Module`` run as a TorchScript trace, made on the first batch it sees.

    The trace is frozen (weights folded in as constants) and passed through
    ``torch.jit.optimize_for_inference`` (fused linear layers, no autograd bookkeeping): a forward
    pass of 100 Pins took 0.61 ms of CPU instead of 0.85 ms traced and 1.03 ms eager. Each step is
    checked against the eager model on that batch and on one of another size (``torch.allclose``);
    the first that differs or fails is dropped (optimized -> frozen -> plain trace -> eager).
    Thread-safe; the saved model is untouched.
    """

    def __init__(self, model: Any):
        self.model = model
        self._traced: Any = None
        self._lock = threading.Lock()

    def eval(self) -> TracedModel:
        # Ranker.score calls eval() on every batch: walking the module tree each time cost ~0.2 ms a request.
        if self.model.training:
            self.model.eval()
        return self

    def _trace(self, batch: Mapping[str, Any]) -> Any:
        import torch

        self.model.eval()
        try:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # shape checks turned constants: fixed per model
                traced = torch.jit.trace(self.model, (dict(batch),), strict=False, check_trace=False)
                # Checked on this batch and on one of another size: a trace must not have frozen the batch size.
                longer = {name: torch.cat([values, values[:1]]) for name, values in batch.items()}
                expected = [(b, self.model(dict(b))) for b in (batch, longer)]

                def same(candidate: Any) -> bool:
                    return all(torch.allclose(candidate(dict(b)), out, rtol=1e-5, atol=1e-6) for b, out in expected)

                if not same(traced):
                    log.warning("the traced ranker differs from the eager one; scoring eagerly")
                    return self.model
                for optimize in (True, False):
                    try:
                        candidate = torch.jit.freeze(traced.eval())  # a frozen copy; the trace stays as it is
                        if optimize:
                            candidate = torch.jit.optimize_for_inference(candidate)
                        if same(candidate):
                            return candidate
                    except Exception as error:  # an op a pass cannot handle: one step less
                        log.info("freezing the traced ranker failed (%s)", error)
                return traced
        except Exception as error:  # an architecture tracing cannot follow: stay eager
            log.warning("tracing the ranker failed (%s); scoring eagerly", error)
        return self.model

    def __call__(self, batch: Mapping[str, Any]) -> Any:
        model = self._traced
        if model is None:
            with self._lock:
                if self._traced is None:
                    self._traced = self._trace(batch)
                model = self._traced
        return model(dict(batch))


def traced_ranker(ranker: Ranker) -> Ranker:
    """A shallow copy of ``ranker`` whose ``model`` is a :class:`TracedModel` (the original is untouched).

    A ranker reading ``recent_pins`` scores eagerly: its transformer branches on the padding mask
    (PyTorch's fast path), which a trace would freeze on the first batch.
    """
    model = getattr(ranker, "model", None)
    if model is None or not hasattr(model, "state_dict") or RECENT_PINS in getattr(ranker, "input_columns", ()):
        return ranker
    served = copy.copy(ranker)
    served.model = TracedModel(model)  # type: ignore[attr-defined]
    return served


def distinct_in_order(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """``ids`` as int64 without repeats, each at its first position."""
    values = np.asarray(ids, dtype=np.int64)
    _, first = np.unique(values, return_index=True)
    return values[np.sort(first)]


class RankingService:
    """Reads features from Redis, retrieves with the ANN index and scores with the rankers.

    Args:
        store: a ``feast.FeatureStore`` (registry: view definitions; config: project, Redis).
        rankers: objective (``"ctr"``, ``"cvr"``) -> ranker. Each ranker's ``feature_refs`` pin the
            versions read for it; views shared by several rankers are read once, and the Pins'
            context (view ``pin_attributes``) is read with them.
        catalog: the published-embeddings catalog, for retrieval (None: no /retrieve).
        settings: limits, TTL policy, retrieval family, Redis timeouts.
        redis_reader: the transport (default: the store's online store, with the settings' timeouts).
        clock: "now" for TTL checks and the day-of-week context (default: the UTC wall clock).

    Raises:
        ValueError: no ranker, or the ``pin_attributes`` view is not registered.
    """

    def __init__(
        self,
        store: Any,
        rankers: Mapping[str, Ranker],
        *,
        catalog: Catalog | None = None,
        settings: ServingSettings | None = None,
        redis_reader: RedisHashReader | None = None,
        clock: Callable[[], datetime] | None = None,
        ranker_ids: Mapping[str, str] | None = None,
        index_cache_dir: Any = None,
    ):
        if not rankers:
            raise ValueError("no ranker to serve: train one with the downstream stage or pass --model")
        self.store = store
        self.clock = clock or (lambda: datetime.now(UTC))  # TTL checks and day_of_week; tests pin it
        self.rankers = dict(rankers)
        self.ranker_ids = {objective: ranker_id(objective, ranker) for objective, ranker in self.rankers.items()}
        self.ranker_ids.update(ranker_ids or {})
        self.settings = settings or ServingSettings()
        # What scores: the rankers themselves, or copies whose models run as TorchScript traces.
        self._scorers = {
            objective: traced_ranker(ranker) if self.settings.trace_rankers else ranker
            for objective, ranker in self.rankers.items()
        }
        self._score_takes_memo = {
            objective: "memo" in inspect.signature(ranker.score).parameters
            for objective, ranker in self.rankers.items()
        }
        self.redis = redis_reader or redis_reader_for(store, self.settings.redis_timeouts)
        try:
            store.get_feature_view(PIN_ATTRIBUTES_VIEW)
        except FeatureViewNotFoundException as error:
            raise ValueError(
                f"feature view {PIN_ATTRIBUTES_VIEW!r} is not registered ({error}): the rankers' Pin context "
                "comes from it; run `derm stats`, `derm apply` and `derm materialize`"
            ) from error
        refs = list(dict.fromkeys(ref for ranker in self.rankers.values() for ref in ranker.feature_refs))
        # One reader, one round trip: the Pin attributes share the Pins' Redis hash with their other views.
        self.reader = EmbeddingReader.for_features(
            store, [*refs, *PIN_ATTRIBUTE_REFS], self.redis, enforce_ttl=self.settings.enforce_ttl
        )
        # Rankers with a user-sequence encoder: their frames carry the request's recent_pins.
        self.sequence_rankers = {
            objective
            for objective, ranker in self.rankers.items()
            if RECENT_PINS in getattr(ranker, "input_columns", ())
        }
        self._entity_of_ref = {
            view.ref(feature): view.join_key for view in self.reader.views for feature in view.features
        }
        self._vector_refs = {
            view.ref(feature) for view in self.reader.views for feature in view.features if feature.dim
        }
        self.index_manager = (
            PinIndexManager(
                catalog,
                self.settings.retrieval_family,
                self.settings.ann,
                self.settings.index_check_seconds,
                cache_dir=index_cache_dir,
            )
            if catalog is not None
            else None
        )
        self._query_readers: dict[str, EmbeddingReader] = {}
        self._query_lock = threading.Lock()
        self.catalog = catalog
        self._catalog_seen: tuple[int, CatalogState] | None = None  # (catalog file mtime, state)
        self._online_seen: tuple[float, dict[str, str]] | None = None  # (monotonic time, family -> status)

    # ----------------------------------------------------------------------------- ranking

    def rank(
        self,
        user_id: int,
        pin_ids: Sequence[int] | np.ndarray | None = None,
        k: int | None = None,
        surface: str | None = None,
        sort_by: str | None = None,
        now: datetime | None = None,
        recent_pins: Sequence[int] | np.ndarray | None = None,
    ) -> Ranked:
        """Rank the distinct candidate ``pin_ids`` (or the ``k`` retrieved for the user), best first.

        ``recent_pins``: the user's engaged Pins before the request, most recent first (the input of a
        ranker with a user-sequence encoder; ignored by the others).

        Raises:
            ServingError: 422 for both or neither of ``pin_ids``/``k``, no candidates, an unknown
                ``surface`` or ``sort_by``, no ``recent_pins`` for a sequence ranker; 413 above
                ``max_candidates`` Pins or ``max_k``.
        """
        if pin_ids is None and k is None:
            raise ServingError(422, "give either pin_ids (candidates to rank) or k (retrieve k candidates, then rank)")
        if pin_ids is not None and k is not None:
            raise ServingError(422, "give pin_ids or k, not both")
        if pin_ids is not None and len(pin_ids) == 0:
            raise ServingError(422, "pin_ids is empty: send at least one candidate Pin id, or k to retrieve candidates")
        self._check_surface(surface)
        sort_by = self.resolve_sort_by(sort_by)
        recent = self._check_recent_pins(recent_pins)
        now = now or self.clock()
        retrieved = None
        if pin_ids is not None:
            if len(pin_ids) > self.settings.max_candidates:
                raise ServingError(
                    413,
                    f"{len(pin_ids)} candidate Pins is above the limit of {self.settings.max_candidates} "
                    "per request: split the request",
                )
            candidates = distinct_in_order(pin_ids)
        else:
            assert k is not None
            retrieved = self.retrieve(user_id, k, now)
            candidates = retrieved.pin_ids
        scored = self.score(user_id, candidates, surface, now, recent)
        order = np.argsort(-scored.scores[sort_by], kind="stable")
        timings = dict(scored.timings)
        if retrieved is not None:
            timings["ann"] = retrieved.timings.get("ann", 0.0)
            timings["redis"] = timings.get("redis", 0.0) + retrieved.timings.get("redis", 0.0)
        return Ranked(
            user_id=user_id,
            sort_by=sort_by,
            pin_ids=scored.pin_ids[order],
            scores={objective: scores[order] for objective, scores in scored.scores.items()},
            pin_found=scored.pin_found[order],
            embedding_versions={objective: ranker.embedding_versions for objective, ranker in self.rankers.items()},
            user_missing=scored.user_missing,
            pins_missing=scored.pins_missing,
            retrieved=retrieved,
            rankers=dict(self.ranker_ids),
            timings=timings,
        )

    def warm_up(self) -> None:
        """Score two Pins once so the first request pays no one-off cost (model traces, Redis connection).

        Failures (e.g. Redis not up yet) are logged, not raised: requests will report them.
        """
        try:
            self.score(0, np.arange(2, dtype=np.int64), recent_pins=[] if self.sequence_rankers else None)
        except Exception as error:
            log.warning("warm-up request failed (%s: %s)", type(error).__name__, error)

    def resolve_sort_by(self, sort_by: str | None) -> str:
        """The ranker that orders the Pins: ``sort_by``, else ``ctr`` when loaded, else the first ranker."""
        resolved = sort_by or ("ctr" if "ctr" in self.rankers else next(iter(self.rankers)))
        if resolved not in self.rankers:
            raise ServingError(422, f"sort_by={resolved!r}: loaded rankers are {sorted(self.rankers)}")
        return resolved

    def _missing_recent_pins(self) -> ServingError:
        return ServingError(
            422,
            f"ranker(s) {sorted(self.sequence_rankers)} encode the user's recent engaged Pins: send recent_pins "
            "(Pin ids the user clicked before this request, most recent first; [] for none)",
        )

    def _check_recent_pins(self, recent_pins: Sequence[int] | np.ndarray | None) -> np.ndarray | None:
        """``recent_pins`` as int64 (None stays None); 413 above :data:`MAX_RECENT_PINS`."""
        if recent_pins is None:
            return None
        if len(recent_pins) > MAX_RECENT_PINS:
            raise ServingError(413, f"{len(recent_pins)} recent_pins is above the limit of {MAX_RECENT_PINS}")
        return np.asarray(recent_pins, dtype=np.int64).reshape(-1)

    @staticmethod
    def _check_surface(surface: str | None) -> None:
        if surface is not None and surface not in SURFACES:
            raise ServingError(422, f"unknown surface {surface!r}: expected one of {list(SURFACES)}")

    def _frame(
        self,
        ranker: Ranker,
        features: OnlineFeatures,
        user_id: int,
        pin_ids: np.ndarray,
        context: dict[str, Any],
        shared: dict[str, np.ndarray] | None = None,
    ) -> dict[str, Any]:
        """The columns ``ranker.score`` reads: ids, context, counting features (NaN = missing), embeddings
        (``(B, D)``, NaN rows = missing; the ranker turns them into zeros plus the family's missing flag).

        ``shared``: columns already built for another ranker of the same request (ref -> column, and
        ``user_id``), reused read-only: both rankers usually read the same views, and handing them the
        same column objects lets their transforms share the work (``memo`` of ``Ranker.score``)."""
        n = len(pin_ids)
        shared = {} if shared is None else shared
        users = shared.get("user_id")  # one column for every ranker: their transforms hash it once (memo)
        if users is None:
            users = shared["user_id"] = np.full(n, user_id, dtype=np.int64)
        frame: dict[str, Any] = {"user_id": users, "pin_id": pin_ids, **context}
        for ref in ranker.feature_refs:
            column = shared.get(ref)
            if column is None:
                values, found = features.columns[ref], features.found[ref]
                column = values.astype(np.float32 if ref in self._vector_refs else np.float64, copy=True)
                column[~found] = np.nan
                if self._entity_of_ref[ref] == "user_id":
                    column = np.broadcast_to(column, (n, *column.shape[1:]))
                shared[ref] = column
            frame[ref.partition(":")[2]] = column
        return frame

    @staticmethod
    def pin_attributes(features: OnlineFeatures) -> dict[str, np.ndarray]:
        """``advertiser_id`` / ``category_id`` of the Pins read, ``-1`` where the view has no live row."""
        return {
            name: np.where(features.found[ref], features.columns[ref], UNKNOWN_CONTEXT_ID).astype(np.int64)
            for name, ref in zip(PIN_ATTRIBUTES, PIN_ATTRIBUTE_REFS, strict=True)
        }

    def model_inputs(
        self,
        user_id: int,
        pin_ids: Sequence[int] | np.ndarray,
        surface: str | None = None,
        now: datetime | None = None,
        recent_pins: np.ndarray | None = None,
    ) -> tuple[dict[str, dict[str, Any]], OnlineFeatures]:
        """Per ranker, the frame its ``score`` gets for (user, each Pin); and the features read from Redis.

        A sequence ranker's frame also has ``recent_pins``: the same list (most recent first) on every
        row, in the list form the training set stores it in (``with_user_sequences``)."""
        now = now or self.clock()
        pins = np.asarray(pin_ids, dtype=np.int64)
        features = self.reader.read({"user_id": np.array([user_id], dtype=np.int64), "pin_id": pins}, now=now)
        self._refuse_non_finite_vectors(features, user_id, pins)
        context = {
            **self.pin_attributes(features),
            "surface": np.full(len(pins), surface or self.settings.default_surface, dtype=object),
            "day_of_week": np.full(len(pins), now.weekday(), dtype=np.int64),
        }
        if self.sequence_rankers:
            if recent_pins is None:
                raise self._missing_recent_pins()
            context[RECENT_PINS] = [recent_pins.tolist()] * len(pins)
        shared: dict[str, np.ndarray] = {}
        frames = {
            objective: self._frame(ranker, features, user_id, pins, context, shared)
            for objective, ranker in self.rankers.items()
        }
        return frames, features

    def _refuse_non_finite_vectors(self, features: OnlineFeatures, user_id: int, pins: np.ndarray) -> None:
        """Raise :class:`CorruptOnlineValue` when a stored vector has a NULL (NaN) or infinite element.

        A NaN element would make the ranker's score NaN (``null`` in JSON) without any error;
        a vector is all there or refused, never partly used.
        """
        for ref in self._vector_refs:
            values, found = features.columns[ref], features.found[ref]
            bad = found & ~np.isfinite(values).all(axis=1)
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                entity = self._entity_of_ref[ref]
                entity_id = user_id if entity == "user_id" else int(pins[row])
                elements = int((~np.isfinite(values[row])).sum())
                raise CorruptOnlineValue(
                    ref,
                    f"the online store holds {ref} for {entity}={entity_id} (and {int(bad.sum()) - 1} more) with "
                    f"{elements} NULL/NaN/infinite element(s): not scored; republish that day or retire the version",
                )

    def score(
        self,
        user_id: int,
        pin_ids: Sequence[int] | np.ndarray,
        surface: str | None = None,
        now: datetime | None = None,
        recent_pins: Sequence[int] | np.ndarray | None = None,
    ) -> Scored:
        """Scores of every ranker for (user, each Pin); Pins keep their given order (repeats are scored again)."""
        pins = np.asarray(pin_ids, dtype=np.int64)
        recent = self._check_recent_pins(recent_pins)
        self._refuse_version_skew()
        self._refuse_not_online()
        started = time.perf_counter()
        frames, features = self.model_inputs(user_id, pins, surface, now, recent)
        timings = {"redis": time.perf_counter() - started}
        scores = {}
        memo: dict[Any, Any] = {}  # the rankers' transforms share what their frames share
        for objective, ranker in self._scorers.items():
            started = time.perf_counter()
            if self._score_takes_memo[objective]:
                scores[objective] = np.asarray(ranker.score(frames[objective], memo=memo), np.float64)
            else:
                scores[objective] = np.asarray(ranker.score(frames[objective]), np.float64)
            timings[f"model:{objective}"] = time.perf_counter() - started
            if not np.isfinite(scores[objective]).all():
                raise ServingError(
                    502,
                    f"ranker {self.ranker_ids[objective]} gave a non-finite score for "
                    f"{int((~np.isfinite(scores[objective])).sum())} Pin(s) of user {user_id}: not answered",
                )
        pin_found = np.ones(len(pins), dtype=bool)
        user_missing = []
        for ref, found in features.found.items():
            if self._entity_of_ref[ref] == "user_id":
                if not found[0]:
                    user_missing.append(ref)
            elif ref in self._vector_refs:
                pin_found &= found
        return Scored(pins, scores, pin_found, sorted(user_missing), int((~pin_found).sum()), timings)

    def version_skew(self) -> dict[str, dict[str, tuple[str, str]]]:
        """objective -> family -> (trained, promoted) that no compatibility record allows (see module docstring)."""
        if self.catalog is None:
            return {}
        path = self.catalog.state_path
        stamp = path.stat().st_mtime_ns if path.exists() else 0
        if self._catalog_seen is None or self._catalog_seen[0] != stamp:
            self._catalog_seen = (stamp, self.catalog.read_state())
        state = self._catalog_seen[1]
        skew = {
            objective: ranker_version_skew(state, ranker.embedding_versions)
            for objective, ranker in self.rankers.items()
        }
        return {objective: families for objective, families in skew.items() if families}

    def online_state(self, max_age_s: float = 2.0) -> dict[str, str]:
        """family -> ok / stale / missing / empty: the promoted view in Redis against the catalog.

        Redis' own online watermark (``derm.materialization.online_state``) against the day the catalog
        calls online: a Redis restarted empty has lost its watermarks with its data. Read at most every
        ``max_age_s`` seconds (two small reads), so a request pays for it rarely.
        """
        if self.catalog is None:
            return {}
        now = time.monotonic()
        if self._online_seen is not None and now - self._online_seen[0] < max_age_s:
            return self._online_seen[1]
        import redis

        from derm.materialization.online_state import promoted_online_state, redis_client
        from derm.serving.embedding_reader import RedisUnavailable

        cluster = str(getattr(self.store.config.online_store, "redis_type", "redis")).endswith("redis_cluster")
        try:
            with redis_client(self.redis.connection_string, cluster=cluster) as client:
                statuses = promoted_online_state(self.catalog, client, self.store.config.project)
        except (redis.RedisError, OSError) as error:
            raise RedisUnavailable(f"Redis unreadable while checking what it holds: {error}") from error
        self._online_seen = (now, statuses)
        return statuses

    def _refuse_not_online(self) -> None:
        families = {family for ranker in self.rankers.values() for family in ranker.embedding_versions}
        lacking = {f: status for f, status in self.online_state().items() if status != "ok" and f in families}
        if lacking:
            described = ", ".join(f"{family} {status}" for family, status in sorted(lacking.items()))
            raise ServingError(
                503,
                f"the online store does not hold the promoted embeddings ({described}): "
                "run `derm repair` to re-materialize them from the offline store",
            )

    def _refuse_version_skew(self) -> None:
        skew = self.version_skew()
        if skew:
            objective, families = next(iter(skew.items()))
            moved = ", ".join(f"{f} trained on {t}, promoted {p}" for f, (t, p) in families.items())
            raise ServingError(
                409,
                f"ranker {self.ranker_ids[objective]} does not match the promoted embeddings ({moved}) and no "
                "compatibility report allowed it: train a ranker on the promoted version and restart serving, "
                "or roll the promotion back",
            )

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
        """The ``k`` Pins nearest the user's embedding (the Pin centroid for an unknown user).

        Raises:
            ServingError: 422 for ``k < 1``, 413 above ``max_k``, 503 without a Pin index.
        """
        if k < 1:
            raise ServingError(422, f"k={k}: retrieve at least one candidate")
        if k > self.settings.max_k:
            raise ServingError(413, f"k={k} is above the limit of {self.settings.max_k} candidates per request")
        index = self._index()
        reader = self._query_reader(index)
        started = time.perf_counter()
        features = reader.read({"user_id": np.array([user_id], dtype=np.int64)}, now=now or self.clock())
        ref = next(iter(features.columns))
        user_found = bool(features.found[ref][0])
        query = features.columns[ref][0] if user_found else index.centroid
        if not np.isfinite(query).all():
            raise CorruptOnlineValue(
                ref, f"the online store holds {ref} for user_id={user_id} with NULL/NaN/infinite elements: not searched"
            )
        redis_seconds = time.perf_counter() - started
        started = time.perf_counter()
        ids, scores = index.search(query[None, :], k)
        timings = {"redis": redis_seconds, "ann": time.perf_counter() - started}
        keep = ids[0] >= 0
        return Retrieved(ids[0][keep], scores[0][keep].astype(np.float64), user_found, index, k, timings)

    # ----------------------------------------------------------------------------- health

    def feature_service_drift(self) -> dict[str, dict[str, str]]:
        """Per ranker: families whose feature service now points at another version than it was trained on."""
        drift: dict[str, dict[str, str]] = {}
        for objective, ranker in self.rankers.items():
            service_name = getattr(getattr(ranker, "spec", None), "feature_service", None) or ranker_service_name(
                objective
            )
            try:  # uncached: the SQL registry's cache would show a promotion only after cache_ttl_seconds
                service = self.store.get_feature_service(service_name, allow_cache=False)
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
        online = self.online_state(max_age_s=0.0) if redis_ok else {}
        status = "ok" if redis_ok and all(v == "ok" for v in online.values()) else "degraded"
        return {
            "status": status if redis_ok else "unavailable",
            "online": online,  # promoted family -> ok / stale / missing / empty (derm repair fixes the last three)
            "process": os.getpid(),  # which worker answered (derm serve --workers N)
            "redis": "ok" if redis_ok else f"unreachable at {self.redis.connection_string.split(',', 1)[0]}",
            "models": {
                objective: {
                    "ranker": self.ranker_ids[objective],
                    "embedding_versions": ranker.embedding_versions,
                    "features": len(ranker.feature_refs),
                }
                for objective, ranker in self.rankers.items()
            },
            "feature_service_drift": self.feature_service_drift(),
            "version_skew": {
                objective: {family: {"trained": t, "promoted": p} for family, (t, p) in families.items()}
                for objective, families in self.version_skew().items()
            },
            "retrieval": self.index_manager.describe() if self.index_manager else None,
        }


def build_service(
    paths: Any,
    store: Any,
    rankers: Mapping[str, Ranker],
    settings: ServingSettings | None = None,
    ranker_ids: Mapping[str, str] | None = None,
    index_cache_dir: Any = None,
) -> RankingService:
    """A service over a Feast store (``feast.FeatureStore``) and the embeddings catalog under ``paths``.

    ``index_cache_dir``: where the ANN index of each promoted (version, day) is saved once and
    loaded by every worker process (None: built in memory by each).
    """
    return RankingService(
        store,
        rankers,
        catalog=Catalog(paths.embeddings_offline_dir),
        settings=settings,
        ranker_ids=ranker_ids,
        index_cache_dir=index_cache_dir,
    )
