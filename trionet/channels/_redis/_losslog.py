"""Warnings that count: what a backplane lost, logged with exact numbers, at
most one line per kind per interval.

A loss is added with :meth:`LossLog.add` the moment it is known.  If the
kind's last line is older than the interval, the line goes out at once;
otherwise the count waits and :meth:`LossLog.run` (a task) writes it when the
interval is over.  Counts are only ever summed, never dropped: every line
names how many were lost since the previous line of its kind and in total,
and :meth:`LossLog.flush` writes what is still waiting when the backplane
stops.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import final

import attrs
import trio

__all__ = ["LossLog"]

#: Details (reasons, publishers) listed in one line; more are summed up.
_DETAILS_LISTED = 5
#: Distinct details kept between two lines; the rest are counted as "others".
_DETAILS_KEPT = 64


@attrs.define
class _Kind:
    what: str
    waiting: int = 0
    details: Counter[str] = attrs.Factory(Counter)
    total: int = 0
    last_line: float = -math.inf


@final
class LossLog:
    """Rate-limited WARNING lines with exact counts, one series per kind."""

    def __init__(self, logger: logging.Logger, subject: str, interval: float) -> None:
        self._logger = logger
        self.subject = subject
        self._interval = interval
        self._kinds: dict[str, _Kind] = {}
        self._due = trio.Event()

    def define(self, kind: str, what: str) -> None:
        """Name a kind of loss: ``what`` follows the count in its lines."""
        self._kinds[kind] = _Kind(what)

    def add(self, kind: str, count: int, detail: str) -> None:
        """``count`` more were lost, for the reason or from the source ``detail``."""
        if count <= 0:
            return
        entry = self._kinds[kind]
        entry.waiting += count
        entry.total += count
        if detail not in entry.details and len(entry.details) >= _DETAILS_KEPT:
            detail = "from others"
        entry.details[detail] += count
        if trio.current_time() >= entry.last_line + self._interval:
            self._write(entry)
        else:
            self._due.set()

    def flush(self) -> None:
        """Write every count still waiting."""
        for entry in self._kinds.values():
            if entry.waiting:
                self._write(entry)

    async def run(self) -> None:
        """Write waiting counts as their intervals end; runs until cancelled."""
        while True:
            await self._due.wait()
            self._due = trio.Event()
            while waiting := [e for e in self._kinds.values() if e.waiting]:
                await trio.sleep_until(
                    min(e.last_line for e in waiting) + self._interval
                )
                now = trio.current_time()
                for entry in waiting:
                    if entry.waiting and now >= entry.last_line + self._interval:
                        self._write(entry)

    def _write(self, entry: _Kind) -> None:
        listed = entry.details.most_common(_DETAILS_LISTED)
        details = ", ".join(f"{n} {detail}" for detail, n in listed)
        if len(entry.details) > _DETAILS_LISTED:
            rest = sum(entry.details.values()) - sum(n for _, n in listed)
            details += f", {rest} more"
        self._logger.warning(
            "%s: %d %s (%s); %d in total",
            self.subject,
            entry.waiting,
            entry.what,
            details,
            entry.total,
        )
        entry.waiting = 0
        entry.details.clear()
        entry.last_line = trio.current_time()
