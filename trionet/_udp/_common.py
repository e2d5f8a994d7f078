"""What UDP endpoints and servers share: sizes, payload checks, receive flags,
the one place OS errors become :class:`DatagramError`, and the pieces of the
fast path.

The fast path
-------------
Endpoints and servers drive non-blocking stdlib sockets themselves instead of
awaiting trio's socket methods, which pass through the scheduler on every
``recvfrom`` and ``sendto`` even when the kernel answers at once.  A
receive or send tries the system call first and only waits
(:func:`trio.lowlevel.wait_readable` / ``wait_writable``) when the kernel says
it would block.  trio's checkpoint rules still hold where they matter:

* every public async call is a cancel point: it starts with
  :func:`trio.lowlevel.checkpoint_if_cancelled`, and once a datagram has been
  taken from the kernel (or handed to it) nothing can raise
  :class:`trio.Cancelled` any more, so a cancellation never loses a datagram
  nor hides that one was sent;
* a call that finished at once skips the scheduler, but a :class:`Pacer`
  makes every :data:`SCHEDULE_EVERY`-th such call pass through it
  (``cancel_shielded_checkpoint``), so a busy endpoint or peer cannot starve
  the other tasks;
* one task at a time waits on a socket: a caller that has to wait joins a
  FIFO :class:`WaitLine` first, and a caller that finds the line non-empty
  joins it too, even if the kernel could serve it at once.  When nobody
  waits, nobody touches the line's lock.

Simulated networks.  Under :func:`trionet.testing.memory_network` the socket
is a :class:`~trionet._network.SimulatedDatagramSocket`: the same calls, with
waits of its own instead of trio's.  Which waits (and how to close) is decided
once, when an endpoint or a server socket is set up (:func:`waits_for`); the
datagram path only calls what it was given, so it costs a kernel socket
nothing.
"""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import trio

from .._codec import as_bytes
from .._exceptions import DatagramError, MessageTooLarge
from .._network import SimulatedDatagramSocket
from .._options import positive_int
from .._util import format_address

__all__ = [
    "DEFAULT_MAX_SIZE",
    "ICMP_ERRNOS",
    "IPV4_MAX_PAYLOAD",
    "IPV6_MAX_PAYLOAD",
    "RECEIVE_FLAGS",
    "SCHEDULE_EVERY",
    "Address",
    "Pacer",
    "Payload",
    "UdpSocket",
    "Wait",
    "WaitLine",
    "buffer_size",
    "check_argument",
    "check_family_max_size",
    "checked_payload",
    "close_socket",
    "datagram_size",
    "reported_size",
    "sendable_as_is",
    "set_buffer_sizes",
    "translate",
    "waits_for",
]

_T = TypeVar("_T")

#: An address as the socket module gives it: ``(host, port)`` for IPv4,
#: ``(host, port, flowinfo, scope_id)`` for IPv6.
Address: TypeAlias = tuple[Any, ...]
Payload: TypeAlias = bytes | bytearray | memoryview | str
#: A socket the fast path drives: a non-blocking stdlib UDP socket, or a
#: simulated network's.
UdpSocket: TypeAlias = socket.socket | SimulatedDatagramSocket
#: How the fast path waits for its socket to become readable (or writable):
#: ``await wait(sock)``.
Wait: TypeAlias = Callable[[Any], Awaitable[None]]

#: Largest UDP payload over IPv4 (65535 - 20 byte IP header - 8 byte UDP header).
IPV4_MAX_PAYLOAD = 65507
#: Largest UDP payload over IPv6 without jumbograms (65535 - 8 byte UDP header).
IPV6_MAX_PAYLOAD = 65527
#: ``max_size`` when none is given: the largest datagram IPv4 can carry.
DEFAULT_MAX_SIZE = IPV4_MAX_PAYLOAD

# Every receive is ``sock.recvfrom(max_size + 1, RECEIVE_FLAGS)``: a datagram
# that does not fit in max_size always shows itself (it fills the extra byte)
# instead of being cut short, and no buffer is kept between receives (the
# stdlib allocates the bytes and shrinks them to the datagram; this is as cheap
# as recvfrom_into a kept buffer, and saves the copy out of it).  With
# MSG_TRUNC, Linux returns a datagram's real length even when the buffer was
# too small, and CPython sizes the bytes object to that length: its length is
# then the datagram's real size, which an oversized datagram is reported with
# (its content past max_size + 1 is not the datagram's, and such a datagram is
# only ever counted and dropped, never read).
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


def buffer_size(instance: object, attribute: Any, value: object) -> None:
    """An attrs validator for ``so_rcvbuf`` / ``so_sndbuf``: a number of
    bytes (an int >= 1), or None for the system default."""
    if value is not None:
        positive_int(instance, attribute, value)


def set_buffer_sizes(
    sock: UdpSocket, so_sndbuf: int | None, so_rcvbuf: int | None
) -> None:
    """Set the kernel's send and receive buffer of ``sock``, where given."""
    if so_sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, so_sndbuf)
    if so_rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, so_rcvbuf)


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


def sendable_as_is(address: object, family: int) -> bool:
    """Whether ``sendto`` can take ``address`` without a name lookup: an IP
    literal of the socket's family and an int port, as ``recvfrom`` gives.
    Anything else (host names, ``""``, ``"<broadcast>"``) must be resolved
    first, which the stdlib would do blocking."""
    if type(address) is not tuple or not 2 <= len(address) <= 4:
        return False
    if family == socket.AF_INET and len(address) != 2:
        return False
    host, port = address[0], address[1]
    if type(host) is not str or type(port) is not int:
        return False
    try:
        socket.inet_pton(family, host)
    except OSError:
        return False
    return True


def waits_for(sock: UdpSocket) -> tuple[Wait, Wait]:
    """How the fast path waits for ``sock`` to become readable and writable:
    trio's :func:`~trio.lowlevel.wait_readable` and ``wait_writable`` for a
    kernel socket, the socket's own waits for a simulated network's.  Asked
    once per socket, when an endpoint or a server socket is set up."""
    if isinstance(sock, SimulatedDatagramSocket):
        return type(sock).wait_readable, type(sock).wait_writable
    return trio.lowlevel.wait_readable, trio.lowlevel.wait_writable


def close_socket(sock: UdpSocket) -> None:
    """Close ``sock`` (if still open), waking a task waiting on it."""
    if isinstance(sock, SimulatedDatagramSocket):
        sock.close()  # (it wakes its own waiters)
    elif sock.fileno() >= 0:
        trio.lowlevel.notify_closing(sock)
        sock.close()


#: Calls an endpoint or peer completes at once (without waiting) before it
#: passes through the scheduler all the same.
SCHEDULE_EVERY = 64


class Pacer:
    """Counts calls that finished without passing through trio's scheduler.

    A call that finished at once does ``pacer.left -= 1`` and then
    ``if pacer.left <= 0: await pacer.pause()``, so that every
    :data:`SCHEDULE_EVERY`-th one lets the other tasks run.  (Plain attribute
    arithmetic: this is on the path of every datagram.)  A real wait is a pass
    through the scheduler too and refills the count.
    """

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = SCHEDULE_EVERY

    def refill(self) -> None:
        """The caller just waited (other tasks ran meanwhile)."""
        self.left = SCHEDULE_EVERY

    async def pause(self) -> None:
        """Let the other tasks run; never raises :class:`trio.Cancelled`."""
        self.left = SCHEDULE_EVERY
        await trio.lowlevel.cancel_shielded_checkpoint()


class WaitLine:
    """The callers that have to wait for one direction of one socket.

    trio lets one task at a time wait for a socket to become readable (or
    writable); the others queue here, in FIFO order.  :attr:`count` is the
    number of callers in the line, waiting or at its head: a caller that
    finds it non-zero must join the line even if the kernel could serve it at
    once, or it would overtake them.  When nobody waits, nobody touches the
    lock.
    """

    __slots__ = ("_lock", "count")

    def __init__(self) -> None:
        #: Callers in the line (a plain attribute: read for every datagram).
        self.count = 0
        self._lock = trio.StrictFIFOLock()

    async def __aenter__(self) -> None:
        """Join the line and wait to be at its head (a checkpoint only if
        others are ahead)."""
        self.count += 1
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            try:
                await self._lock.acquire()
            except BaseException:
                self.count -= 1
                raise

    async def __aexit__(self, *exc_info: object) -> None:
        """Leave the line: the next caller in it is at its head."""
        self._lock.release()
        self.count -= 1

    async def retry(
        self,
        wait: Wait,
        sock: UdpSocket,
        attempt: Callable[[], _T | None],
        pacer: Pacer,
    ) -> _T:
        """Join the line; at its head, call ``attempt()`` until it gives a
        result, waiting for ``sock`` with ``wait`` (``wait_readable`` or
        ``wait_writable``, as :func:`waits_for` gave them) in between.

        ``attempt`` makes the non-blocking system call: it returns None when
        the kernel would block and raises what the caller should see
        otherwise.  A cancellation can only strike in a wait, so before the
        call or after one that would have blocked: nothing is lost.  A socket
        closed meanwhile raises :class:`trio.ClosedResourceError` from the
        wait.  Each wait refills ``pacer``.
        """
        async with self:
            while (result := attempt()) is None:
                await wait(sock)
                pacer.refill()
            return result


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
