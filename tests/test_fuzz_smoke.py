"""The fuzz targets in fuzz/, run without atheris on generated inputs.

Each target's ``check(data)`` is what atheris calls millions of times; here
hypothesis gives it a few thousand inputs, so a target that rots (or a codec
change that breaks one) shows up in the normal test run.  Each target is
also shown a deliberately broken codec, to prove it would notice.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trionet._codec import ReceiveBuffer

FUZZ_DIR = Path(__file__).resolve().parent.parent / "fuzz"
TARGETS = ["fuzz_lines", "fuzz_frames", "fuzz_mixed"]


@pytest.fixture(scope="module", params=TARGETS)
def target(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    sys.path.insert(0, str(FUZZ_DIR))
    try:
        yield importlib.import_module(request.param)
    finally:
        sys.path.remove(str(FUZZ_DIR))


#: Inputs rich in the bytes the codecs care about: delimiters, small lengths.
_interesting = st.lists(
    st.sampled_from(b"\n\r\x00ab\x01\x02\x04\x08\xff"), max_size=300
).map(bytes)
inputs = st.one_of(st.binary(max_size=300), _interesting)


@settings(max_examples=2000, deadline=None)
@given(data=inputs)
def test_target_accepts_generated_inputs(target: ModuleType, data: bytes) -> None:
    target.check(data)


def test_targets_run_without_atheris(target: ModuleType) -> None:
    # Importing a target must not need atheris; only main() does.
    assert "atheris" not in vars(target)
    assert callable(target.main)


def _caught(check: Callable[[bytes], None], cases: list[bytes]) -> bool:
    """Whether ``check`` reports a defect on any of ``cases``."""
    for data in cases:
        try:
            check(data)
        except AssertionError:
            return True
    return False


# Hand-made inputs that reach each codec path at once: the parameter bytes as
# the targets read them (see each target's check), then the stream.
_LINE_CASES = [
    # b"\n", max_length 100, one byte per chunk, one line at a time.
    bytes([0, 6, 0, *[1] * 8, 0]) + b"hello\nworld\nx" * 3,
    # b"\r\n", max_length 3, batches: a line too long after a good one.
    bytes([1, 3, 5, *[2] * 8, 1]) + b"ok\r\ntoolongline\r\n",
    # b"\n", max_length 100, one byte per chunk, one line at a time, strip_cr.
    bytes([0, 6, 0, *[1] * 8, 2]) + b"dos\r\nunix\nmore\r\n",
    # b"\n", max_length 3, batches, strip_cr: "abc\r" fits, "abcd" does not.
    bytes([0, 3, 5, *[2] * 8, 3]) + b"abc\r\nab\nabcd\r\n",
]
_FRAME_CASES = [
    # 4-byte headers, max_size 256, one byte per chunk, one frame at a time.
    bytes([2, 6, 0, *[3] * 8, 0])
    + b"\x00\x00\x00\x03abc\x00\x00\x00\x01d\x00\x00\x00\x02e",
    # max_size 2 and a header announcing 4 GiB - 1.
    bytes([2, 2, 5, *[1] * 8, 1]) + b"\xff\xff\xff\xff",
]
_MIXED_CASES = [
    # b"\n", max_length 64, 4-byte headers, max_size 64.  Feed a line and a
    # frame, feed two lines, cut a batch of lines and give it back, take a
    # line, a frame, exactly 5 bytes, the rest; stop.
    bytes([0, 4, 2, 3])
    + bytes([0, 14])
    + b"line one\n\x00\x00\x00\x02hi"
    + bytes([0, 19])
    + b"line two\nline three\n"
    + bytes([7, 1, 1, 0, 4, 0, 3, 5, 6, 0, 8]),
]


@pytest.fixture
def targets() -> Iterator[list[ModuleType]]:
    sys.path.insert(0, str(FUZZ_DIR))
    try:
        yield [importlib.import_module(name) for name in TARGETS]
    finally:
        sys.path.remove(str(FUZZ_DIR))


def test_targets_notice_a_codec_that_loses_bytes(
    monkeypatch: pytest.MonkeyPatch, targets: list[ModuleType]
) -> None:
    lines, frames, mixed = targets
    cases = {lines: _LINE_CASES, frames: _FRAME_CASES, mixed: _MIXED_CASES}
    # The hand-made inputs pass against the real codec...
    for module, module_cases in cases.items():
        assert not _caught(module.check, module_cases), module.__name__

    # ...and fail against one that drops the first byte of each message.
    real_line = ReceiveBuffer.extract_line
    real_frame = ReceiveBuffer.extract_frame

    def lossy_line(
        self: ReceiveBuffer, delimiter: bytes, max_length: int
    ) -> bytes | None:
        line = real_line(self, delimiter, max_length)
        return line[1:] if line else line

    def lossy_frame(
        self: ReceiveBuffer, header_size: int, max_size: int
    ) -> bytes | None:
        frame = real_frame(self, header_size, max_size)
        return frame[1:] if frame else frame

    monkeypatch.setattr(ReceiveBuffer, "extract_line", lossy_line)
    monkeypatch.setattr(ReceiveBuffer, "extract_frame", lossy_frame)
    for module, module_cases in cases.items():
        assert _caught(module.check, module_cases), module.__name__


def test_targets_notice_a_buffer_over_its_bound(
    monkeypatch: pytest.MonkeyPatch, targets: list[ModuleType]
) -> None:
    # A line codec that never refuses a long line: it keeps buffering.
    lines = targets[0]
    real_line = ReceiveBuffer.extract_line

    def unbounded(
        self: ReceiveBuffer, delimiter: bytes, max_length: int
    ) -> bytes | None:
        return real_line(self, delimiter, 1 << 30)

    monkeypatch.setattr(ReceiveBuffer, "extract_line", unbounded)
    # b"\n", max_length 0, chunks of up to 4096 bytes, one line at a time.
    assert _caught(lines.check, [bytes([0, 0, 5, *[9] * 8, 0]) + b"long"])
