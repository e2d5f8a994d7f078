"""Small helpers shared by the layers above the codecs."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["call_maybe_async", "unwrap_single_exception"]

_T = TypeVar("_T")


async def call_maybe_async(fn: Callable[..., _T | Awaitable[_T]], *args: object) -> _T:
    """Call ``fn``; await the result if it is awaitable (sync or async callbacks)."""
    result = fn(*args)
    if inspect.isawaitable(result):
        return await result
    return result


@contextmanager
def unwrap_single_exception() -> Iterator[None]:
    """Let an exception from a block with a hidden nursery reach the caller as itself.

    trio wraps everything a nursery raises -- even the exception raised by the
    body of its ``async with`` -- in an ExceptionGroup.  When the group holds
    exactly one exception (which may itself be a group the body raised), raise
    that exception instead, with its own cause and context unchanged.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        exc = group.exceptions[0]
        cause, context, suppress = (
            exc.__cause__,
            exc.__context__,
            exc.__suppress_context__,
        )
        try:
            raise exc
        finally:
            exc.__cause__, exc.__context__ = cause, context
            exc.__suppress_context__ = suppress
            del exc, group
