"""Speak the wire formats of the libraries trionet replaces.

Deployed peers of those libraries cannot all be updated on the same day;
these modules serve them, and reach them, unchanged:

* :mod:`trionet.compat.tinyproto` -- tinyproto 2.0.1 and 3.0 (handshake,
  size / answer / body, connection-limit reply);
* :mod:`trionet.compat.socketengine` -- socket.engine 1.0.0 (one JSON object
  per line, ``get_ALL`` / ``write_ALL``, images answered with ``__ack``).

esockets, litesockets and XAsyncSockets speak raw TCP: plain trionet servers
and clients talk to their peers as they are (see the "Coming from" pages).

.. versionadded:: 0.1
"""

from . import socketengine as socketengine
from . import tinyproto as tinyproto
