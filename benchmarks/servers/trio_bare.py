"""Bare trio echo server: trio.serve_tcp + SocketStream + a hand-written parser.

One task per connection; every reply is its own ``send_all``.  With ``--tls``,
``trio.serve_ssl_over_tcp``: the same handler over ``trio.SSLStream``.
"""

from __future__ import annotations

import functools
import ssl

import _common
import trio


async def handle(mode: str, stream: trio.abc.Stream) -> None:
    parser = _common.parser_for(mode)()
    encode = _common.encode
    try:
        while True:
            data = await stream.receive_some(_common.RECEIVE_SIZE)
            if not data:
                return
            parser.feed(data)
            while (message := parser.next()) is not None:
                await stream.send_all(encode(mode, message))
    except trio.BrokenResourceError:
        return


async def main(mode: str, tls: ssl.SSLContext | None) -> None:
    handler = functools.partial(handle, mode)
    if tls is None:
        serve = functools.partial(trio.serve_tcp, handler, 0)
    else:
        serve = functools.partial(trio.serve_ssl_over_tcp, handler, 0, tls)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(serve, host="127.0.0.1", backlog=_common.BACKLOG)
        )
        first = listeners[0]
        sock = first.socket if tls is None else first.transport_listener.socket
        _common.announce(sock.getsockname()[1])


if __name__ == "__main__":
    args = _common.setup(__doc__ or "")
    trio.run(main, args.mode, _common.tls_context(args))
