"""Faults of a link or a host, and the state of one direction of a link.

A packet (a TCP segment or a datagram) from host A to host B meets the
faults of A, of the link A-B and of B, combined: latencies and jitters add
up, the lowest bandwidth wins, and probabilities combine as independent
chances (``1 - (1 - p)(1 - q)``).  Random choices come from one generator
per direction of a link, seeded from the network's seed and the two hosts'
names, so that what happens on one link never depends on traffic elsewhere
and the same seed gives the same run.
"""

from __future__ import annotations

import math
import random
from typing import Any

import attrs

from ..._options import non_negative, positive_or_none

__all__ = ["Faults", "LinkState", "combine"]


def _probability(instance: object, attribute: Any, value: object) -> None:
    non_negative(instance, attribute, value)
    assert isinstance(value, int | float)
    if value > 1:
        raise ValueError(f"{attribute.name} must be in 0..1, not {value!r}")


@attrs.frozen(kw_only=True)
class Faults:
    """What a link or a host does to the traffic crossing it.

    Set with :meth:`MemoryNetwork.set_faults`; every field defaults to "no
    fault".  ``loss``, ``duplicate`` and ``reorder`` apply to datagrams
    only: TCP (and a UNIX socket) is reliable and in order, so over TCP only
    latency, jitter and bandwidth show, as delays.

    .. versionadded:: 0.1
    """

    #: Seconds each packet takes to cross, one way.
    latency: float = attrs.field(default=0.0, validator=non_negative)
    #: Up to this many seconds more, drawn at random per packet (a TCP
    #: stream still arrives in order; datagrams may overtake each other).
    jitter: float = attrs.field(default=0.0, validator=non_negative)
    #: Bytes per second each direction carries; None: no limit.  Packets
    #: queue behind each other on the link.
    bandwidth: float | None = attrs.field(default=None, validator=positive_or_none)
    #: The chance that a datagram is lost.
    loss: float = attrs.field(default=0.0, validator=_probability)
    #: The chance that a datagram arrives twice.
    duplicate: float = attrs.field(default=0.0, validator=_probability)
    #: The chance that a datagram is held back ``reorder_delay`` seconds
    #: more, so that datagrams sent after it overtake it.
    reorder: float = attrs.field(default=0.0, validator=_probability)
    #: Seconds a reordered datagram is held back.
    reorder_delay: float = attrs.field(default=0.01, validator=non_negative)


NO_FAULTS = Faults()


def _either(p: float, q: float) -> float:
    return 1.0 - (1.0 - p) * (1.0 - q)


def combine(*parts: Faults) -> Faults:
    """The faults a packet meets crossing every one of ``parts``."""
    result = NO_FAULTS
    for part in parts:
        if part == NO_FAULTS:
            continue
        bandwidths = [b for b in (result.bandwidth, part.bandwidth) if b is not None]
        result = Faults(
            latency=result.latency + part.latency,
            jitter=result.jitter + part.jitter,
            bandwidth=min(bandwidths) if bandwidths else None,
            loss=_either(result.loss, part.loss),
            duplicate=_either(result.duplicate, part.duplicate),
            reorder=_either(result.reorder, part.reorder),
            reorder_delay=max(result.reorder_delay, part.reorder_delay),
        )
    return result


class LinkState:
    """One direction of a link: its random generator and when it is free."""

    __slots__ = ("busy_until", "rng")

    def __init__(self, seed: object, source: str, destination: str) -> None:
        # (A str seed is hashed with SHA-512: the same whatever PYTHONHASHSEED.)
        self.rng = random.Random(f"{seed}|{source}|{destination}")
        #: When the packets already sent have left (bandwidth).
        self.busy_until = -math.inf

    def chance(self, probability: float) -> bool:
        """Draw once; True with ``probability`` (no draw for 0)."""
        return probability > 0 and self.rng.random() < probability

    def arrival(self, faults: Faults, now: float, size: int) -> float:
        """When ``size`` bytes sent now arrive, and occupy the link till then."""
        departs = now
        if faults.bandwidth is not None:
            departs = max(now, self.busy_until) + size / faults.bandwidth
            self.busy_until = departs
        delay = faults.latency
        if faults.jitter:
            delay += self.rng.uniform(0.0, faults.jitter)
        return departs + delay
