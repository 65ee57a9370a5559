"""Daily user and Pin counting features (written by ``derm stats``, see derm.materialization.counting_features)."""

from entities import pin_entity, user_entity
from feast import FeatureView, Field, FileSource
from feast.data_format import ParquetFormat
from feast.types import Float64, Int64

from derm.core.naming import COUNTING_TTL, counting_features
from derm.core.paths import PlatformPaths
from derm.materialization.counting_features import stats_path

_stats_dir = PlatformPaths.from_env().stats_dir


def _counting_fields(view: str) -> list[Field]:
    # Every count is an integer; the smoothed click rate is the one float.
    return [Field(name=name, dtype=Float64 if name.endswith("_ctr_7d") else Int64) for name in counting_features(view)]


user_daily_stats_source = FileSource(
    name="user_daily_stats_source",
    path=stats_path(_stats_dir, "user_daily_stats"),
    file_format=ParquetFormat(),
    timestamp_field="event_timestamp",
)

user_daily_stats_fv = FeatureView(
    name="user_daily_stats",
    entities=[user_entity],
    ttl=COUNTING_TTL,
    schema=_counting_fields("user_daily_stats"),
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
    ttl=COUNTING_TTL,
    schema=_counting_fields("pin_daily_stats"),
    source=pin_daily_stats_source,
    online=True,
    tags={"kind": "counting"},
)
