"""``trionet load``: drive an echo server and measure it.

How this works
--------------
Every connection (or, with ``--udp``, every connected UDP endpoint) runs a
*sender* and a *receiver*.  Message ``n`` of a connection starts with ``n``
in hexadecimal (as many digits as the size allows, at most 16) and is padded
with a fixed pattern of letters and digits, so it never contains the line
delimiter.  The sender keeps a copy of each message, with the time it was
sent, in a queue shared with the receiver, and may have ``--pipeline``
messages without an echo; the receiver checks each echo against the oldest
copy (intact and in order), records the round trip in a log-linear
histogram and frees a slot.  With ``--pipeline 1`` one task does both.

The senders share one budget (``--messages``, a total across connections)
or one deadline (``--duration``), and one token schedule for ``--rate``.  A
connection that fails stops and counts one error under its close reason (or
exception type); the others go on.  A TCP echo that does not come within
``--timeout`` counts as TIMEOUT and ends that connection.  A UDP echo that
does not come within ``--timeout`` counts as ``lost`` and frees its slot, so
a lossy path slows a run down but never hangs it.  Over everything sits the
hard ``--time-limit``: whatever still runs then is stopped and counted as
``time_limit``.

The modules, by concern:

- ``_spec``: the command-line options, their checks and the :class:`LoadSpec`
  they describe;
- ``_state``: what every connection of one run shares (budget, deadline, rate,
  latency histogram, error counts) and the sender/receiver pair's failure rule;
- ``_tcp`` and ``_udp``: one TCP connection's and one UDP endpoint's loop;
- ``_run``: opening everything, running it under the time limit, and the
  result (:class:`LoadResult`) with its table and JSON.
"""

from __future__ import annotations

from ._run import LoadResult as LoadResult
from ._run import add_parser as add_parser
from ._run import print_result as print_result
from ._run import run as run
from ._run import run_load as run_load
from ._spec import LoadSpec as LoadSpec
from ._spec import validate as validate
from ._state import message_maker as message_maker

__all__ = [
    "LoadResult",
    "LoadSpec",
    "add_parser",
    "message_maker",
    "print_result",
    "run",
    "run_load",
    "validate",
]
