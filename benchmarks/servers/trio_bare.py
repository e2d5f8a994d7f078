"""Bare trio echo server: trio.serve_tcp + SocketStream + a hand-written parser.

One task per connection; every reply is its own ``send_all``.
"""

from __future__ import annotations

import functools

import _common
import trio


async def handle(mode: str, stream: trio.SocketStream) -> None:
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


async def main(mode: str) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(
                trio.serve_tcp,
                functools.partial(handle, mode),
                0,
                host="127.0.0.1",
                backlog=_common.BACKLOG,
            )
        )
        _common.announce(listeners[0].socket.getsockname()[1])


if __name__ == "__main__":
    args = _common.setup(__doc__ or "")
    trio.run(main, args.mode)
