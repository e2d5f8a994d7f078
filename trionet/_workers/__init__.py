"""Several worker processes, each with its own trio loop: :func:`run_workers`.

``_parent`` is the pool's supervisor (:func:`run_workers`), ``_child`` what
runs in each worker (:class:`Worker`, the body of the process), and
``_control`` the messages the two exchange over their control connection.
"""

from ._child import Worker as Worker
from ._parent import run_workers as run_workers

__all__ = ["Worker", "run_workers"]
