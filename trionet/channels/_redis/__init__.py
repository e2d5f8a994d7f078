"""The Redis backplane: a stream per prefix, a client of its own.

``_url`` checks URLs, ``_resp`` speaks RESP2 and ``_entries`` the stream
entries (all sans-IO), ``_outbox`` holds what a publisher has not seen
acknowledged, ``_link`` is one connection to Redis, ``_losslog`` writes the
warnings about losses, and ``_backplane`` puts them together.
"""

from ._backplane import BackplaneStatistics as BackplaneStatistics
from ._backplane import RedisBackplane as RedisBackplane

__all__ = ["BackplaneStatistics", "RedisBackplane"]
