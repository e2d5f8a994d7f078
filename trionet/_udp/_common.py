"""What UDP endpoints and servers share: sizes, payload checks, receive flags
and the one place OS errors become :class:`DatagramError`."""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Callable
from typing import Any, TypeAlias

from .._codec import as_bytes
from .._exceptions import DatagramError, MessageTooLarge
from .._options import positive_int
from .._util import format_address

__all__ = [
    "DEFAULT_MAX_SIZE",
    "ICMP_ERRNOS",
    "IPV4_MAX_PAYLOAD",
    "IPV6_MAX_PAYLOAD",
    "RECEIVE_FLAGS",
    "Address",
    "Payload",
    "check_argument",
    "check_family_max_size",
    "checked_payload",
    "datagram_size",
    "reported_size",
    "translate",
]

#: An address as the socket module gives it: ``(host, port)`` for IPv4,
#: ``(host, port, flowinfo, scope_id)`` for IPv6.
Address: TypeAlias = tuple[Any, ...]
Payload: TypeAlias = bytes | bytearray | memoryview | str

#: Largest UDP payload over IPv4 (65535 - 20 byte IP header - 8 byte UDP header).
IPV4_MAX_PAYLOAD = 65507
#: Largest UDP payload over IPv6 without jumbograms (65535 - 8 byte UDP header).
IPV6_MAX_PAYLOAD = 65527
#: ``max_size`` when none is given: the largest datagram IPv4 can carry.
DEFAULT_MAX_SIZE = IPV4_MAX_PAYLOAD

# With MSG_TRUNC, Linux returns a datagram's real length even when the buffer
# was too small, so an oversized datagram can be reported with its size.
if sys.platform.startswith("linux"):
    RECEIVE_FLAGS = socket.MSG_TRUNC
else:  # pragma: no cover
    RECEIVE_FLAGS = 0

#: Errors a receive on an unconnected socket may report for an earlier send
#: (ICMP port/host unreachable, and Windows' WSAECONNRESET).  A server's
#: readers count them and keep reading.
ICMP_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EMSGSIZE,
    }
)


class _Argument:
    """The one thing an attrs validator reads of its attribute: the name."""

    def __init__(self, name: str) -> None:
        self.name = name


def check_argument(
    validator: Callable[[Any, Any, Any], None], name: str, value: object
) -> None:
    """Check a plain argument (not an options field) with an attrs validator
    from :mod:`trionet._options`, so that it gets the same message."""
    validator(None, _Argument(name), value)


def datagram_size(instance: object, attribute: Any, value: object) -> None:
    """An attrs validator: a datagram size, 1..65527 bytes.  The limit of the
    address family (65507 for IPv4) is checked once the socket exists."""
    positive_int(instance, attribute, value)
    assert isinstance(value, int)
    if value > IPV6_MAX_PAYLOAD:
        raise ValueError(
            f"{attribute.name} must be in 1..{IPV6_MAX_PAYLOAD}, not {value}"
        )


def check_family_max_size(max_size: int, family: int) -> None:
    """Refuse a ``max_size`` larger than the socket's address family carries."""
    if family == socket.AF_INET and max_size > IPV4_MAX_PAYLOAD:
        raise ValueError(
            f"max_size must be in 1..{IPV4_MAX_PAYLOAD} for IPv4, not {max_size}"
        )


def checked_payload(data: Payload, max_size: int) -> bytes:
    """``data`` as bytes, or :class:`MessageTooLarge` if it is over ``max_size``."""
    payload = as_bytes(data)
    if len(payload) > max_size:
        raise MessageTooLarge(
            f"datagram of {len(payload)} bytes is larger than max_size={max_size}; "
            "nothing was sent"
        )
    return payload


def reported_size(nbytes: int) -> int | None:
    """The size of an oversized datagram, where the OS reports it."""
    # Without MSG_TRUNC the buffer only says "at least max_size + 1".
    return nbytes if RECEIVE_FLAGS else None


def translate(exc: OSError, action: str, address: Address | None) -> DatagramError:
    """Turn an OS error on send or receive into a :class:`DatagramError`."""
    where = f" ({format_address(address)})" if address is not None else ""
    detail = exc.strerror or str(exc)
    if exc.errno == errno.ECONNREFUSED:
        detail = "port unreachable: nothing is listening there (ICMP)"
    elif exc.errno == errno.EACCES and action == "send":
        detail += "; sending to a broadcast address needs broadcast=True"
    elif exc.errno == errno.EMSGSIZE:
        detail += "; the datagram is larger than the path allows"
    return DatagramError(exc.errno, f"UDP {action} failed{where}: {detail}", address)
