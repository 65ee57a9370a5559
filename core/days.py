"""Days in UTC: the unit of the event log's partitions, of the daily refresh and of the counting features."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta


def day_start(day: date) -> datetime:
    """``day 00:00 UTC``; day ``t`` covers ``[day_start(t), day_start(t+1))``."""
    return datetime.combine(day, time.min, tzinfo=UTC)


def day_end(day: date) -> datetime:
    """``t+1 00:00 UTC``: the first moment everything of day ``t`` is known."""
    return day_start(day + timedelta(days=1))
