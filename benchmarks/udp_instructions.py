"""Instructions per datagram of the UDP servers, counted by callgrind.

Timing a server on a shared 2-core machine is noisy; the number of
instructions it executes per datagram is not.  Each server runs under
``valgrind --tool=callgrind`` twice, once echoing ``--count`` datagrams and
once twice as many (the same load as a ``run.py`` workload, with no
warm-up); the difference between the two totals, divided by ``--count``,
is the cost of one datagram, start-up and shut-down cancelling out::

    python benchmarks/udp_instructions.py
    python benchmarks/udp_instructions.py --stacks trionet-serve-udp,trio-udp \\
        --workloads udp-pingpong-50 --count 20000

Needs ``valgrind`` on PATH.  Expect a minute or more per stack and workload:
callgrind runs the server about 50 times slower.  Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import run
import udp_client

#: Seconds any one callgrind measurement may take.
RUN_BOUND = 900.0
#: Seconds a server under callgrind may take to start, and to stop.
START_BOUND = 300.0
STOP_BOUND = 120.0
#: Loss timeout under callgrind, where a round trip takes milliseconds.
SLOW_LOSS_TIMEOUT = 60.0


def total_instructions(out_file: Path) -> int:
    """The ``summary:`` (or ``totals:``) instruction count of a callgrind file."""
    for line in out_file.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out_file}")


def count_once(
    stack: run.Stack, work: run.Workload, datagrams: int, tmp: Path
) -> tuple[int, int]:
    """Instructions of one server run echoing ``datagrams``; and the drops."""
    out = tmp / f"callgrind.{stack.name}.{work.name}.{datagrams}"
    wrapper = (
        "valgrind",
        "--tool=callgrind",
        "--quiet",
        f"--callgrind-out-file={out}",
    )
    with run.Server(stack, work.mode, wrap=wrapper) as server:
        result = udp_client.run_udp(
            server.port,
            server.pid,
            sockets=work.conns,
            window=work.window,
            duration=RUN_BOUND,
            warmup=0.0,
            count=datagrams,
            loss_timeout=SLOW_LOSS_TIMEOUT,
        )
        # Stopped here, not by Server.stop(): callgrind needs longer than
        # its 3 s to write its file.
        os.kill(server.pid, signal.SIGINT)
        server.proc.wait(STOP_BOUND)
    # Only the server process itself: valgrind names no other file here.
    [path] = glob.glob(str(out))
    return total_instructions(Path(path)), int(result["dropped"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stacks", help="comma-separated UDP stack names")
    parser.add_argument("--workloads", help="comma-separated udp-* workload names")
    parser.add_argument("--count", type=int, default=10_000, help="datagrams (N)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not on PATH")
    stacks = run._pick(args.stacks, run.UDP_STACKS, "stacks")
    works = run._pick(
        args.workloads, [w for w in run.WORKLOADS if w.kind == "udp"], "workloads"
    )
    rows = [
        f"Instructions per datagram (callgrind; runs of {args.count:,} and "
        f"{2 * args.count:,} datagrams, difference / {args.count:,}):",
        "",
        "| workload | stack | instructions/datagram | vs trio | dropped |",
        "|---|---|---:|---:|---:|",
    ]
    run.START_TIMEOUT = START_BOUND
    with tempfile.TemporaryDirectory(prefix="trionet-callgrind-") as tmp:
        run.source_root = Path(tmp)
        run.snapshot_trionet(Path(tmp))
        for work in works:
            base = math.nan
            for stack in stacks:
                reason = run.skip_reason(stack, work, run.Settings(), 1 << 20)
                if reason:
                    continue
                print(f"{work.name} {stack.name}", file=sys.stderr, flush=True)
                once, drops1 = count_once(stack, work, args.count, Path(tmp))
                twice, drops2 = count_once(stack, work, 2 * args.count, Path(tmp))
                per = (twice - once) / args.count
                if stack.name == run.UDP_BASELINE:
                    base = per
                ratio = f"{per / base:.2f}x" if base == base else "-"
                rows.append(
                    f"| {work.name} | {stack.name} | {per:,.0f} | {ratio} "
                    f"| {drops1 + drops2} |"
                )
        run.source_root = run.ROOT
    print("\n".join(rows))


if __name__ == "__main__":
    main()
