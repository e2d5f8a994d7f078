"""Close reasons and the exception hierarchy.

Nothing here imports trio: the sans-IO codecs raise these too.

Whose fault is it?  Every error names it:

* :class:`ProtocolError` -- the *peer* sent something we refuse.  A stream
  connection is then closed with :attr:`CloseReason.PROTOCOL_ERROR`; a
  datagram endpoint or UDP peer stays open, since the offending datagram was
  discarded whole and the next one stands on its own
  (:class:`DatagramTooLarge`).
* :class:`ValueError` / :class:`TypeError` -- *our caller* asked for something
  impossible (a line containing its delimiter, a frame or datagram over the
  limit); nothing was sent and the connection stays open.
* :class:`OSError` -- the network or the operating system failed
  (:class:`ConnectError`, :class:`DatagramError`).
* :class:`ConnectionClosed` -- the connection is over; ``.reason`` says why.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = [
    "CloseReason",
    "ConnectError",
    "ConnectionClosed",
    "DatagramError",
    "DatagramTooLarge",
    "FrameTooLarge",
    "IncompleteMessage",
    "LineTooLong",
    "MessageTooLarge",
    "ProtocolError",
    "StartTLSRefused",
    "TrionetError",
]


class CloseReason(enum.Enum):
    """Why a connection ended.  Every connection that ends has exactly one.

    The reason is taken from the first cause and never changes afterwards.

    *Host* means **this** side -- the program holding the connection, on a
    client as on a server -- and *peer* the other side (the words are
    XAsyncSockets').  A client that closes its own connection sees
    CLOSED_BY_HOST; the server's side of that connection sees CLOSED_BY_PEER.
    """

    #: This side closed it: :meth:`Connection.aclose`, or a server handler returned.
    CLOSED_BY_HOST = "closed by host"
    #: The peer closed its side cleanly (end of stream).
    CLOSED_BY_PEER = "closed by peer"
    #: A timeout ran out: idle timeout, message timeout, handshake or connect timeout.
    TIMEOUT = "timeout"
    #: The transport failed (reset, broken pipe, TLS failure), a handler raised,
    #: or a send was cancelled half way through a message.
    ERROR = "error"
    #: The peer sent bytes the framing refuses (see :class:`ProtocolError`).
    PROTOCOL_ERROR = "protocol error"
    #: A server's accept filter refused the client.
    REJECTED = "rejected"
    #: The server shut down while the connection was still open.
    SHUTDOWN = "shutdown"
    #: A reader fell too far behind: a connection's outgoing queue overflowed on
    #: a broadcast, or a channel's buffer overflowed under the "close" policy.
    SLOW_CONSUMER = "slow consumer"

    def __repr__(self) -> str:
        return f"CloseReason.{self.name}"


class TrionetError(Exception):
    """Base class of every error trionet raises itself."""


class ConnectionClosed(TrionetError):
    """The connection is closed (or the peer ended the stream).

    Raised by message receives at end of stream and by sends after close.

    Attributes:
        reason (CloseReason): why the connection ended.
    """

    def __init__(self, reason: CloseReason, message: str | None = None) -> None:
        self.reason = reason
        super().__init__(message or f"connection closed: {reason.value}")


class IncompleteMessage(ConnectionClosed):
    """The stream ended inside a line, frame or :meth:`~Connection.receive_exactly`.

    Attributes:
        partial (bytes): the bytes of the unfinished message that did arrive.
    """

    def __init__(self, reason: CloseReason, partial: bytes) -> None:
        self.partial = partial
        super().__init__(
            reason,
            f"connection closed ({reason.value}) inside a message; "
            f"{len(partial)} bytes of it arrived",
        )


class ProtocolError(TrionetError):
    """The peer sent something that trionet refuses.

    On a stream connection these are bytes the framing refuses, and the
    connection is closed with :attr:`CloseReason.PROTOCOL_ERROR`.  A
    datagram endpoint or UDP peer stays open (:class:`DatagramTooLarge`):
    the datagram was discarded whole and the next one is unaffected.
    """


class LineTooLong(ProtocolError):
    """A received line is longer than :attr:`Lines.max_length`."""


class FrameTooLarge(ProtocolError):
    """A received frame header announces more than :attr:`Frames.max_size`."""


class StartTLSRefused(ProtocolError):
    """Bytes from the peer were still unread when TLS was to start.

    :meth:`Connection.start_tls` refuses to upgrade a connection while any
    received byte is still buffered, unread: those bytes came in plaintext,
    and treating them as part of the TLS session would let anyone on the
    path inject commands that the application then believes were protected
    (the STARTTLS command-injection hole, CVE-2011-0411).  The connection is
    closed with :attr:`CloseReason.PROTOCOL_ERROR`; the bytes are never
    handed over.

    Attributes:
        buffered (int): how many unread bytes were buffered.

    .. versionadded:: 0.1
    """

    def __init__(self, buffered: int) -> None:
        self.buffered = buffered
        super().__init__(
            f"refused to start TLS: {buffered} bytes the peer sent in plaintext "
            "were still unread (sent after the request for TLS, before the "
            "handshake); the connection is closed"
        )


class MessageTooLarge(TrionetError, ValueError):
    """An outgoing message is larger than the endpoint allows; nothing was sent."""


class ConnectError(TrionetError, OSError):
    """Connecting failed (or, for :meth:`Connection.start_tls`, upgrading).

    Attributes:
        reason (CloseReason): :attr:`~CloseReason.TIMEOUT` for a connect or
            handshake timeout, :attr:`~CloseReason.ERROR` otherwise (the
            :class:`OSError` or TLS error is the ``__cause__``).  The
            compatibility clients of :mod:`trionet.compat` also report the
            old servers' own refusals: :attr:`~CloseReason.REJECTED` (a
            tinyproto server at its connection limit) and
            :attr:`~CloseReason.PROTOCOL_ERROR` (a bad handshake byte).
    """

    def __init__(self, reason: CloseReason, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class DatagramTooLarge(ProtocolError):
    """An incoming datagram was larger than the endpoint's ``max_size``.

    The peer sent it, so this is a :class:`ProtocolError`.  The datagram was
    discarded whole, never truncated; the endpoint (or UDP peer) stays open
    and the next receive returns the next datagram.  (An *outgoing* datagram
    over ``max_size`` is the caller's mistake: :class:`MessageTooLarge`.)

    Attributes:
        address (tuple | None): who sent it.
        size (int | None): its size in bytes where the OS reports it (Linux),
            else ``None`` (it was at least ``max_size + 1`` bytes).
        max_size (int): the limit it broke.

    .. versionadded:: 0.1
    """

    def __init__(
        self, address: tuple[Any, ...] | None, size: int | None, max_size: int
    ) -> None:
        # (Imported here: _util imports trio, which the codecs, raising the
        # other exceptions of this module, must not need.)
        from ._util import format_address

        self.address = address
        self.size = size
        self.max_size = max_size
        amount = f"{size} bytes" if size is not None else f"more than {max_size} bytes"
        sender = format_address(address) if address is not None else "an unknown sender"
        super().__init__(
            f"discarded a datagram of {amount} from {sender}: max_size is {max_size}"
        )


class DatagramError(TrionetError, OSError):
    """The operating system reported a network error for a datagram.

    Most often this is an ICMP error for an earlier send: "port unreachable"
    (``errno`` is ``ECONNREFUSED``) when nothing listens at the remote address
    of a connected endpoint.  UDP has no connection to lose, so this is not a
    :class:`ConnectionClosed`: the endpoint stays open and the error is
    reported once.  The original :class:`OSError` is the ``__cause__`` and its
    ``errno`` is copied.

    Attributes:
        address (tuple | None): the remote address the error concerns, where
            known.

    .. versionadded:: 0.1
    """

    def __init__(
        self, errno: int | None, message: str, address: tuple[Any, ...] | None = None
    ) -> None:
        self.address = address
        if errno is None:
            super().__init__(message)
        else:
            super().__init__(errno, message)
