"""Latest advertiser and category of every Pin (written by ``derm stats``, see derm.materialization.counting_features).

Serving reads them from the online store as the rankers' context features of the
candidate Pins (``derm.serving.service``); a Pin without a row gets ``-1``.

The view is deliberately in no feature service. In a training set the same two values
come from the labelled event itself: ``advertiser_id`` and ``category_id`` are columns of
the entity dataframe (``derm.training.downstream.training_sets.ENTITY_COLUMNS``), which is
the point-in-time truth of that impression. Adding this view to ``ctr_ranker`` /
``cvr_ranker`` would join a second copy under the very same column names. The features
keep those names on purpose: online they *are* the context columns the rankers read,
without a renaming step that could drift.
"""

from datetime import timedelta

from entities import pin_entity
from feast import FeatureView, Field, FileSource
from feast.data_format import ParquetFormat
from feast.types import Int64

from derm.core.naming import PIN_ATTRIBUTES, PIN_ATTRIBUTES_VIEW
from derm.core.paths import PlatformPaths
from derm.materialization.counting_features import stats_path

# A Pin keeps its attributes for 90 days after the last day it was shown: the upstream refresh's
# active window (``active_window_days``), past which the Pin has no upstream features either.
# The view has one row per day a Pin appeared, so a shorter TTL (say the counting views' 7 days)
# would turn the catalogue entry of every Pin that pauses for a week into "unknown".
PIN_ATTRIBUTES_TTL = timedelta(days=90)

pin_attributes_source = FileSource(
    name=f"{PIN_ATTRIBUTES_VIEW}_source",
    path=stats_path(PlatformPaths.from_env().stats_dir, PIN_ATTRIBUTES_VIEW),
    file_format=ParquetFormat(),
    timestamp_field="event_timestamp",
)

pin_attributes_fv = FeatureView(
    name=PIN_ATTRIBUTES_VIEW,
    entities=[pin_entity],
    ttl=PIN_ATTRIBUTES_TTL,
    schema=[Field(name=name, dtype=Int64) for name in PIN_ATTRIBUTES],
    source=pin_attributes_source,
    online=True,
    tags={"kind": "pin_attributes"},
)
