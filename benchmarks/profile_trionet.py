"""Profile the trionet echo server under load: what costs what, per message.

::

    python benchmarks/profile_trionet.py                       # cProfile + py-spy
    python benchmarks/profile_trionet.py --tool py-spy --workloads pingpong-50
    python benchmarks/profile_trionet.py --stack trio          # the baseline

Two views, each on a fresh server:

* ``cprofile``: the server runs under cProfile.  Exact call counts (calls per
  message), but every Python call pays the profiler's overhead, so small
  functions look more expensive than they are.
* ``py-spy`` (if installed): sampling at 1 kHz from outside the process,
  on-CPU samples only.  Reports self time per function as a share of the
  samples and as µs per message (the share times the server's measured CPU
  per message), and the inclusive share of trionet's own functions.

Writes the report to stdout and ``benchmarks/profile.md``.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pstats
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

#: Paths that count as "trionet's own code" (and stdlib/trio for context).
OWN = (
    "trionet/_connection.py",
    "trionet/_transport.py",
    "trionet/_codec/",
    "trionet/_server.py",
)
PYSPY_RATE = 1000


def _short(path: str) -> str:
    for marker in ("/trionet/", "/trio/", "/anyio/", "/lib/python"):
        at = path.rfind(marker)
        if at >= 0:
            return path[at + 1 :]
    return os.path.basename(path)


def _measure(server: run.Server, work: run.Workload, duration: float) -> dict[str, Any]:
    request, per_round = work.request()
    return client.run_echo(
        server.target,
        server.pid,
        conns=work.conns,
        request=request,
        messages_per_round=per_round,
        duration=duration,
        warmup=0.3,
        tls=client.client_tls_context() if work.tls else None,
    )


def with_cprofile(
    stack: run.Stack,
    work: run.Workload,
    duration: float,
    top: int,
    tls_pem: str | None = None,
) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "server.prof")
        server = run.Server(stack, work.mode, profile=out, tls=tls_pem)
        try:
            result = _measure(server, work, duration)
        finally:
            server.stop()
        for _ in range(50):
            if os.path.exists(out):
                break
            time.sleep(0.1)
        stats = pstats.Stats(out, stream=io.StringIO())
    # The profile covers the whole server life; the warm-up and start-up
    # add a little, so per-message figures are slight overestimates.
    total_msgs = result["messages"] * (1 + 0.3 / max(duration, 0.1))
    rows = []
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (path, line, func), (_cc, ncalls, tottime, cumtime, _callers) in raw.items():
        rows.append((tottime, cumtime, ncalls, f"{_short(path)}:{line} {func}", path))
    rows.sort(reverse=True)
    lines = [
        f"#### cProfile, {work.name} ({result['messages']:,} messages measured, "
        f"{1e6 * result['server_cpu'] / result['messages']:.1f} µs server CPU/msg "
        "with the profiler on)",
        "",
        "| function | self µs/msg | incl. µs/msg | calls/msg |",
        "|---|---:|---:|---:|",
    ]
    for tottime, cumtime, ncalls, name, _path in rows[:top]:
        lines.append(
            f"| `{name}` | {1e6 * tottime / total_msgs:.2f} "
            f"| {1e6 * cumtime / total_msgs:.2f} | {ncalls / total_msgs:.2f} |"
        )
    own = [r for r in rows if any(o in r[4] for o in OWN)]
    own.sort(key=lambda r: r[1], reverse=True)
    lines += [
        "",
        f"trionet's own functions by inclusive time ({work.name}, cProfile):",
        "",
        "| function | self µs/msg | incl. µs/msg | calls/msg |",
        "|---|---:|---:|---:|",
    ]
    for tottime, cumtime, ncalls, name, _path in own[:top]:
        lines.append(
            f"| `{name}` | {1e6 * tottime / total_msgs:.2f} "
            f"| {1e6 * cumtime / total_msgs:.2f} | {ncalls / total_msgs:.2f} |"
        )
    return lines


def with_pyspy(
    stack: run.Stack,
    work: run.Workload,
    duration: float,
    top: int,
    tls_pem: str | None = None,
) -> list[str]:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(pyspy):
        return [f"py-spy is not installed; skipped for {work.name}."]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "stacks.txt")
        with run.Server(stack, work.mode, tls=tls_pem) as server:
            spy = subprocess.Popen(
                [
                    pyspy,
                    "record",
                    "--pid",
                    str(server.pid),
                    "--rate",
                    str(PYSPY_RATE),
                    "--format",
                    "raw",
                    "--output",
                    out,
                    "--nonblocking",
                    "--full-filenames",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                time.sleep(1.0)  # let py-spy attach
                result = _measure(server, work, duration)
            finally:
                spy.send_signal(signal.SIGINT)
                try:
                    spy.wait(30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait(5)
        if not os.path.exists(out):
            err = spy.stderr.read().decode(errors="replace") if spy.stderr else ""
            return [f"py-spy produced no output for {work.name}: {err[-300:]}"]
        with open(out) as f:
            collapsed = f.read().splitlines()
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    total = 0
    for entry in collapsed:
        stack_text, _, count_text = entry.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack_text.split(";")]
        total += count
        if frames:
            self_counts[frames[-1]] += count
        for name in set(frames):
            if any(o in name for o in OWN):
                incl_counts[name] += count
    if not total:
        return [f"py-spy recorded no samples for {work.name}."]
    per_msg = 1e6 * result["server_cpu"] / result["messages"]
    lines = [
        f"#### py-spy, {work.name} ({total:,} on-CPU samples; "
        f"{per_msg:.1f} µs server CPU/msg measured alongside)",
        "",
        "Self time (Python frames; time in C functions and the kernel is charged "
        "to the Python function that called them):",
        "",
        "| function | share | ≈ µs/msg |",
        "|---|---:|---:|",
    ]
    for name, count in self_counts.most_common(top):
        lines.append(
            f"| `{name}` | {100 * count / total:.1f}% | {per_msg * count / total:.2f} |"
        )
    lines += [
        "",
        "trionet's own functions, inclusive:",
        "",
        "| function | share | ≈ µs/msg |",
        "|---|---:|---:|",
    ]
    for name, count in incl_counts.most_common(top):
        lines.append(
            f"| `{name}` | {100 * count / total:.1f}% | {per_msg * count / total:.2f} |"
        )
    return lines


def _frame_name(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)".
    func, _, rest = frame.partition(" (")
    path = rest.rstrip(")").rsplit(":", 1)[0]
    return f"{_short(path)} {func}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="pingpong-50,pipelined-10")
    parser.add_argument("--stack", default="trionet")
    parser.add_argument(
        "--tool", choices=("cprofile", "py-spy", "both"), default="both"
    )
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--output", default=str(HERE / "profile.md"))
    args = parser.parse_args()
    client.raise_fd_limit()
    stack = run._pick(args.stack, run.STACKS, "stacks")[0]
    works = run._pick(args.workloads, run.WORKLOADS, "workloads")
    lines = [
        f"# Profile of the {stack.name} echo server",
        "",
        f"Command: `python benchmarks/profile_trionet.py {' '.join(sys.argv[1:])}`",
        *run.machine(),
        f"- Source: {run.git_state()} (trionet imported live from the checkout)",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        pem = run.make_tls_pem(Path(tmp)) if any(w.tls for w in works) else None
        for work in works:
            if work.kind != "echo":
                continue
            tls = pem if work.tls else None
            lines += ["", f"### {work.name}", "", work.description + ".", ""]
            if args.tool in ("cprofile", "both"):
                lines += [*with_cprofile(stack, work, args.duration, args.top, tls)]
                lines.append("")
            if args.tool in ("py-spy", "both"):
                lines += [*with_pyspy(stack, work, args.duration, args.top, tls), ""]
    report = "\n".join(lines) + "\n"
    print(report)
    Path(args.output).write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
