"""An in-memory network that trionet's own servers and clients can run on
(see ``_net.py`` for how it works)."""

from ._faults import Faults as Faults
from ._hosts import Host as Host
from ._net import MemoryNetwork as MemoryNetwork
from ._net import memory_network as memory_network
from ._records import ConnectionRecord as ConnectionRecord
from ._records import DatagramRecord as DatagramRecord
from ._records import Traffic as Traffic
from ._stream import MemoryStream as MemoryStream
