"""Sphinx configuration of the wkr-serving documentation site.

Build it with ``bash scripts/docs.sh`` (warnings are errors); the pages land in
``docs/_build/html``.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

# The local extension (the option table generated from ServerConfig).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ext"))

from wkr_serving.client.version import __version__

project = "wkr-serving"
author = "the wkr-serving authors"
copyright = "the wkr-serving authors"
version = __version__
release = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "sphinxarg.ext",
    "wkr_options",
]

exclude_patterns = ["_build", "_ext"]
# The pages are reStructuredText only (the example READMEs come in through include).
source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
language = "en"

# -- autodoc -------------------------------------------------------------------------
autodoc_member_order = "bysource"
# The docstrings use Sphinx's own fields (:param x:); the types of the documented
# parameters join their descriptions, and the signatures stay short.
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_typehints_format = "short"
autodoc_default_options = {
    "members": True,
    # threading.Thread's run(), documented for Thread's subclasses, means nothing here.
    "exclude-members": "run",
}

# Cross-references to Python's own documentation are written as plain text, so
# the build needs no network (no intersphinx), and nitpicky stays off: the type
# hints name many third-party classes (zmq.Socket, numpy.ndarray) with no target.
nitpicky = False

# -- HTML ----------------------------------------------------------------------------
html_theme = "furo"
html_title = f"wkr-serving {__version__}"
html_static_path: list[str] = []
html_show_sourcelink = False
html_copy_source = False


# -- files included from outside docs/ ------------------------------------------------
# README.rst and the examples' READMEs link to other files of the repository with
# paths relative to themselves (``docs/client.rst``, ``train.py``), which is right on a
# code host but not on this site. When Sphinx includes one of them, a link to a page
# of the site becomes a :doc: reference, and a link to any other file of the
# repository becomes its path as literal text.

DOCS_DIR = Path(__file__).resolve().parent
REPO_DIR = DOCS_DIR.parent
#: Files outside docs/ that are pages of the site (through ``.. include::``).
INCLUDED_PAGES = {
    "README.rst": "quickstart",
    "example/iris/README.rst": "examples/iris",
    "example/keras/README.rst": "examples/keras",
    "example/sentence_embedding/README.rst": "examples/sentence_embedding",
    "example/async_jobs/README.rst": "examples/async_jobs",
    "deploy/README.rst": "deployment",
}
_LINK = re.compile(r"`([^`<]*?)\s*<([^<>`]+)>`(__?)")
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^#")


def _page_of(path: Path) -> str | None:
    """The docname of the site's page made from ``path``, or None."""
    try:
        rel = path.relative_to(REPO_DIR).as_posix()
    except ValueError:
        return None
    if rel in INCLUDED_PAGES:
        return INCLUDED_PAGES[rel]
    if rel.startswith("docs/") and rel.endswith(".rst"):
        return rel[len("docs/"):-len(".rst")]
    return None


def rewrite_links(text: str, base: Path) -> str:
    """``text`` (reStructuredText of a file in ``base``) with its links to repository
    files made into :doc: references or literal paths."""

    def one(match: re.Match[str]) -> str:
        label, target = " ".join(match.group(1).split()), match.group(2).strip()
        if _EXTERNAL.match(target):
            return match.group(0)
        path = (base / target.split("#", 1)[0]).resolve()
        try:
            rel = path.relative_to(REPO_DIR).as_posix() + ("/" if target.endswith("/") else "")
        except ValueError:  # outside the repository: left as it is
            return match.group(0)
        # The label only repeats the path: show the page's title, or the path.
        shown = label.rstrip("/") in ("", target.rstrip("/"), rel.rstrip("/"))
        page = _page_of(path)
        if page is not None:
            return f":doc:`/{page}`" if shown else f":doc:`{label} </{page}>`"
        return f"``{rel}``" if shown else f"{label} (``{rel}``)"

    return _LINK.sub(one, text)


def _on_include_read(app: Any, relative_path: Path, parent_docname: str,
                     content: list[str]) -> None:
    path = (Path(app.srcdir) / relative_path).resolve()
    if DOCS_DIR not in path.parents:
        content[0] = rewrite_links(content[0], path.parent)


def setup(app: Any) -> None:
    app.connect("include-read", _on_include_read)
