"""Named channels: publish / subscribe over one connection.

A server and its clients exchange messages on named channels (``"status"``,
``"image"``, ...) over one TCP connection each.  The receiver keeps the most
recent payload of every channel and buffers unread ones per channel, within
bounds in messages and in bytes; the server can publish to every client at
once.  See :doc:`/channels` for the wire
format and the delivery rules.

.. versionadded:: 0.1
"""

from .._util import set_public_module as _set_public_module
from ._connection import ChannelConnection as ChannelConnection
from ._connection import ChannelStatistics as ChannelStatistics
from ._connection import Policy as Policy
from ._redis import BackplaneStatistics as BackplaneStatistics
from ._redis import RedisBackplane as RedisBackplane
from ._server import ChannelServer as ChannelServer
from ._server import connect_channels as connect_channels
from ._server import connect_unix_channels as connect_unix_channels
from ._server import open_channel_server as open_channel_server
from ._server import open_unix_channel_server as open_unix_channel_server
from ._server import serve_channels as serve_channels
from ._server import serve_unix_channels as serve_unix_channels
from ._wire import MAX_NAME_LENGTH as MAX_NAME_LENGTH
from ._wire import VERSION as VERSION

_set_public_module(globals(), "trionet.channels")
