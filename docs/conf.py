"""Sphinx configuration for trionet's documentation.

Build with warnings as errors::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys
from typing import Any

# Document the trionet next to this directory, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import trionet
import trionet.channels

project = "trionet"
author = "the trionet authors"
copyright = "the trionet authors"
release = trionet.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinxcontrib_trio",
]

# intersphinx (links into the Python and trio docs) is left out on purpose:
# it downloads objects.inv from the network at build time, and the build must
# pass offline with -W.  References to Python and trio objects are written as
# plain literals instead.

# Google-style docstrings only.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_inherit_docstrings = False
# Type names in signatures stay short: "Connection", not "trionet.Connection".
python_use_unqualified_type_names = True
add_module_names = False

default_role = "py:obj"
nitpicky = False
primary_domain = "py"
highlight_language = "python3"

exclude_patterns = ["_build"]
templates_path: list[str] = []

# Values the pages quote, taken from the code so they cannot drift.
rst_epilog = f"""
.. |channels_version| replace:: {trionet.channels.VERSION}
.. |channels_max_name| replace:: {trionet.channels.MAX_NAME_LENGTH}
"""

html_theme = "alabaster"
html_title = f"trionet {release}"
html_theme_options = {
    "description": "Structured-concurrency networking for Trio",
    "fixed_sidebar": True,
    "show_relbars": True,
}
html_sidebars = {
    "**": ["about.html", "navigation.html", "relations.html", "searchbox.html"]
}
# custom.css: code blocks wrap instead of running past the right edge.
html_static_path = ["_static"]


# Public classes live in private modules (trionet._server, ...) and set
# ``__module__`` to their public home ("trionet").  autodoc then reads the
# ``#:`` attribute comments and the source order from the public module's
# source, which holds only re-exports.  Merge what the private modules'
# analyzers found into the public module's analyzer so both are found.


def _public_module(private: str) -> str:
    parts = private.split(".")
    for index, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:index])
    return private


def _merge_private_analyzers(app: Any) -> None:
    import pkgutil

    from sphinx.pycode import ModuleAnalyzer

    for info in pkgutil.walk_packages(trionet.__path__, "trionet."):
        public = _public_module(info.name)
        if public == info.name or info.ispkg or "__" in info.name:
            continue
        # Read the source without importing it: a private module may import
        # what only its users have (the pytest plugin imports pytest), and
        # the docs extra installs only what the documented objects need.
        path = getattr(info.module_finder, "path", None)
        if path is None:
            continue
        source = os.path.join(path, info.name.rpartition(".")[2] + ".py")
        private = ModuleAnalyzer.for_file(source, info.name)
        target = ModuleAnalyzer.for_module(public)
        private.analyze()
        target.analyze()
        for key, lines in private.attr_docs.items():
            target.attr_docs.setdefault(key, lines)
        for name, order in private.tagorder.items():
            target.tagorder.setdefault(name, order)


# napoleon reads the first line of an attribute's or property's docstring as
# "type: description" when it holds a colon.  trionet takes types from
# annotations, so a colon there is prose ("None: autotuned"): hide it from
# napoleon and put it back afterwards.
_COLON = "TRIONET-DOCS-COLON"


def _hide_first_colon(
    app: object, what: str, name: str, obj: object, options: object, lines: list[str]
) -> None:
    if what in {"attribute", "property", "data"}:
        for index, line in enumerate(lines):
            if line.strip():
                lines[index] = line.replace(":", _COLON)
                break


def _restore_colons(
    app: object, what: str, name: str, obj: object, options: object, lines: list[str]
) -> None:
    for index, line in enumerate(lines):
        if _COLON in line:
            lines[index] = line.replace(_COLON, ":")


def _drop_async_with_return(
    app: object,
    what: str,
    name: str,
    obj: object,
    options: object,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str | None, str | None] | None:
    # An @asynccontextmanager function is shown as "async with f(...) as x";
    # its AsyncIterator[...] return annotation only confuses that line.
    import inspect

    if inspect.isasyncgenfunction(getattr(obj, "__wrapped__", None)):
        return signature, None
    return None


def setup(app: Any) -> None:
    app.connect("builder-inited", _merge_private_analyzers)
    # napoleon's own handler runs at the default priority, 500.
    app.connect("autodoc-process-docstring", _hide_first_colon, priority=400)
    app.connect("autodoc-process-docstring", _restore_colons, priority=600)
    app.connect("autodoc-process-signature", _drop_async_with_return)
