"""Former home of the serving code, now split into :mod:`derm.serving.service` and :mod:`derm.serving.http_api`.

Kept only for ``bench/online_read.py`` (``from derm.serving.app import RankingService, create_app``);
delete this module once that import names the two modules above.
"""

from derm.serving.http_api import create_app
from derm.serving.service import RankingService

__all__ = ["RankingService", "create_app"]
