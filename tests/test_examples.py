"""Every script in examples/ runs its self-test and passes.

Each example starts its own servers on loopback, plays its scenario, checks
the results when given ``--selftest`` and exits non-zero if one is wrong.
New examples are picked up by the glob; ``test_with_trionet.py`` is a pytest
file (run by pytest itself), not a script.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOT_SCRIPTS = {"test_with_trionet.py"}
SCRIPTS = sorted(path for path in EXAMPLES.glob("*.py") if path.name not in NOT_SCRIPTS)


def test_the_examples_are_found() -> None:
    # The glob must not come back empty (and so make every test below vanish).
    names = {path.name for path in SCRIPTS}
    assert {"quickstart.py", "tinyproto_chat.py"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_example_selftest(script: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(script), "--selftest"],
        cwd=EXAMPLES.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, (
        f"{script.name} --selftest exited with {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )
