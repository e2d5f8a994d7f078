"""A log-linear histogram for latencies: fixed memory, bounded relative error.

How this works
--------------
Values are non-negative integers (``trionet load`` records microseconds).
Every value below ``2 * S`` (``S`` sub-buckets, 64 by default) has a bucket of
its own, so small values are counted exactly.  Above that, the range
``[2**k, 2**(k + 1))`` is split into ``S`` equal buckets of width
``2**(k + 1) / (2 * S)``: a bucket's width is never more than ``1 / S`` of
the smallest value it holds.  A percentile is reported as the middle of the
bucket it falls in, clamped to the smallest and largest value recorded, so it
is within ``1 / (2 * S)`` of the true sample (relative error).

The bucket index of a value ``v`` above ``2 * S`` is found with two integer
operations: ``shift = v.bit_length() - (bits + 1)`` says how many low bits
the bucket ignores, and ``v >> shift`` (between ``S`` and ``2 * S - 1``) says
which sub-bucket it is.  Values above ``max_value`` are counted in the last
bucket; the exact largest value is always kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["LogLinearHistogram"]


class LogLinearHistogram:
    """Counts of non-negative integers in log-linear buckets.

    Memory is fixed when the histogram is made: ``(k + 2) * 2**sub_bucket_bits``
    counters, where ``k`` is the number of doublings between ``2 * S`` and
    ``max_value``.  Percentiles are within :attr:`relative_error` of the
    sample the same rank would pick from a sorted list of every value.

    Args:
        sub_bucket_bits: each doubling of the range is cut into
            ``2**sub_bucket_bits`` buckets (the default 6 gives 64, a relative
            error of 1/128).
        max_value: the largest value counted with the stated error; larger
            values share the last bucket (the exact maximum is still kept).

    .. versionadded:: 0.1
    """

    __slots__ = ("_bits", "_counts", "_sub", "count", "max", "min", "total")

    def __init__(self, *, sub_bucket_bits: int = 6, max_value: int = 2**40) -> None:
        if not 1 <= sub_bucket_bits <= 16:
            raise ValueError(f"sub_bucket_bits must be in 1..16, not {sub_bucket_bits}")
        if max_value < 1:
            raise ValueError(f"max_value must be at least 1, not {max_value}")
        self._bits = sub_bucket_bits
        self._sub = 1 << sub_bucket_bits
        top_shift = max(0, max_value.bit_length() - (sub_bucket_bits + 1))
        self._counts = [0] * ((top_shift + 2) * self._sub)
        #: How many values were recorded.
        self.count = 0
        #: The sum of every recorded value.
        self.total = 0
        #: The smallest value recorded (None while empty).
        self.min: int | None = None
        #: The largest value recorded (None while empty).
        self.max: int | None = None

    @property
    def relative_error(self) -> float:
        """The largest relative error of a percentile: ``1 / (2 * S)``."""
        return 1 / (2 * self._sub)

    @property
    def bucket_count(self) -> int:
        """How many counters the histogram holds (fixed at creation)."""
        return len(self._counts)

    def _index(self, value: int) -> int:
        shift = value.bit_length() - (self._bits + 1)
        if shift <= 0:
            return value
        index = (shift << self._bits) + (value >> shift)
        return min(index, len(self._counts) - 1)

    def _bounds(self, index: int) -> tuple[int, int]:
        """The smallest and largest value bucket ``index`` holds."""
        if index < 2 * self._sub:
            return index, index
        shift = (index >> self._bits) - 1
        lower = (index - (shift << self._bits)) << shift
        return lower, lower + (1 << shift) - 1

    def record(self, value: int, count: int = 1) -> None:
        """Count ``value`` (a non-negative integer) ``count`` times."""
        if value < 0:
            raise ValueError(f"values must be >= 0, not {value}")
        if count < 1:
            raise ValueError(f"count must be >= 1, not {count}")
        self._counts[self._index(value)] += count
        self.count += count
        self.total += value * count
        if self.min is None or value < self.min:
            self.min = value
        if self.max is None or value > self.max:
            self.max = value

    def record_all(self, values: Iterable[int]) -> None:
        """Count every value of ``values``."""
        for value in values:
            self.record(value)

    def merge(self, other: LogLinearHistogram) -> None:
        """Add every count of ``other`` (made with the same parameters)."""
        if other._bits != self._bits or len(other._counts) != len(self._counts):
            raise ValueError("can only merge histograms made with the same parameters")
        for index, n in enumerate(other._counts):
            if n:
                self._counts[index] += n
        self.count += other.count
        self.total += other.total
        if other.min is not None and (self.min is None or other.min < self.min):
            self.min = other.min
        if other.max is not None and (self.max is None or other.max > self.max):
            self.max = other.max

    @property
    def mean(self) -> float | None:
        """The exact mean of the recorded values (None while empty)."""
        return self.total / self.count if self.count else None

    def percentile(self, percent: float) -> float | None:
        """The value below which ``percent`` percent of the recorded values lie.

        Picks the value of rank ``max(1, ceil(percent / 100 * count))`` in
        sorted order, within :attr:`relative_error` of it.  None while empty.

        Raises:
            ValueError: ``percent`` is not between 0 and 100.
        """
        if not 0 <= percent <= 100:
            raise ValueError(f"percent must be in 0..100, not {percent}")
        if self.count == 0:
            return None
        assert self.min is not None and self.max is not None
        rank = max(1, math.ceil(percent / 100 * self.count))
        seen = 0
        for index, n in enumerate(self._counts):
            seen += n
            if seen >= rank:
                lower, upper = self._bounds(index)
                middle = (lower + upper) / 2
                return float(min(max(middle, self.min), self.max))
        return float(self.max)  # pragma: no cover - ranks never exceed count
