"""What crossed a memory network: a record per connection and per datagram.

The network keeps live, private tallies while traffic flows and hands out
frozen snapshots (:class:`ConnectionRecord`, :class:`DatagramRecord`,
:class:`Traffic`) for tests to compare.  Everything kept is bounded: the
bytes of connections are captured up to ``capture_bytes`` in all (counting
goes on past it, and the record says it is truncated), and at most
``max_records`` records of each kind are kept (the rest are counted).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeAlias

import attrs

from ..._codec import Decoder, Framing
from ..._transport import Address

__all__ = [
    "ConnectionRecord",
    "DatagramFate",
    "DatagramRecord",
    "Recorder",
    "Traffic",
]

#: What happened to a datagram.
DatagramFate: TypeAlias = Literal[
    "delivered", "lost", "partitioned", "host down", "unreachable", "overflow"
]
#: How a connection ended (None while it is open).
ConnectionEnd: TypeAlias = Literal["closed", "reset", "refused"]


@attrs.frozen(kw_only=True)
class ConnectionRecord:
    """One connection (or refused connection attempt) over a memory network.

    .. versionadded:: 0.1
    """

    #: Its number, in the order connections were attempted (from 0).
    id: int
    #: ``"tcp"`` or ``"unix"``.
    kind: str
    #: The client's address (a UNIX socket client's is ``""``).
    client: Address
    #: The server's address (for a refused attempt, the address tried).
    server: Address
    #: When the client connected (seconds since the network was first used).
    opened_at: float
    #: When both sides were closed or the connection was reset; None while open.
    ended_at: float | None
    #: ``"closed"`` (both sides closed), ``"reset"``, ``"refused"`` (no
    #: connection was made), or None while open.
    end: ConnectionEnd | None
    #: Bytes the client sent (accepted by the network, whether or not the
    #: server read them).
    bytes_to_server: int
    #: Bytes the server sent.
    bytes_to_client: int
    #: The first bytes the client sent, as far as the capture limit allowed.
    data_to_server: bytes
    #: The first bytes the server sent, as far as the capture limit allowed.
    data_to_client: bytes

    @property
    def truncated(self) -> bool:
        """Whether the captured bytes are fewer than those sent."""
        return (
            len(self.data_to_server) < self.bytes_to_server
            or len(self.data_to_client) < self.bytes_to_client
        )

    def messages_to_server(self, framing: Framing) -> list[bytes]:
        """The whole messages of ``framing`` in what the client sent
        (captured bytes only; a partial message at the end is left out).

        Raises:
            ProtocolError: the bytes break the framing.
        """
        return _messages(framing, self.data_to_server)

    def messages_to_client(self, framing: Framing) -> list[bytes]:
        """The whole messages of ``framing`` in what the server sent."""
        return _messages(framing, self.data_to_client)


def _messages(framing: Framing, data: bytes) -> list[bytes]:
    decoder = Decoder(framing)
    decoder.feed(data)
    return decoder.messages()


@attrs.frozen(kw_only=True)
class DatagramRecord:
    """One datagram sent over a memory network (a duplicate the network
    made is a record of its own).

    .. versionadded:: 0.1
    """

    #: When it was sent (seconds since the network was first used).
    sent_at: float
    #: The sender's address.
    source: Address
    #: The address it was sent to.
    destination: Address
    #: Its payload size in bytes.
    size: int
    #: ``"delivered"`` (queued at a socket bound to the destination),
    #: ``"lost"`` (loss), ``"partitioned"``, ``"host down"``,
    #: ``"unreachable"`` (nothing bound there) or ``"overflow"`` (the
    #: receiving socket's buffer was full).
    fate: DatagramFate
    #: Whether this is a copy the network made (``duplicate``).
    duplicate: bool = False

    @property
    def dropped(self) -> bool:
        """Whether the datagram never reached a socket."""
        return self.fate != "delivered"


@attrs.frozen(kw_only=True)
class Traffic:
    """A snapshot of everything a memory network recorded.

    Two runs with the same seed and the same code give equal snapshots.

    .. versionadded:: 0.1
    """

    #: Every connection and refused attempt, in the order attempted.
    connections: tuple[ConnectionRecord, ...]
    #: Every datagram, in the order sent.
    datagrams: tuple[DatagramRecord, ...]
    #: Records not kept because ``max_records`` was reached.
    unrecorded: int = 0


class _Capture:
    """The bytes of one direction of a connection, as far as the budget allows."""

    __slots__ = ("count", "data")

    def __init__(self) -> None:
        self.count = 0
        self.data = bytearray()


class LiveConnection:
    """The running tally behind a :class:`ConnectionRecord`."""

    __slots__ = (
        "client",
        "end",
        "ended_at",
        "id",
        "kind",
        "opened_at",
        "recorder",
        "server",
        "to_client",
        "to_server",
    )

    def __init__(
        self,
        recorder: Recorder,
        id: int,
        kind: str,
        client: Address,
        server: Address,
    ) -> None:
        self.recorder = recorder
        self.id = id
        self.kind = kind
        self.client = client
        self.server = server
        self.opened_at = recorder.clock()
        self.ended_at: float | None = None
        self.end: ConnectionEnd | None = None
        self.to_server = _Capture()
        self.to_client = _Capture()

    def sent(self, to_server: bool, data: bytes | memoryview) -> None:
        capture = self.to_server if to_server else self.to_client
        capture.count += len(data)
        self.recorder.capture(capture.data, data)

    def ended(self, end: ConnectionEnd) -> None:
        if self.end is None:
            self.end = end
            self.ended_at = self.recorder.clock()

    def snapshot(self) -> ConnectionRecord:
        return ConnectionRecord(
            id=self.id,
            kind=self.kind,
            client=self.client,
            server=self.server,
            opened_at=self.opened_at,
            ended_at=self.ended_at,
            end=self.end,
            bytes_to_server=self.to_server.count,
            bytes_to_client=self.to_client.count,
            data_to_server=bytes(self.to_server.data),
            data_to_client=bytes(self.to_client.data),
        )


class Recorder:
    """Keeps the records of one network, within its bounds."""

    def __init__(
        self, capture_bytes: int, max_records: int, clock: Callable[[], float]
    ) -> None:
        #: Seconds since the network was first used.
        self.clock = clock
        self._capture_left = capture_bytes
        self._max_records = max_records
        self._connections: list[LiveConnection] = []
        self._datagrams: list[DatagramRecord] = []
        self._attempts = 0
        self._unrecorded = 0

    def capture(self, into: bytearray, data: bytes | memoryview) -> None:
        take = min(len(data), self._capture_left)
        if take:
            into += data[:take]
            self._capture_left -= take

    def connection(self, kind: str, client: Address, server: Address) -> LiveConnection:
        live = LiveConnection(self, self._attempts, kind, client, server)
        self._attempts += 1
        if len(self._connections) < self._max_records:
            self._connections.append(live)
        else:
            self._unrecorded += 1
        return live

    def datagram(self, record: DatagramRecord) -> None:
        if len(self._datagrams) < self._max_records:
            self._datagrams.append(record)
        else:
            self._unrecorded += 1

    def traffic(self) -> Traffic:
        return Traffic(
            connections=tuple(live.snapshot() for live in self._connections),
            datagrams=tuple(self._datagrams),
            unrecorded=self._unrecorded,
        )
