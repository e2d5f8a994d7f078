"""Tables and progress, with rich when it is installed and stdout is a terminal.

rich comes from the optional ``cli`` extra and is imported only here, only
when a terminal would show it.  Without it everything is plain text.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

__all__ = ["Progress", "open_progress", "print_table", "rich_available"]


def rich_available() -> bool:
    """Whether rich can be imported."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def _use_rich() -> bool:
    return sys.stdout.isatty() and sys.stderr.isatty() and rich_available()


class Progress(Protocol):
    """Where a running load reports how far it got."""

    #: Seconds between updates.
    interval: float

    def update(self, done: float, total: float, messages: int, errors: int) -> None:
        """``done`` of ``total`` (messages or seconds); counts so far."""


class _PlainProgress:
    """A line on stderr at most once per second."""

    interval = 1.0

    def __init__(self, label: str, unit: str) -> None:
        self._label = label
        self._unit = unit
        self._last = 0.0

    def update(self, done: float, total: float, messages: int, errors: int) -> None:
        now = time.monotonic()
        if now - self._last < 1.0 or not done:
            return
        self._last = now
        if self._unit == "s":
            where = f"{done:.0f}/{total:g} s, {messages:,} messages"
        else:
            where = f"{done:,.0f}/{total:,.0f} messages"
        print(f"{self._label}: {where}, {errors} errors", file=sys.stderr, flush=True)


class _RichProgress:
    interval = 0.1

    def __init__(self, progress: Any, label: str) -> None:
        self._progress = progress
        self._task = progress.add_task(label, total=None, messages=0, errors=0)

    def update(self, done: float, total: float, messages: int, errors: int) -> None:
        self._progress.update(
            self._task, completed=done, total=total, messages=messages, errors=errors
        )


@contextmanager
def open_progress(
    label: str, unit: str, *, json: bool = False
) -> Iterator[Progress | None]:
    """A progress display for one run, or None when nothing should be shown.

    rich's progress bar (on stderr) when stdout and stderr are terminals and
    rich is installed; else plain lines on stderr when stderr is a terminal;
    else nothing.  ``unit`` is "messages" or "s".
    """
    if _use_rich() and not json:
        from rich.console import Console
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[messages]:,} messages"),
            TextColumn("{task.fields[errors]} errors"),
            TimeElapsedColumn(),
        ]
        with RichProgress(
            *columns, console=Console(stderr=True), transient=True
        ) as progress:
            yield _RichProgress(progress, label)
        return
    if sys.stderr.isatty():
        yield _PlainProgress(label, unit)
        return
    yield None


def print_table(
    headers: Sequence[str] | None,
    rows: Sequence[Sequence[str]],
    *,
    header: bool = True,
    right: Sequence[int] = (),
    title: str | None = None,
) -> None:
    """Print ``rows`` as aligned columns on stdout.

    Columns whose index is in ``right`` are right-aligned.  Uses a rich table
    when stdout is a terminal and rich is installed.
    """
    width = max(len(row) for row in rows) if rows else len(headers or ())
    if _use_rich() and _print_rich_table(headers, rows, header, right, title, width):
        return
    lines = [list(headers)] if header and headers is not None else []
    lines += [list(row) for row in rows]
    widths = [
        max(len(line[i]) for line in lines if i < len(line)) for i in range(width)
    ]

    def render(line: Sequence[str]) -> str:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(line)
        ]
        return "  ".join(cells).rstrip()

    if title:
        print(title)
    for number, line in enumerate(lines):
        print(render(line))
        if number == 0 and header and headers is not None:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()


def _print_rich_table(
    headers: Sequence[str] | None,
    rows: Sequence[Sequence[str]],
    header: bool,
    right: Sequence[int],
    title: str | None,
    width: int,
) -> bool:
    """Print a rich table if it fits the terminal; False if it would not."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=title,
        show_header=header and headers is not None,
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for index in range(width):
        name = headers[index] if headers is not None else ""
        table.add_column(
            name, justify="right" if index in right else "left", no_wrap=True
        )
    for row in rows:
        table.add_row(*row)
    console = Console()
    if console.measure(table).maximum > console.width:
        return False
    console.print(table)
    return True
