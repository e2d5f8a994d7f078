"""Shared by the fuzz targets: input as a script of choices, and the atheris run.

Each target turns its raw input into parameters (a delimiter, a limit, chunk
sizes, operations) with :class:`Choices`, which never fails: past the end of
the input every draw returns its smallest value.  The targets need neither
atheris nor hypothesis to run, so tests/test_fuzz_smoke.py can call them with
generated inputs.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

_T = TypeVar("_T")


class Choices:
    """Draws small decisions from the front of a byte string."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def byte(self) -> int:
        """The next byte, or 0 past the end."""
        if self._pos >= len(self._data):
            return 0
        value = self._data[self._pos]
        self._pos += 1
        return value

    def integer(self, limit: int) -> int:
        """A number in ``0..limit`` (inclusive), from up to three bytes."""
        value = 0
        for _ in range(3):
            value = (value << 8) | self.byte()
        return value % (limit + 1)

    def pick(self, options: Sequence[_T]) -> _T:
        """One of ``options``."""
        return options[self.byte() % len(options)]

    def take(self, size: int) -> bytes:
        """Up to ``size`` bytes."""
        out = self._data[self._pos : self._pos + size]
        self._pos += len(out)
        return out

    def rest(self) -> bytes:
        """Everything not drawn yet."""
        out = self._data[self._pos :]
        self._pos = len(self._data)
        return out

    def chunker(self, max_chunk: int) -> list[int]:
        """Up to eight chunk sizes in ``1..max_chunk``, used in turn by :func:`cut`."""
        return [1 + b % max_chunk for b in self.take(8)] or [max_chunk]


def cut(stream: bytes, sizes: Sequence[int]) -> list[bytes]:
    """``stream`` cut into pieces of the given sizes, used in turn."""
    pieces: list[bytes] = []
    pos = 0
    turn = 0
    while pos < len(stream):
        size = sizes[turn % len(sizes)]
        turn += 1
        pieces.append(stream[pos : pos + size])
        pos += size
    return pieces


def _codec_functions() -> list[types.FunctionType]:
    # Every plain function and method written in trionet's codec modules.
    from trionet._codec import _buffer, _decoder, _framing

    found: list[types.FunctionType] = []
    for module in (_buffer, _decoder, _framing):
        candidates: list[Any] = list(vars(module).values())
        for value in list(candidates):
            if isinstance(value, type):
                candidates.extend(vars(value).values())
        for value in candidates:
            if (
                isinstance(value, types.FunctionType)
                and value.__code__.co_filename == module.__file__
                and value not in found
            ):
                found.append(value)
    return found


def run(check: Callable[[bytes], None]) -> None:
    """Fuzz ``check`` with atheris, with coverage feedback from trionet's codec.

    Only the codec is instrumented (instrumenting everything loaded would
    cost most of the speed); ``sys.argv`` takes libFuzzer's options.
    """
    import atheris  # type: ignore[import-untyped]  # atheris ships no types

    for function in _codec_functions():
        atheris.instrument_func(function)
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
