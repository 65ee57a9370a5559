"""Daily user and Pin counting features (written by ``derm stats``, see materialization.counting_features)."""

from datetime import timedelta

from entities import pin_entity, user_entity
from feast import FeatureView, Field, FileSource
from feast.data_format import ParquetFormat
from feast.types import Float64, Int64

from materialization.counting_features import stats_path
from pipeline.config import PlatformPaths

_stats_dir = PlatformPaths.from_env().stats_dir


def _counting_fields(prefix: str) -> list[Field]:
    return [
        Field(name=f"{prefix}_impressions_1d", dtype=Int64),
        Field(name=f"{prefix}_clicks_1d", dtype=Int64),
        Field(name=f"{prefix}_conversions_1d", dtype=Int64),
        Field(name=f"{prefix}_impressions_7d", dtype=Int64),
        Field(name=f"{prefix}_clicks_7d", dtype=Int64),
        Field(name=f"{prefix}_ctr_7d", dtype=Float64),
    ]


user_daily_stats_source = FileSource(
    name="user_daily_stats_source",
    path=stats_path(_stats_dir, "user_daily_stats"),
    file_format=ParquetFormat(),
    timestamp_field="event_timestamp",
)

user_daily_stats_fv = FeatureView(
    name="user_daily_stats",
    entities=[user_entity],
    ttl=timedelta(days=7),
    schema=_counting_fields("user"),
    source=user_daily_stats_source,
    online=True,
    tags={"kind": "counting"},
)

pin_daily_stats_source = FileSource(
    name="pin_daily_stats_source",
    path=stats_path(_stats_dir, "pin_daily_stats"),
    file_format=ParquetFormat(),
    timestamp_field="event_timestamp",
)

pin_daily_stats_fv = FeatureView(
    name="pin_daily_stats",
    entities=[pin_entity],
    ttl=timedelta(days=7),
    schema=_counting_fields("pin"),
    source=pin_daily_stats_source,
    online=True,
    tags={"kind": "counting"},
)
