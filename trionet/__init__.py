"""trionet: structured-concurrency networking for Trio.

Servers that host one task per connection in a nursery, clients and datagram
endpoints, with line, sized and framed receive modes on one stream, and an
explicit :class:`CloseReason` for every connection that ends.
"""

from ._as_stream import ConnectionStream as ConnectionStream
from ._client import connect_tcp as connect_tcp
from ._client import connect_unix as connect_unix
from ._codec import Decoder as Decoder
from ._codec import Frames as Frames
from ._codec import Framing as Framing
from ._codec import Lines as Lines
from ._connection import Connection as Connection
from ._connection import ConnectionStatistics as ConnectionStatistics
from ._exceptions import CloseReason as CloseReason
from ._exceptions import ConnectError as ConnectError
from ._exceptions import ConnectionClosed as ConnectionClosed

# datagrams
from ._exceptions import DatagramError as DatagramError
from ._exceptions import DatagramTooLarge as DatagramTooLarge
from ._exceptions import FrameTooLarge as FrameTooLarge
from ._exceptions import IncompleteMessage as IncompleteMessage
from ._exceptions import LineTooLong as LineTooLong
from ._exceptions import MessageTooLarge as MessageTooLarge
from ._exceptions import ProtocolError as ProtocolError
from ._exceptions import StartTLSRefused as StartTLSRefused
from ._exceptions import TrionetError as TrionetError
from ._reconnect import Reconnecting as Reconnecting
from ._reconnect import ReconnectingStatistics as ReconnectingStatistics
from ._reconnect import reconnecting as reconnecting
from ._server import Server as Server
from ._server import ServerOptions as ServerOptions
from ._server import ServerStatistics as ServerStatistics
from ._server import open_tcp_server as open_tcp_server
from ._server import open_unix_server as open_unix_server
from ._server import serve_tcp as serve_tcp
from ._server import serve_unix as serve_unix
from ._transport import PeerCredentials as PeerCredentials
from ._udp import Datagram as Datagram
from ._udp import DatagramStatistics as DatagramStatistics
from ._udp import UdpPeer as UdpPeer
from ._udp import UdpServer as UdpServer
from ._udp import UdpServerOptions as UdpServerOptions
from ._udp import UdpServerStatistics as UdpServerStatistics
from ._udp import open_udp as open_udp
from ._udp import open_udp_server as open_udp_server
from ._udp import serve_udp as serve_udp

# worker processes
from ._workers import Worker as Worker
from ._workers import run_workers as run_workers

__version__ = "0.1.0.dev0"

from ._util import set_public_module as _set_public_module

_set_public_module(globals(), "trionet")
