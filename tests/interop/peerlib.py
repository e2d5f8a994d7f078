"""What the ``*_peer.py`` scripts share: answering in JSON lines, the errors
of the seed's threads, and an exit that those threads cannot hold up.

(Imported by the scripts, which run with this directory first on sys.path.)
"""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any

#: "ExcType: message" of every exception that killed a thread of the seed.
thread_errors: list[str] = []


def _record_thread_error(args: threading.ExceptHookArgs) -> None:
    thread_errors.append(f"{args.exc_type.__name__}: {args.exc_value}")


threading.excepthook = _record_thread_error


def say(**answer: Any) -> None:
    """Answer the test: one JSON line on stdout."""
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()


def commands() -> Iterator[dict[str, Any]]:
    """The test's commands, one JSON line each on stdin, until it closes."""
    for line in sys.stdin:
        yield json.loads(line)


def run(main: Callable[[list[str]], None]) -> None:
    """Run ``main(sys.argv[1:])``; report an exception as an error answer;
    end the process with os._exit, whatever threads the seed left running."""
    try:
        main(sys.argv[1:])
    except BaseException:
        say(error=traceback.format_exc())
    finally:
        sys.stdout.flush()
        os._exit(0)
