"""A pure-trio UDP echo probe: what a hand-written trio loop can reach.

    python udp_probe.py datagrams

A non-blocking stdlib socket: every wake-up drains every datagram that is
ready (``recvfrom`` until ``BlockingIOError``) and answers each with
``sendto`` at once; only then ``trio.lowlevel.wait_readable``.  A send the
kernel refuses waits with ``wait_writable``.
"""

from __future__ import annotations

import _common
import trio


async def main() -> None:
    sock = _common.udp_socket()
    _common.announce(sock.getsockname()[1])
    recvfrom, sendto = sock.recvfrom, sock.sendto
    size = _common.UDP_MAX
    while True:
        await trio.lowlevel.wait_readable(sock)
        while True:
            try:
                data, address = recvfrom(size)
            except BlockingIOError:
                break
            while True:
                try:
                    sendto(data, address)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)


if __name__ == "__main__":
    _common.setup(__doc__ or "", ("datagrams",))
    trio.run(main)
