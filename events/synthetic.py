"""Deterministic synthetic multi-surface event log with planted, drifting signal.

Each user and Pin carries a latent factor that drifts day by day (a stationary
Gaussian random walk). The click probability of an impression rises with the
user-Pin affinity; the conversion probability of a click shares the first half
of that affinity (the cross-objective signal DERM exploits) and adds a
purchase-intent part. Pin factors cluster by category, advertisers have their
own conversion bias, and surfaces shift the click rate, so ids, side features
and context all carry something to learn.

What the paper's ablation steps need is planted on purpose (issue 17):

* purchase intent: the conversion-only factor also nudges clicks, by
  ``intent_click_weight`` -- too weakly for the click model to learn it from
  clicks, strongly enough that the CVR embeddings (learnt from conversions,
  where intent dominates) carry a signal the CTR ranker can use;
* entity churn: users and Pins live ``user_lifetime_days`` / ``pin_lifetime_days``
  on average (geometric lifetimes, start days spread over and before the log),
  so entities come and go and idle entities exist;
* drift: ``drift`` is large enough (cosine of a factor to itself ~0.8 over 9
  days) that stale embeddings lose signal and the moving average's weight matters;
* daily taste noise (what the moving average is for): each day, every user's and
  Pin's click, conversion and interest factors get a fresh perturbation of std
  ``daily_taste_noise`` (relative to the factor's scale) that does not carry over
  to the next day; the persistent factor underneath keeps drifting as above. The
  day's taste is ``(persistent + noise) / sqrt(1 + daily_taste_noise**2)``, so the
  planted signal's total strength (and the click rate) stays put and only its
  split into persistent and transient parts changes. One day's behaviour is then
  a noisy reading of an entity's persistent taste, and averaging days helps
  despite the drift. The ``local`` preset's value is derived, not tuned: for a
  random walk with per-day innovation ``drift**2`` read through noise of variance
  ``r``, the best exponential smoother (the steady-state Kalman filter) keeps
  ``w`` of yesterday's estimate where ``r = drift**2 * w / (1 - w)**2``. With the
  paper's ``w = 0.8`` and ``drift = 0.2`` that is ``r = 0.8``, i.e.
  ``daily_taste_noise = sqrt(0.8) ~ 0.894``: the world for which the paper's
  weight is the optimal one for the latent taste (the walk here is stationary,
  ``sqrt(1 - drift**2) = 0.98`` a day, close enough to a plain random walk). Then
  one day's factor correlates with the next day's at ~0.54, the mean of the last
  three days at ~0.64 (without the noise: 0.98 vs 0.97, the newest day is best;
  the three-day mean already wins above a noise of ~0.19). Only ``local`` has it
  (0 elsewhere: ``tiny``, ``bench`` and ``real`` write what they wrote). Whether the
  embeddings and rankers recover it is what the aggregation ablation measures;
* decoupled data: ``organic_per_ad`` organic engagement events (``is_ad`` false)
  come on top of each ads impression (``events_per_day`` counts ads impressions).
  Users' *interests* (a latent factor of their own, Pins' side clustered by
  category) drive organic engagement fully but ads clicks only by
  ``ads_interest_weight``: the ads impressions the rankers train on show them
  weakly, the organic stream the upstream models also learn from shows them
  clearly -- information the rankers can only get through the embeddings;
* label timing: a conversion happens ``conversion_delay_median_hours`` (median,
  log-normal, ``conversion_delay_sigma``) after its click -- hours to days -- and is
  written to ``conversion_timestamp``; the log is exported with every conversion
  in it, also those after its last day.

Organic engagement, the interest factor, the delays and the daily taste noise
draw from random streams of their own: the ads impressions draw exactly what they
drew before issue 17 (only the small interest term moves their clicks; with
``ads_interest_weight = 0`` and ``organic_per_ad = 0`` they are the same rows). The
daily taste noise moves only who clicks and converts: with ``daily_taste_noise = 0``
every draw is what it was before.

Memory stays bounded: the log is written one day at a time, in chunks of at
most ``chunk_rows`` rows.

Example::

    cfg = SyntheticConfig.preset("tiny")
    generate_event_log(cfg, Path("data/events"))
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from derm.core.files import replace_directory
from derm.events.schema import CANONICAL_SCHEMA, SURFACES


@dataclass(frozen=True)
class SyntheticConfig:
    n_users: int = 3_000
    n_pins: int = 600
    n_advertisers: int = 60
    n_categories: int = 12
    n_days: int = 10
    events_per_day: int = 20_000  # ads impressions (organic engagement comes on top)
    start_date: date = date(2026, 1, 1)
    latent_dim: int = 8  # planted factor size; first half shared by clicks and conversions
    drift: float = 0.2  # per-day innovation of the latent random walk (0 = static)
    daily_taste_noise: float = 0.0  # std of each day's transient taste, not carried over (0 = none; see docstring)
    affinity_scale: float = 1.6  # strength of the planted user-Pin signal
    click_base_logit: float = -2.2
    conversion_base_logit: float = -2.0
    surface_click_bias: tuple[float, ...] = (0.0, 0.35, -0.3)  # per SURFACES entry
    surface_share: tuple[float, ...] = (0.55, 0.25, 0.20)
    intent_click_weight: float = 0.4  # how much the purchase-intent factor moves clicks (0: conversions only)
    user_lifetime_days: float | None = 8.0  # mean active span of a user (None: users never churn)
    pin_lifetime_days: float | None = 15.0  # mean active span of a Pin (None: Pins never churn)
    organic_per_ad: float = 0.5  # organic engagement events on top of each ads impression (0: ads only)
    organic_click_base_logit: float = -1.0  # organic engagement is more frequent than ads clicks
    ads_interest_weight: float = 0.3  # how much the interest factor moves ads clicks (organic: 1)
    conversion_delay_median_hours: float | None = 3.0  # None: no conversion time (known at the event)
    conversion_delay_sigma: float = 1.3  # log-normal spread of the delay (95% within a day, a tail of days)
    chunk_rows: int = 1_000_000  # bounded memory: rows generated and written at once
    seed: int = 7
    # Shapes of real logs (all off by default):
    events_per_day_max: int | None = None  # each day's volume log-uniform in [events_per_day, this]
    empty_day_share: float = 0.0  # share of calendar days with no events at all (no partition is written)
    user_burst_days: int | None = None  # each user is active only on this many consecutive days

    PRESETS = {  # noqa: RUF012 - class-level table of named sizes
        "tiny": dict(n_users=200, n_pins=80, n_advertisers=10, n_categories=5, n_days=6, events_per_day=2_000),
        # sqrt(0.8): the noise for which w = 0.8 is the optimal smoothing weight under drift 0.2 (docstring)
        "local": dict(daily_taste_noise=float(np.sqrt(0.8))),
        "bench": dict(
            n_users=1_000_000,
            n_pins=200_000,
            n_advertisers=5_000,
            n_categories=50,
            n_days=30,
            events_per_day=333_334,
            organic_per_ad=0.0,  # the benchmarks' figures count ads impressions, as before
        ),
        # The shape of a public interaction log converted to the contract: ~1k users active in short
        # bursts, ~2k items, 215 days of 30 to 3,500 events with a few empty days, click rate ~0.55.
        "real": dict(
            n_users=1_000,
            n_pins=1_900,
            n_advertisers=80,
            n_categories=20,
            n_days=215,
            events_per_day=30,
            events_per_day_max=3_500,
            empty_day_share=0.02,
            user_burst_days=5,  # the users' churn; a lifetime on top would leave almost no one active
            user_lifetime_days=None,
            pin_lifetime_days=60.0,
            click_base_logit=0.3,
            organic_per_ad=0.0,  # the real log has no organic stream
            ads_interest_weight=0.0,
        ),
    }

    @classmethod
    def preset(cls, name: str, **overrides: object) -> SyntheticConfig:
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}: expected one of {sorted(cls.PRESETS)}")
        return dataclasses.replace(cls(), **{**cls.PRESETS[name], **overrides})

    @property
    def days(self) -> list[date]:
        return [self.start_date + timedelta(days=i) for i in range(self.n_days)]

    def day_volume(self, rng: np.random.Generator) -> int:
        """Events of one day: fixed, or log-uniform between the bounds; zero on an empty day."""
        if self.empty_day_share and rng.random() < self.empty_day_share:
            return 0
        if self.events_per_day_max is None:
            return self.events_per_day
        low, high = np.log(self.events_per_day), np.log(max(self.events_per_day, self.events_per_day_max))
        return int(np.rint(np.exp(rng.uniform(low, high))))


@dataclass
class _World:
    """Static entity attributes and the current latent state."""

    user_activity: np.ndarray  # (U,) sampling weights
    user_first_day: np.ndarray  # (U,) first day of the user's burst (0 when users are always active)
    user_span: tuple[np.ndarray, np.ndarray]  # (U,), (U,): first and last+1 day a user is active (churn)
    pin_span: tuple[np.ndarray, np.ndarray]  # (P,), (P,): the same for Pins
    user_bias: np.ndarray  # (U,)
    pin_popularity: np.ndarray  # (P,) sampling weights
    pin_bias: np.ndarray  # (P,)
    pin_category: np.ndarray  # (P,)
    pin_advertiser: np.ndarray  # (P,)
    advertiser_cvr_bias: np.ndarray  # (A,)
    user_factor: np.ndarray  # (U, K) click latent
    pin_factor: np.ndarray  # (P, K)
    user_cvr_factor: np.ndarray  # (U, K/2) conversion-only latent
    pin_cvr_factor: np.ndarray  # (P, K/2)
    user_interest: np.ndarray  # (U, K) interests: full weight in organic engagement, weak in ads clicks
    pin_interest: np.ndarray  # (P, K), clustered by category


def _lifetimes(n: int, mean_days: float | None, n_days: int, rng: np.random.Generator):
    """``(first, end)`` active days of ``n`` entities: geometric lifetimes, starts spread before and over the log."""
    if mean_days is None:
        return np.full(n, -(10**6), dtype=np.int64), np.full(n, 10**6, dtype=np.int64)
    life = rng.geometric(1.0 / max(mean_days, 1.0), n).astype(np.int64)
    first = rng.integers(-int(mean_days), n_days, n)
    return first, first + life


def _active(span: tuple[np.ndarray, np.ndarray], day_index: int) -> np.ndarray:
    return (span[0] <= day_index) & (day_index < span[1])


def _init_world(cfg: SyntheticConfig, rng: np.random.Generator) -> _World:
    k = cfg.latent_dim
    # Drawn from their own stream so that turning churn on or off leaves every other draw unchanged.
    churn_rng = np.random.default_rng([cfg.seed, 10**6])
    category_center = rng.normal(size=(cfg.n_categories, k))
    pin_category = rng.integers(0, cfg.n_categories, cfg.n_pins)
    pin_factor = (category_center[pin_category] + rng.normal(size=(cfg.n_pins, k))) / np.sqrt(2 * k)
    interest_rng = np.random.default_rng([cfg.seed, 10**6 + 1])
    interest_center = interest_rng.normal(size=(cfg.n_categories, k))
    pin_interest = (interest_center[pin_category] + interest_rng.normal(size=(cfg.n_pins, k))) / np.sqrt(2 * k)
    return _World(
        user_activity=rng.lognormal(0.0, 1.0, cfg.n_users),
        user_first_day=(
            rng.integers(-cfg.user_burst_days + 1, cfg.n_days, cfg.n_users)
            if cfg.user_burst_days
            else np.zeros(cfg.n_users, dtype=np.int64)
        ),
        user_span=_lifetimes(cfg.n_users, cfg.user_lifetime_days, cfg.n_days, churn_rng),
        pin_span=_lifetimes(cfg.n_pins, cfg.pin_lifetime_days, cfg.n_days, churn_rng),
        user_bias=rng.normal(0.0, 0.3, cfg.n_users),
        pin_popularity=rng.lognormal(0.0, 1.2, cfg.n_pins),
        pin_bias=rng.normal(0.0, 0.3, cfg.n_pins),
        pin_category=pin_category,
        pin_advertiser=rng.integers(0, cfg.n_advertisers, cfg.n_pins),
        advertiser_cvr_bias=rng.normal(0.0, 0.5, cfg.n_advertisers),
        user_factor=rng.normal(size=(cfg.n_users, k)) / np.sqrt(k),
        pin_factor=pin_factor,
        user_cvr_factor=rng.normal(size=(cfg.n_users, k // 2)) / np.sqrt(k),
        pin_cvr_factor=rng.normal(size=(cfg.n_pins, k // 2)) / np.sqrt(k),
        user_interest=interest_rng.normal(size=(cfg.n_users, k)) / np.sqrt(k),
        pin_interest=pin_interest,
    )


def _drift(factor: np.ndarray, drift: float, rng: np.random.Generator) -> np.ndarray:
    # Stationary random walk: the marginal scale stays constant while entities wander.
    return np.sqrt(1.0 - drift**2) * factor + drift * rng.normal(size=factor.shape) * factor.std()


_TASTE_FIELDS = ("user_factor", "pin_factor", "user_cvr_factor", "pin_cvr_factor", "user_interest", "pin_interest")


def day_taste(world: _World, noise: float, rng: np.random.Generator) -> _World:
    """The world as one day's events see it: each taste factor plus a fresh transient of std ``noise``.

    Args:
        world: the persistent state (its factors keep drifting; this returns a copy and changes nothing).
        noise: std of the transient relative to each factor's scale (``daily_taste_noise``); 0 returns ``world``.
        rng: the day's own stream, so that the transient moves no other draw.

    Returns:
        A ``_World`` whose ``(U, K)`` / ``(P, K)`` taste factors are ``(persistent + noise * e) / sqrt(1 + noise**2)``,
        ``e`` standard normal per entity, dimension and day (the same marginal scale as the persistent factor).
    """
    if not noise:
        return world
    norm = np.sqrt(1.0 + noise**2)
    transient = {}
    for name in _TASTE_FIELDS:
        factor = getattr(world, name)
        transient[name] = (factor + noise * rng.normal(size=factor.shape) * factor.std()) / norm
    return dataclasses.replace(world, **transient)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _day_chunks(
    cfg: SyntheticConfig,
    world: _World,
    day_index: int,
    volume: int,
    rng: np.random.Generator,
    extra: np.random.Generator,
) -> Iterator[pa.Table]:
    day_start = datetime.combine(cfg.days[day_index], datetime.min.time(), tzinfo=UTC)
    day_start_us = int(day_start.timestamp() * 1_000_000)
    # Offsets sorted once per day so the log is in time order across chunks.
    offsets_us = np.sort(rng.integers(0, 86_400_000_000, volume))
    activity = world.user_activity
    active = _active(world.user_span, day_index)
    if cfg.user_burst_days:
        active &= (world.user_first_day <= day_index) & (day_index < world.user_first_day + cfg.user_burst_days)
    activity = np.where(active, activity, 0.0) if active.any() else activity
    user_p = activity / activity.sum()
    live_pins = _active(world.pin_span, day_index)
    popularity = np.where(live_pins, world.pin_popularity, 0.0) if live_pins.any() else world.pin_popularity
    pin_p = popularity / popularity.sum()
    half = cfg.latent_dim // 2
    surface_bias = np.asarray(cfg.surface_click_bias)

    def engagement(n: int, is_ad: bool, draws: np.random.Generator) -> dict[str, np.ndarray]:
        """``n`` rows of one stream: who, what, where, clicked, converted (``draws`` in a fixed order)."""
        users = draws.choice(cfg.n_users, size=n, p=user_p)
        pins = draws.choice(cfg.n_pins, size=n, p=pin_p)
        surface = draws.choice(len(SURFACES), size=n, p=np.asarray(cfg.surface_share))
        u, p = world.user_factor[users], world.pin_factor[pins]
        scale = cfg.affinity_scale * np.sqrt(cfg.latent_dim)
        affinity = np.einsum("nk,nk->n", u, p) * scale
        # purchase intent: drives conversions, nudges clicks (see the module docstring)
        intent = np.einsum("nk,nk->n", world.user_cvr_factor[users], world.pin_cvr_factor[pins]) * scale
        # interests: all of organic engagement, a small part of ads clicks
        interest = np.einsum("nk,nk->n", world.user_interest[users], world.pin_interest[pins]) * scale
        click_logit = (
            (cfg.click_base_logit if is_ad else cfg.organic_click_base_logit)
            + affinity
            + (cfg.ads_interest_weight if is_ad else 1.0) * interest
            + cfg.intent_click_weight * intent
            + world.user_bias[users]
            + world.pin_bias[pins]
            + surface_bias[surface]
        )
        clicked = draws.random(n) < _sigmoid(click_logit)
        shared = np.einsum("nk,nk->n", u[:, :half], p[:, :half]) * scale
        advertisers = world.pin_advertiser[pins]
        cvr_logit = cfg.conversion_base_logit + shared + intent + world.advertiser_cvr_bias[advertisers]
        converted = clicked & (draws.random(n) < _sigmoid(cvr_logit))
        return {
            "user_id": users,
            "pin_id": pins,
            "advertiser_id": advertisers,
            "category_id": world.pin_category[pins],
            "surface": surface,
            "clicked": clicked,
            "converted": converted,
            "is_ad": np.full(n, is_ad),
        }

    for start in range(0, volume, cfg.chunk_rows):
        n = min(cfg.chunk_rows, volume - start)
        ads = engagement(n, True, rng)  # the ads impressions draw from ``rng`` as they always did
        ads["event_id"] = np.arange(start, start + n, dtype=np.int64) + day_index * 10**10
        ads["event_us"] = day_start_us + offsets_us[start : start + n]
        # Organic engagement on top, from its own stream, spread over the chunk's time range.
        m = int(np.rint(n * cfg.organic_per_ad))
        organic = engagement(m, False, extra)
        organic["event_id"] = np.arange(start, start + m, dtype=np.int64) + day_index * 10**10 + 5 * 10**9
        organic["event_us"] = extra.integers(ads["event_us"][0], ads["event_us"][-1] + 1, m)
        rows = {k: np.concatenate([ads[k], organic[k]]) for k in ads}
        order = np.lexsort((rows["event_id"], rows["event_us"]))  # time order, within and across chunks
        rows = {k: v[order] for k, v in rows.items()}
        total = n + m
        conversion_us = pa.nulls(total, pa.int64())
        if cfg.conversion_delay_median_hours is not None:  # hours to days after the click
            median_us = cfg.conversion_delay_median_hours * 3_600_000_000
            delay_us = np.exp(np.log(median_us) + cfg.conversion_delay_sigma * extra.normal(size=total))
            conversion_us = pa.array(rows["event_us"] + delay_us.astype(np.int64), pa.int64(), mask=~rows["converted"])
        yield pa.table(
            {
                "event_id": rows["event_id"],
                "event_timestamp": pa.array(rows["event_us"], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
                "user_id": rows["user_id"].astype(np.int64),
                "pin_id": rows["pin_id"].astype(np.int64),
                "advertiser_id": rows["advertiser_id"].astype(np.int64),
                "category_id": rows["category_id"].astype(np.int64),
                "surface": pa.array(np.asarray(SURFACES, dtype=object)[rows["surface"]], pa.string()),
                "clicked": rows["clicked"],
                "converted": rows["converted"],
                "is_ad": rows["is_ad"],
                "conversion_timestamp": conversion_us.cast(pa.timestamp("us", tz="UTC")),
            },
            schema=CANONICAL_SCHEMA,
        )


def daily_worlds(cfg: SyntheticConfig) -> Iterator[tuple[int, _World, np.random.Generator, np.random.Generator]]:
    """The generator's days in order: ``(day index, the world that day's events see, day stream, extra stream)``.

    The persistent factors drift from one day to the next; each day's world adds that day's transient taste
    (``daily_taste_noise``, its own stream) on top, which the next day does not inherit. The two streams are
    the ones the day's events then draw from (:func:`generate_event_log` uses exactly this sequence).
    """
    rng = np.random.default_rng(cfg.seed)
    world = _init_world(cfg, rng)
    for day_index in range(cfg.n_days):
        day_rng = np.random.default_rng([cfg.seed, day_index])
        extra_rng = np.random.default_rng([cfg.seed, day_index, 1])  # interests, organic flags, delays
        taste_rng = np.random.default_rng([cfg.seed, day_index, 2])  # the day's transient taste only
        if day_index:  # a new world each day: a world yielded before stays as it was (keyword order = draw order)
            world = dataclasses.replace(
                world,
                user_factor=_drift(world.user_factor, cfg.drift, day_rng),
                pin_factor=_drift(world.pin_factor, cfg.drift, day_rng),
                user_cvr_factor=_drift(world.user_cvr_factor, cfg.drift, day_rng),
                pin_cvr_factor=_drift(world.pin_cvr_factor, cfg.drift, day_rng),
                user_interest=_drift(world.user_interest, cfg.drift, extra_rng),
                pin_interest=_drift(world.pin_interest, cfg.drift, extra_rng),
            )
        yield day_index, day_taste(world, cfg.daily_taste_noise, taste_rng), day_rng, extra_rng


def generate_event_log(cfg: SyntheticConfig, events_dir: Path, progress: bool = False) -> list[Path]:
    """Write ``cfg.n_days`` day partitions under ``events_dir`` (replacing what is there).

    Args:
        cfg: sizes, signal strengths and seed; the same config writes the same bytes.
        events_dir: target folder; each day goes to ``date=YYYY-MM-DD/part-0.parquet``.
        progress: show a progress bar over days.

    Returns:
        The written files, in day order.
    """
    events_dir = Path(events_dir)
    # Write next to the target and swap in, so a killed run never leaves a half log.
    staging = events_dir.with_name(events_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    files = []
    days = daily_worlds(cfg)
    if progress:
        from rich.progress import track

        days = track(days, total=cfg.n_days, description="generating events")
    for day_index, today, day_rng, extra_rng in days:
        volume = cfg.day_volume(day_rng)
        if volume == 0:  # an empty calendar day has no partition, as in a real export
            continue
        path = staging / f"date={cfg.days[day_index].isoformat()}" / "part-0.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(path, CANONICAL_SCHEMA) as writer:
            for chunk in _day_chunks(cfg, today, day_index, volume, day_rng, extra_rng):
                writer.write_table(chunk)
        files.append(events_dir / path.relative_to(staging))
    replace_directory(staging, events_dir)
    return files
