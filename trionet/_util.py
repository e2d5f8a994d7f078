"""Small helpers shared by the layers above the codecs."""

from __future__ import annotations

import inspect
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Any, Protocol, TypeVar

import trio

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "call_maybe_async",
    "format_address",
    "host_handlers",
    "only_own_end",
    "server_in_block",
    "set_public_module",
    "unwrap_single_exception",
]

_T = TypeVar("_T")


class _Closable(Protocol):
    async def aclose(self) -> None: ...


async def call_maybe_async(fn: Callable[..., _T | Awaitable[_T]], *args: object) -> _T:
    """Call ``fn``; await the result if it is awaitable (sync or async callbacks)."""
    result = fn(*args)
    if inspect.isawaitable(result):
        return await result
    return result


def format_address(address: Sequence[Any] | None) -> str:
    """``host:port`` for a socket address, IPv6 hosts in brackets (``[::1]:80``);
    ``"?"`` for None.  The one way trionet prints an address."""
    if address is None:
        return "?"
    if isinstance(address, str):  # a UNIX socket path
        return address
    host, port = address[0], address[1]
    if isinstance(host, str) and ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def only_own_end(exc: BaseException, is_own: Callable[[BaseException], bool]) -> bool:
    """Whether ``exc`` only reports the end of a handler's own connection or peer.

    True when ``is_own(exc)`` holds, or, for an exception group (nested to
    any depth), when it holds for every exception at its leaves.  A handler
    that runs a reader and a writer in its own nursery gets its peer's
    disconnect as ``ExceptionGroup([ConnectionClosed(...)])``; the servers
    ask this to tell that ordinary end from a handler failure, where
    ``is_own`` recognises a ConnectionClosed or ProtocolError about the
    handler's own connection.
    """
    if isinstance(exc, BaseExceptionGroup):
        return all(only_own_end(inner, is_own) for inner in exc.exceptions)
    return is_own(exc)


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


def set_public_module(namespace: dict[str, Any], package: str) -> None:
    """Give every public class and function a package re-exports the package's
    name as ``__module__`` (``trionet.Server``, not ``trionet._server.Server``),
    for docs, reprs and pickling.  Called once at the end of each package's
    ``__init__``."""
    for name, obj in namespace.items():
        module = getattr(obj, "__module__", None)
        if (
            not name.startswith("_")
            and isinstance(module, str)
            and module.startswith(package + "._")
        ):
            obj.__module__ = package


async def host_handlers(
    adopt: Callable[[trio.Nursery], object],
    admission_ended: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The one nursery a server runs its handler tasks in.

    Start it with ``await handler_nursery.start(host_handlers, adopt,
    admission_ended)``: it opens a nursery inside ``handler_nursery``, gives
    it to ``adopt`` (the server keeps it to start handlers in, and cancels
    its scope at shutdown), and keeps it open -- shielded, so even while it
    is being cancelled -- until ``admission_ended`` is set, since until then
    the server may still start a handler in it.  It returns once the last
    handler has finished.
    """
    async with trio.open_nursery() as handlers:
        adopt(handlers)
        task_status.started()
        with trio.CancelScope(shield=True):
            await admission_ended.wait()


@asynccontextmanager
async def server_in_block(
    serve: Callable[..., Awaitable[object]], *args: object, **kwargs: object
) -> AsyncIterator[Any]:
    """The body of every ``open_*_server``: start ``serve(*args, **kwargs)``
    with ``nursery.start``, yield the server it reports, shut it down
    gracefully when the block ends, and let an exception raised in the block
    reach the caller as itself (not in a one-exception group)."""
    with unwrap_single_exception():
        async with trio.open_nursery() as nursery:
            server: _Closable = await nursery.start(partial(serve, *args, **kwargs))
            try:
                yield server
            finally:
                await server.aclose()
