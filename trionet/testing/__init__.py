"""Tools for testing code built on trionet (and trio streams in general).

.. versionadded:: 0.1
"""

from .._util import set_public_module as _set_public_module
from ._faults import ChunkedStream as ChunkedStream
from ._faults import DelayedStream as DelayedStream
from ._faults import ResetAfter as ResetAfter
from ._faults import StallAfter as StallAfter
from ._network import ConnectionRecord as ConnectionRecord
from ._network import DatagramRecord as DatagramRecord
from ._network import Faults as Faults
from ._network import Host as Host
from ._network import MemoryNetwork as MemoryNetwork
from ._network import MemoryStream as MemoryStream
from ._network import Traffic as Traffic
from ._network import memory_network as memory_network
from ._pairs import connection_pair as connection_pair

_set_public_module(globals(), "trionet.testing")
