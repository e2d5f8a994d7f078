"""The API reference (docs/api.rst) names every public object and member.

A text check of the reStructuredText source, so it runs without Sphinx: each
public name of trionet, trionet.testing and trionet.channels must have a
directive on the page, under its own module; each class directive must bring
in every public member -- with ``:members:`` and ``:undoc-members:`` (and
``:inherited-members:`` for members a private base class defines), by naming
it in ``:members:``, or by a hand-written entry inside the directive.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from types import ModuleType

import attrs
import pytest

import trionet
import trionet.channels
import trionet.testing

API = Path(__file__).resolve().parent.parent / "docs" / "api.rst"
MODULES = [trionet, trionet.testing, trionet.channels]

_DIRECTIVE = re.compile(r"^\.\. (?:py:)?(\w+)::\s*([\w.]+)")
_MODULE = re.compile(r"^\.\. (?:module|currentmodule)::\s*([\w.]+)")
_OPTION = re.compile(r"^\s+:([\w-]+):\s*(.*)$")


@attrs.define
class Entry:
    """One top-level directive of the page: what it documents, and how."""

    module: str
    kind: str
    name: str
    options: dict[str, str] = attrs.Factory(dict)
    #: Names of the hand-written entries nested inside the directive.
    nested: set[str] = attrs.Factory(set)


def parse(text: str) -> list[Entry]:
    entries: list[Entry] = []
    module = ""
    current: Entry | None = None
    last_option: str | None = None
    for line in text.splitlines():
        if match := _MODULE.match(line):
            module, current = match.group(1), None
        elif match := _DIRECTIVE.match(line):
            name = match.group(2).rpartition(".")[2]
            where = match.group(2).rpartition(".")[0] or module
            current = Entry(where, match.group(1), name)
            entries.append(current)
            last_option = None
        elif current is not None and line and not line[0].isspace():
            current = None  # prose: the directive is over
        elif current is not None and (option := _OPTION.match(line)):
            last_option = option.group(1)
            current.options[last_option] = option.group(2)
        elif current is not None and (nested := _DIRECTIVE.match(line.strip())):
            current.nested.add(nested.group(2))
            last_option = None
        elif current is not None and last_option and line.startswith("      "):
            current.options[last_option] += " " + line.strip()  # a wrapped list
        elif line.strip():
            last_option = None
    return entries


def public_names(module: ModuleType) -> list[str]:
    return sorted(
        name
        for name in vars(module)
        if not name.startswith("_") and not inspect.ismodule(getattr(module, name))
    )


def public_members(cls: type) -> dict[str, type]:
    """Public members defined by trionet classes, with the class defining each."""
    found: dict[str, type] = {}
    for klass in cls.__mro__:
        if not klass.__module__.startswith("trionet"):
            continue
        for name in vars(klass):
            if not name.startswith("_"):
                found.setdefault(name, klass)
    return found


def uncovered(entry: Entry, cls: type) -> list[str]:
    """The public members of ``cls`` that ``entry`` does not bring in."""
    options = entry.options
    listed = {n.strip() for n in options.get("members", "").split(",") if n.strip()}
    excluded = {
        n.strip() for n in options.get("exclude-members", "").split(",") if n.strip()
    }
    every = "members" in options and not listed and "undoc-members" in options
    missing = []
    for name, owner in public_members(cls).items():
        if name in listed or name in entry.nested:
            continue
        inherited_ok = owner is cls or "inherited-members" in options
        if every and inherited_ok and name not in excluded:
            continue
        missing.append(name)
    return sorted(missing)


ENTRIES = parse(API.read_text(encoding="utf-8"))


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_api_reference_names_every_public_object(module: ModuleType) -> None:
    on_page = {entry.name for entry in ENTRIES if entry.module == module.__name__}
    missing = [name for name in public_names(module) if name not in on_page]
    assert not missing, f"docs/api.rst lacks {module.__name__}: {missing}"


def test_api_reference_shows_every_public_member() -> None:
    incomplete = {}
    for module in MODULES:
        for name in public_names(module):
            cls = getattr(module, name)
            if not inspect.isclass(cls):
                continue
            for entry in ENTRIES:
                if entry.module == module.__name__ and entry.name == name:
                    missing = uncovered(entry, cls)
                    if missing:
                        incomplete[f"{module.__name__}.{name}"] = missing
    assert not incomplete, f"docs/api.rst leaves out members: {incomplete}"


def test_the_check_sees_what_is_left_out() -> None:
    page = """
.. module:: trionet

.. autoclass:: Lines
   :members: encode,
      extract

.. autoclass:: Frames
   :members:
   :undoc-members:
   :exclude-members: header

.. currentmodule:: trionet.testing

.. autoclass:: ResetAfter
   :members:
   :undoc-members:
"""
    entries = {entry.name: entry for entry in parse(page)}
    assert set(entries) == {"Lines", "Frames", "ResetAfter"}
    assert entries["ResetAfter"].module == "trionet.testing"
    assert uncovered(entries["Lines"], trionet.Lines) == sorted(
        set(public_members(trionet.Lines)) - {"encode", "extract"}
    )
    assert uncovered(entries["Frames"], trionet.Frames) == ["header"]
    # send_all and the rest come from a private base class.
    assert "send_all" in uncovered(entries["ResetAfter"], trionet.testing.ResetAfter)
    assert "is_reset" not in uncovered(
        entries["ResetAfter"], trionet.testing.ResetAfter
    )
