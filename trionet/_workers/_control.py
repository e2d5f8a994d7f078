"""The control connection between the pool's parent and one worker.

A socketpair made by the parent before it starts the worker, spoken through
a :class:`trionet.Connection` with :class:`trionet.Lines` framing, one
message per line.  Both sides import their words from here.

Parent to worker (:class:`Command`):

``stop``
    Shut down gracefully: set :attr:`Worker.shutdown_requested`, give
    ``main`` ``shutdown_timeout`` seconds.  The end of the stream (the parent
    died) means the same.
``force``
    Cancel ``main`` now.

Worker to parent (:class:`Note`, then a space and the payload):

``report <json>``
    The latest :meth:`Worker.report`.
``signalled <SIGNAME>``
    The worker itself got SIGINT or SIGTERM and is stopping; unless the pool
    is stopping too, the parent replaces it.
``finished``
    ``main`` returned on its own, before any stop request: the worker is done
    for good and is not replaced.
"""

from __future__ import annotations

import contextlib
import enum
import socket

import trio

from .._codec import Lines
from .._connection import Connection
from .._exceptions import TrionetError

__all__ = [
    "ERRORS",
    "MAX_REPORT_SIZE",
    "Command",
    "Note",
    "open_control",
    "parse_note",
    "send",
]

#: The longest report, in bytes of JSON.
MAX_REPORT_SIZE = 64 * 1024
#: A line: the longest report and its word.
_FRAMING = Lines(max_length=MAX_REPORT_SIZE + 64)
#: What reading or writing may raise once the other side is gone.
ERRORS = (TrionetError, trio.BrokenResourceError, trio.ClosedResourceError)


class Command(enum.Enum):
    """What the parent tells a worker."""

    STOP = b"stop"
    FORCE = b"force"


class Note(enum.Enum):
    """What a worker tells the parent."""

    REPORT = b"report"
    SIGNALLED = b"signalled"
    FINISHED = b"finished"


def open_control(sock: socket.socket) -> Connection:
    """One side of the control connection, over its end of the socketpair."""
    return Connection(
        trio.SocketStream(trio.socket.from_stdlib_socket(sock)), framing=_FRAMING
    )


def parse_note(line: bytes) -> tuple[Note, str] | None:
    """A worker's line taken apart, or None if it is not one."""
    word, _, payload = line.partition(b" ")
    try:
        note = Note(word)
    except ValueError:
        return None
    return note, payload.decode("utf-8", "replace")


async def send(control: Connection, word: Command | Note, payload: str = "") -> None:
    """Send one message; nothing happens if the other side is gone."""
    line = word.value + (b" " + payload.encode() if payload else b"")
    with contextlib.suppress(*ERRORS):
        await control.send_line(line)
