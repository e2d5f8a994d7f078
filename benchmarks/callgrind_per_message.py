"""Server instructions per message under callgrind: stable on a busy machine.

::

    python benchmarks/callgrind_per_message.py                  # trionet, a few rows
    python benchmarks/callgrind_per_message.py --stacks trionet,trio \\
        --workloads tls-pingpong-50,frames-64k
    python benchmarks/callgrind_per_message.py --source /path/to/other/checkout

Timings on a shared 2-core machine move with whatever else runs; the number
of instructions a server executes per message does not.  For each stack and
workload this starts the echo server under ``valgrind --tool=callgrind``
twice, drives it with the load client for a fixed number of rounds (a short
and a long run), and reports the difference in instructions divided by the
difference in messages: start-up, imports and shutdown cancel out.

What it counts: user-space instructions of the server process (the
interpreter, OpenSSL, libc; a ``memcpy`` counts about one instruction per
byte, so copies show).  What it does not: the kernel (system calls, the
TCP stack) and waiting.  The server runs about 50 times slower under
valgrind, so it batches more than at full speed; compare versions and
stacks with it, not with wall-clock figures.  ``--function-diff`` prints the
functions whose per-message count grew most between the two runs.

Every server is stopped by its PID (SIGINT, then SIGKILL) in a ``finally``.
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import client  # noqa: E402
import run  # noqa: E402

#: Seconds a server under valgrind may take to print its port.
START_TIMEOUT = 180.0
#: Seconds it may take to exit (and write its profile) after SIGINT.
STOP_TIMEOUT = 60.0
#: Rounds of the short and the long run, per kind of workload.
ROUNDS = {"small": (1000, 3000), "pipelined": (20, 80), "large": (300, 900)}


def rounds_for(work: run.Workload) -> tuple[int, int]:
    if work.pipelined:
        return ROUNDS["pipelined"]
    if work.size >= 64 * 1024:
        return ROUNDS["large"]
    return ROUNDS["small"]


def _read_port(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        for _ in range(1000):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                break
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith(b"PORT "):
                return int(line.split()[1])
    raise RuntimeError("the server under valgrind did not report a port")


def one_run(
    stack: run.Stack,
    work: run.Workload,
    rounds: int,
    source: Path,
    tmp: Path,
    tls_pem: str | None,
) -> tuple[int, int, Path]:
    """(instructions, messages, callgrind output) of one server run."""
    out = tmp / f"callgrind.{stack.name}.{work.name}.{rounds}"
    argv = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        sys.executable,
        str(run.SERVERS / stack.script),
        work.mode,
        *stack.extra,
    ]
    if tls_pem is not None:
        argv += ["--tls", tls_pem]
    env = dict(os.environ, PYTHONPATH=str(source))
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    )
    try:
        port = _read_port(proc)
        request, per_round = work.request()
        result: dict[str, Any] = client.run_echo(
            port,
            proc.pid,
            conns=work.conns,
            request=request,
            messages_per_round=per_round,
            duration=1e4,  # (ended by max_rounds)
            warmup=0,
            max_rounds=rounds,
            tls=client.client_tls_context() if work.tls else None,
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()
    text = out.read_text(errors="replace")
    for line in text.splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1]), int(result["messages"]), out
    raise RuntimeError(f"no instruction total in {out}")


def function_counts(path: Path) -> dict[str, int]:
    """Instructions per function (file:function) in one callgrind output."""
    text = subprocess.run(
        ["callgrind_annotate", "--threshold=100", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    counts: dict[str, int] = {}
    for line in text.splitlines():
        match = re.match(r"\s*([\d,]+) \([^)]*\)\s+(\S.*)", line)
        if match and "PROGRAM TOTALS" not in line:
            name = re.sub(r"\s*\[.*\]$", "", match.group(2))
            name = name.rsplit("/", 1)[-1]
            counts[name] = counts.get(name, 0) + int(match.group(1).replace(",", ""))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stacks", default="trionet")
    parser.add_argument(
        "--workloads",
        default="pingpong-50,pipelined-1,frames-64k,tls-pingpong-50",
    )
    parser.add_argument(
        "--source",
        default=str(run.ROOT),
        help="the checkout whose trionet/ the servers import (default: this one)",
    )
    parser.add_argument(
        "--function-diff",
        type=int,
        default=0,
        metavar="N",
        help="also print the N functions that cost most per message",
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed")
    client.raise_fd_limit()
    stacks = run._pick(args.stacks, run.STACKS, "stacks")
    works = run._pick(args.workloads, run.WORKLOADS, "workloads")
    source = Path(args.source).resolve()
    print(f"Server instructions per message (callgrind), trionet from {source}")
    print()
    print("| stack | workload | instructions/message | messages (short, long) |")
    print("|---|---|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="trionet-callgrind-") as name:
        tmp = Path(name)
        pem = run.make_tls_pem(tmp) if any(w.tls for w in works) else None
        for work in works:
            if work.kind != "echo":
                continue
            for stack in stacks:
                if run.skip_reason(stack, work, run.Settings(tls_pem=pem), 1 << 20):
                    continue
                short, long = rounds_for(work)
                tls = pem if work.tls else None
                i1, m1, out1 = one_run(stack, work, short, source, tmp, tls)
                i2, m2, out2 = one_run(stack, work, long, source, tmp, tls)
                per = (i2 - i1) / (m2 - m1)
                print(f"| {stack.name} | {work.name} | {per:,.0f} | {m1:,}, {m2:,} |")
                if args.function_diff:
                    a, b = function_counts(out1), function_counts(out2)
                    rows = sorted(
                        ((b.get(k, 0) - a.get(k, 0)) / (m2 - m1), k)
                        for k in set(a) | set(b)
                    )
                    for value, key in reversed(rows[-args.function_diff :]):
                        print(f"|  | {key[:80]} | {value:,.0f} | |")


if __name__ == "__main__":
    main()
