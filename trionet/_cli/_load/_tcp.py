"""One TCP (or UNIX socket) connection of a load run: ping-pong, or a pipelined
sender and receiver."""

from __future__ import annotations

import math
from contextlib import AsyncExitStack
from functools import partial

import trio

import trionet

from ._spec import LoadSpec
from ._state import LoadState, LoadWorker

__all__ = ["connect_tcp", "tcp_connection"]

#: The most bytes a pipelined sender joins into one send.
MAX_BATCH_BYTES = 256 * 1024
#: Seconds allowed for each connect.
CONNECT_TIMEOUT = 10.0


async def connect_tcp(spec: LoadSpec, stack: AsyncExitStack) -> trionet.Connection:
    """Open one connection to the target (over TCP or a UNIX socket);
    ``stack`` closes it."""
    framing: trionet.Framing = (
        trionet.Lines() if spec.framing == "line" else trionet.Frames()
    )
    if spec.path is not None:
        return await stack.enter_async_context(
            trionet.connect_unix(
                spec.path, framing=framing, connect_timeout=CONNECT_TIMEOUT
            )
        )
    connect = trionet.connect_tcp(
        spec.host, spec.port, framing=framing, connect_timeout=CONNECT_TIMEOUT
    )
    return await stack.enter_async_context(connect)


async def tcp_connection(run: LoadState, conn: trionet.Connection) -> None:
    """Load ``conn`` until the run is over or the connection fails."""
    worker = LoadWorker(run)
    async with conn:
        if run.spec.pipeline == 1:
            # One task: nothing else to cancel when it fails.
            await worker.guard(trio.CancelScope(), partial(_ping_pong, worker, conn))
        else:
            await _pipelined(worker, conn)


async def _ping_pong(worker: LoadWorker, conn: trionet.Connection) -> None:
    run = worker.run
    timeout = run.spec.reply_timeout
    limiter = run.limiter
    seq = 0
    # One cancel scope for the whole loop: its deadline follows the message.
    with trio.CancelScope() as scope:
        while run.may_send():
            if limiter is not None:
                scope.deadline = math.inf
                await limiter.wait()
            message = run.make(seq)
            seq += 1
            sent_at = trio.current_time()
            scope.deadline = sent_at + timeout
            await conn.send(message)
            if await conn.receive() != message:
                raise worker.fail("mismatch")
            run.done(sent_at)
    if scope.cancelled_caught:
        raise worker.fail("TIMEOUT")


async def _pipelined(worker: LoadWorker, conn: trionet.Connection) -> None:
    """A sender and a receiver; what is in flight goes between them in batches.

    The sender takes every free slot at once (up to ``MAX_BATCH_BYTES``) and
    writes the messages in one send; without this, one system call per
    message would cost the client more than the server it measures.
    """
    run = worker.run
    spec = run.spec
    timeout = spec.reply_timeout
    framing = conn.framing
    assert framing is not None
    slots = trio.Semaphore(spec.pipeline)
    most = max(1, min(spec.pipeline, MAX_BATCH_BYTES // spec.size))
    # Never full: each batch holds at least one slot.
    in_flight_send, in_flight = trio.open_memory_channel[tuple[list[bytes], float]](
        spec.pipeline
    )

    async def receive() -> None:
        with trio.CancelScope() as scope:
            async for batch, sent_at in in_flight:
                scope.deadline = sent_at + timeout
                for message in batch:
                    if await conn.receive() != message:
                        raise worker.fail("mismatch")
                    run.done(sent_at)
                    slots.release()
        if scope.cancelled_caught:
            raise worker.fail("TIMEOUT")

    async def send() -> None:
        encode = framing.encode
        limiter = run.limiter
        seq = 0
        async with in_flight_send:
            while True:
                await slots.acquire()
                taken = 1
                while limiter is None and taken < most:
                    try:
                        slots.acquire_nowait()
                    except trio.WouldBlock:
                        break
                    taken += 1
                batch: list[bytes] = []
                while len(batch) < taken and run.may_send():
                    batch.append(run.make(seq))
                    seq += 1
                for _ in range(taken - len(batch)):
                    slots.release()
                if not batch:
                    return
                if limiter is not None:
                    await limiter.wait()
                in_flight_send.send_nowait((batch, trio.current_time()))
                await conn.send_all(b"".join(map(encode, batch)))
                if len(batch) < taken:
                    return

    await worker.run_pair(receive, send)
