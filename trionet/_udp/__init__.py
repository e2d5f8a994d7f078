"""UDP: datagram endpoints (``_endpoint``) and per-peer servers (``_server``),
over what both share (``_common``).  Imports point one way:
``_common`` <- ``_endpoint`` and ``_common`` <- ``_server``."""

from ._endpoint import Datagram as Datagram
from ._endpoint import DatagramStatistics as DatagramStatistics
from ._endpoint import open_udp as open_udp
from ._server import UdpPeer as UdpPeer
from ._server import UdpServer as UdpServer
from ._server import UdpServerOptions as UdpServerOptions
from ._server import UdpServerStatistics as UdpServerStatistics
from ._server import open_udp_server as open_udp_server
from ._server import serve_udp as serve_udp
