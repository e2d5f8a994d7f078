"""trionet echo server: trionet.serve_tcp with Lines() or Frames() -- or, with
``--unix PATH``, trionet.serve_unix on that socket file.

The handler is the one a user writes: ``async for m in conn: await conn.send(m)``.
With ``--batches``, the batch API instead: ``async for batch in
conn.batches(): await conn.send_many(batch)``.  With ``--tls``, the server's
``ssl_context``.
"""

from __future__ import annotations

import functools
import ssl
import sys

import _common
import trio

import trionet


async def handle(conn: trionet.Connection) -> None:
    async for message in conn:
        await conn.send(message)


async def handle_batches(conn: trionet.Connection) -> None:
    async for batch in conn.batches():
        await conn.send_many(batch)


async def main(
    mode: str, unix: str | None, tls: ssl.SSLContext | None, batches: bool
) -> None:
    framing = (
        trionet.Lines(max_length=_common.MAX_LINE)
        if mode == "lines"
        else trionet.Frames(max_size=_common.MAX_FRAME)
    )
    handler = handle_batches if batches else handle
    if unix is None:
        serve = functools.partial(trionet.serve_tcp, handler, 0, host="127.0.0.1")
    else:
        serve = functools.partial(trionet.serve_unix, handler, unix)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(
                serve, framing=framing, backlog=_common.BACKLOG, ssl_context=tls
            )
        )
        if unix is None:
            _common.announce(server.port)
        else:
            _common.announce_unix(server.path)


if __name__ == "__main__":
    use_batches = "--batches" in sys.argv
    if use_batches:
        sys.argv.remove("--batches")
    args = _common.setup(__doc__ or "", unix=True)
    trio.run(main, args.mode, args.unix, _common.tls_context(args), use_batches)
