"""A sans-IO decoder: feed bytes in any chunking, take whole messages out."""

from __future__ import annotations

from collections.abc import Iterator

from .._exceptions import CloseReason, IncompleteMessage, ProtocolError
from ._buffer import ReceiveBuffer
from ._framing import Framing

__all__ = ["Decoder"]


class Decoder:
    """Turns a byte stream into messages of one framing, with no I/O.

    ::

        decoder = Decoder(Lines())
        decoder.feed(b"hel")
        decoder.feed(b"lo\\nwor")
        assert decoder.messages() == [b"hello"]

    A decoder that raised :class:`ProtocolError` stays failed: every later
    call raises the same error.

    .. versionadded:: 0.1
    """

    __slots__ = ("_buffer", "_error", "framing")

    def __init__(self, framing: Framing) -> None:
        self.framing = framing
        self._buffer = ReceiveBuffer()
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a returned message."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes (refused once the decoder has failed)."""
        self._guard()
        self._buffer.feed(data)

    def _guard(self) -> None:
        if self._error is not None:
            raise self._error

    def next_message(self) -> bytes | None:
        """Remove and return the next whole message, or None if more data is needed.

        Raises:
            ProtocolError: the data breaks the framing's limits.
        """
        self._guard()
        try:
            return self.framing.extract(self._buffer)
        except ProtocolError as exc:
            self._error = exc
            raise

    def messages(self) -> list[bytes]:
        """Remove and return every whole message buffered now (maybe none).

        Messages that precede bad data are returned first; the
        :class:`ProtocolError` is raised by the next call.
        """
        self._guard()
        try:
            return self.framing.extract_all(self._buffer)
        except ProtocolError as exc:
            self._error = exc
            raise

    def __iter__(self) -> Iterator[bytes]:
        while (message := self.next_message()) is not None:
            yield message

    def end_of_stream(self) -> None:
        """Declare that no more bytes will come.

        Raises:
            IncompleteMessage: bytes of an unfinished message are buffered
                (they are in ``.partial``).
        """
        self._guard()
        if self._buffer:
            raise IncompleteMessage(CloseReason.CLOSED_BY_PEER, self._buffer.peek())
