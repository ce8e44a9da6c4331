"""``.. wkr-server-options::``: the table of every server option, made from ServerConfig.

One row per field of :class:`wkr_serving.server.ServerConfig`: the flag and its
aliases, the ``WKR_*`` environment variable, the default and the help text that
``wkr-serving-start -h`` prints. Generated at build time, so a new option appears here
without anyone writing it down.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective


def _default(value: Any) -> str:
    if value is None:
        return "none"
    if value is False:
        return "off"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"``{value}``"


def _cell(text: str) -> str:
    """The help text as one line of plain text: every markup character escaped."""
    return re.sub(r"([\\`*|_<>\[\]])", r"\\\1", " ".join(text.split())) or "\\ "


class ServerOptionsDirective(SphinxDirective):
    """Render the option table of ``wkr-serving-start``."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from wkr_serving.server.config import ENV_PREFIX, ServerConfig

        lines = [
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 22 26 12 40",
            "",
            "   * - flag",
            "     - environment variable",
            "     - default",
            "     - meaning",
        ]
        for f in dataclasses.fields(ServerConfig):
            if "help" not in f.metadata:
                continue
            flags = ", ".join(f"``{flag}``" for flag in (f"-{f.name}", *f.metadata["aliases"]))
            lines += [
                f"   * - {flags}",
                f"     - ``{ENV_PREFIX}{f.name.upper()}``",
                f"     - {_default(f.default)}",
                f"     - {_cell(f.metadata['help'])}",
            ]
        container = nodes.container(classes=["wkr-server-options"])
        self.state.nested_parse(StringList(lines, source="ServerConfig"), self.content_offset,
                                container)
        return [container]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("wkr-server-options", ServerOptionsDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
