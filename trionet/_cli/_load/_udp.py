"""One UDP endpoint of a load run: a late echo is a lost datagram, not a failure."""

from __future__ import annotations

import socket
from collections import deque
from contextlib import AsyncExitStack

import trio

import trionet

from .._common import CliError
from ._spec import LoadSpec
from ._state import LoadState, LoadWorker

__all__ = ["open_udp", "probe_udp", "udp_endpoint"]


class _Datagram:
    """One datagram in flight."""

    __slots__ = ("message", "send_failed", "sent_at")

    def __init__(self, message: bytes, sent_at: float) -> None:
        self.message = message
        self.sent_at = sent_at
        self.send_failed = False


async def udp_endpoint(run: LoadState, endpoint: trionet.Datagram) -> None:
    """One UDP "connection": like a pipelined TCP one, but a late echo is lost.

    Echoes are matched against every datagram in flight, so one that
    overtook another is not a mismatch; the ones it overtook count as lost
    once their timeout passes (or at once, when a later echo arrived).
    """
    spec = run.spec
    timeout = spec.reply_timeout
    worker = LoadWorker(run)
    slots = trio.Semaphore(spec.pipeline)
    in_flight_send, in_flight = trio.open_memory_channel[_Datagram](spec.pipeline)
    recently_lost: deque[bytes] = deque(maxlen=max(64, 2 * spec.pipeline))

    def lose(item: _Datagram) -> None:
        if not item.send_failed:  # a failed send was counted already
            run.count_error("lost")
            recently_lost.append(item.message)
        slots.release()

    async def receive() -> None:
        pending: deque[_Datagram] = deque()
        while True:
            if not pending:
                try:
                    pending.append(await in_flight.receive())
                except trio.EndOfChannel:
                    return
            data = None
            with trio.move_on_at(pending[0].sent_at + timeout):
                try:
                    data = await endpoint.receive()
                except trionet.DatagramError as exc:
                    run.count_error(exc)
                    continue
            while True:  # collect what was sent meanwhile
                try:
                    pending.append(in_flight.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            if data is None:
                lose(pending.popleft())
                continue
            match = next(
                (i for i, item in enumerate(pending) if item.message == data), None
            )
            if match is None:
                if data not in recently_lost:
                    run.count_error("mismatch")
                continue
            for _ in range(match):
                lose(pending.popleft())
            run.done(pending.popleft().sent_at)
            slots.release()

    async def send() -> None:
        async with in_flight_send:
            seq = 0
            limiter = run.limiter
            while True:
                await slots.acquire()
                if not run.may_send():
                    break
                if limiter is not None:
                    await limiter.wait()
                message = run.make(seq)
                seq += 1
                item = _Datagram(message, trio.current_time())
                in_flight_send.send_nowait(item)
                try:
                    await endpoint.send(message)
                except trionet.DatagramError as exc:
                    item.send_failed = True
                    run.count_error(exc)

    async with endpoint:
        await worker.run_pair(receive, send)


async def open_udp(spec: LoadSpec, stack: AsyncExitStack) -> trionet.Datagram:
    """Open one endpoint connected to the target; ``stack`` closes it."""
    try:
        infos = await trio.socket.getaddrinfo(
            spec.host, spec.port, type=socket.SOCK_DGRAM
        )
    except OSError as exc:
        raise trionet.ConnectError(
            trionet.CloseReason.ERROR, f"cannot resolve {spec.host}: {exc}"
        ) from exc
    family, *_, address = infos[0]
    local = "::" if family == socket.AF_INET6 else "0.0.0.0"
    remote = (str(address[0]), int(address[1]))
    return await stack.enter_async_context(
        trionet.open_udp(local_host=local, remote=remote)
    )


async def probe_udp(spec: LoadSpec, endpoint: trionet.Datagram) -> None:
    """Check that something echoes at the target before the run starts."""
    probe = b"?" * spec.size
    with trio.move_on_after(spec.reply_timeout):
        try:
            await endpoint.send(probe)
            while await endpoint.receive() != probe:
                pass
            return
        except trionet.DatagramError as exc:
            raise CliError(
                f"no UDP echo from {spec.target}: {exc.strerror or exc}"
            ) from exc
    raise CliError(
        f"no UDP echo from {spec.target} within {spec.reply_timeout:g} s "
        "(is 'trionet echo --udp' running there?)"
    )
