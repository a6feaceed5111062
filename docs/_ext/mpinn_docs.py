"""Pages made from the code at build time, so that they cannot drift from it.

Directives (used in the reStructuredText pages of docs/reference/, ``.. mpinn-cli::`` and so
on; the rest of the site is Markdown):

- ``mpinn-cli``: every command and flag of ``mpinn.cli.parser.build_parser()``, its help,
  choices and default.
- ``mpinn-config``: the keys a ``--config`` TOML file takes, per command (the flags'
  destinations, as ``cli.parser.parse`` reads them), with their TOML type, and which
  training settings a run continues from the model file (``config.TrainConfig``).
- ``mpinn-api``: an autodoc entry for every name in ``mpinn.__all__``.
- ``mpinn-perf-runs NAME`` (in the Markdown performance pages): the dated runs of
  ``docs/perf/NAME.json`` that the page's plot draws.

Checks (warnings, which ``make docs`` turns into errors): every ``MPINN_*`` name and every
name read from ``os.environ`` in ``mpinn/`` is on the environment-variables page.

Plots: every ``docs/perf/*.json`` is drawn by ``docs/perf/plots.py`` into
``docs/perf/_plots/`` (not kept in git) before the pages are read.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

LOG = logging.getLogger(__name__)
DOCS = Path(__file__).resolve().parent.parent
PACKAGE = DOCS.parent / "mpinn"


def _rst(directive: SphinxDirective, lines: list[str]) -> list[nodes.Node]:
    """Parse reStructuredText made by a directive, as if it stood in the page (an .rst page:
    the directives are used from docs/reference/*.rst), section titles included."""
    node = nodes.section()
    node.document = directive.state.document
    nested_parse_with_titles(directive.state, StringList(lines, source="mpinn_docs"), node)
    return node.children


def _literal(text: str) -> str:
    return f"``{text}``" if text else ""


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _help_of(parser: argparse.ArgumentParser, name: str) -> str:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return next((c.help or "" for c in action._choices_actions if c.dest == name), "")


def _escape(text: str) -> str:
    """Help text as literal prose: no reStructuredText markup inside it."""
    return re.sub(r"([*`|_\\])", r"\\\1", " ".join(str(text).split()))


def _flag_lines(parser: argparse.ArgumentParser) -> list[str]:
    lines = [".. list-table::", "   :header-rows: 1", "   :widths: 30 70", "",
             "   * - flag", "     - meaning"]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.option_strings:
            name = ", ".join(action.option_strings)
            if action.nargs != 0:
                name += " " + (action.metavar or action.dest.upper())
        else:
            name = action.metavar or action.dest
        text = _escape(action.help or "")
        if action.choices is not None and not isinstance(action.choices, dict):
            text += (" " if text else "") + "Choices: " + ", ".join(
                _literal(str(c)) for c in action.choices) + "."
        if action.option_strings and action.nargs != 0 and action.default not in (
                None, argparse.SUPPRESS):
            text += f" Default: {_literal(str(action.default))}."
        if action.required and action.option_strings:
            text += " Required."
        lines += [f"   * - ``{name}``", f"     - {text or '(no help text)'}"]
    return lines + [""]


class CliDirective(SphinxDirective):
    """Every command of ``mpinn`` with its usage and every flag."""

    def run(self) -> list[nodes.Node]:
        from mpinn.cli.parser import build_parser
        parser = build_parser()
        lines = ["Global flags, given before the command:", "", *_flag_lines(parser)]
        for name, command in _subcommands(parser).items():
            title = f"mpinn {name}"
            usage = " ".join(command.format_usage().split())
            lines += [".. _cli-" + name + ":", "", title, "~" * len(title), "",
                      _escape(_help_of(parser, name)), "", "::", "", "   " + usage, "",
                      *_flag_lines(command)]
        return _rst(self, lines)


TOML_KIND = {int: "whole number", float: "number", str: "text"}


def _toml_kind(action: argparse.Action) -> str:
    from mpinn.cli.parser import LIST_FLAGS, replicas_value
    if isinstance(action, argparse._StoreTrueAction):
        return "true or false"
    if action.type is replicas_value:
        return 'whole number or "auto"'
    if action.dest in LIST_FLAGS:
        return 'text "a,b,c" or a list'
    kind = TOML_KIND.get(action.type or str, "text")
    if action.choices is not None:
        kind += ": " + ", ".join(f'"{c}"' for c in action.choices)
    return kind


class ConfigDirective(SphinxDirective):
    """The keys of a ``--config`` file: each command's flags, spelt without ``--``."""

    def run(self) -> list[nodes.Node]:
        from mpinn.cli.parser import build_parser
        from mpinn.config import RUN_DEFAULTS
        parser = build_parser()
        lines: list[str] = []
        for name, command in _subcommands(parser).items():
            keys = [a for a in command._actions if a.option_strings
                    and not isinstance(a, argparse._HelpAction)]
            title = f"[{name}]"
            lines += [title, "~" * len(title), "", ".. list-table::", "   :header-rows: 1",
                      "   :widths: 25 35 40", "", "   * - key", "     - TOML value",
                      "     - left out"]
            for action in keys:
                key = action.option_strings[-1].lstrip("-")
                if action.dest in RUN_DEFAULTS and name == "train":
                    left = ("the model's last run, else "
                            f"``{RUN_DEFAULTS[action.dest]}``" if RUN_DEFAULTS[action.dest]
                            is not None else "the model's last run, else the stored rates")
                elif action.default in (None, argparse.SUPPRESS, False):
                    left = "not set"
                else:
                    left = f"``{action.default}``"
                lines += [f"   * - ``{key}``", f"     - {_escape(_toml_kind(action))}",
                          f"     - {left}"]
            lines.append("")
        return _rst(self, lines)


class ApiDirective(SphinxDirective):
    """An autodoc entry for every public name of ``mpinn`` (``mpinn.__all__``)."""

    def run(self) -> list[nodes.Node]:
        import mpinn
        lines: list[str] = []
        for name in mpinn.__all__:
            value = getattr(mpinn, name)
            if isinstance(value, type) and issubclass(value, BaseException):
                lines += [f".. autoexception:: mpinn.{name}", ""]
            elif isinstance(value, type):
                lines += [f".. autoclass:: mpinn.{name}", "   :members:", ""]
            else:
                lines += [f".. py:data:: mpinn.{name}", f"   :value: {value!r}", "",
                          f"   {_escape(DATA_DOCS[name])}", ""]
        return _rst(self, lines)


class PerfRunsDirective(SphinxDirective):
    """The runs of a performance JSON file (``docs/perf/NAME.json``), newest first: date,
    machine, command, where the figures come from. Used in the Markdown pages, so the table
    is Markdown."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        import json
        path = DOCS / "perf" / f"{self.arguments[0]}.json"
        self.env.note_dependency(str(path))
        runs = json.loads(path.read_text())["runs"]
        cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731
        lines = ["| date | what | machine | command | figures from |", "|---|---|---|---|---|"]
        for run in runs:
            lines.append(f"| {run['date']} | {cell(run['title'])} | {cell(run['machine'])} | "
                         f"`{cell(run['command'])}` | {cell(run.get('source', 'its --json'))} |")
        node = nodes.container()
        node.document = self.state.document
        self.state.nested_parse(StringList(lines, source=str(path)), 0, node)
        return node.children


DATA_DOCS = {
    "__version__": "The version of the installed mpinn.",
    "OPTIMIZERS": "The optimizers by the name that fit(optimizer=...) and train --optimizer take.",
    "SCHEDULES": "The learning-rate schedules by the name that fit(schedule=...) and train "
                 "--schedule take.",
}

ENV_PAGE = DOCS / "reference" / "environment.md"


def check_environment(app: Sphinx) -> None:
    """Warn for every environment variable mpinn reads that the reference page misses."""
    page = ENV_PAGE.read_text()
    found: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        found |= set(re.findall(r"\bMPINN_[A-Z_]+\b", text))
        found |= set(re.findall(r"environ(?:\.get)?\(\s*[\"']([A-Z_]+)[\"']", text))
        found |= set(re.findall(r"environ\[\s*[\"']([A-Z_]+)[\"']\s*\]", text))
        found |= set(re.findall(r"env\.get\(\s*[\"']([A-Z_]+)[\"']", text))
        found |= set(re.findall(r"env\[\s*[\"']([A-Z_]+)[\"']\s*\]", text))
    for name in sorted(found):
        if f"`{name}`" not in page:
            LOG.warning("environment variable %s is read in mpinn/ but not described in %s",
                        name, ENV_PAGE.relative_to(DOCS))


def draw_plots(app: Sphinx) -> None:
    """Draw every performance JSON into docs/perf/_plots/ before the pages are read."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("mpinn_perf_plots", DOCS / "perf" / "plots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.draw_all(DOCS / "perf", DOCS / "perf" / "_plots")


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("mpinn-cli", CliDirective)
    app.add_directive("mpinn-config", ConfigDirective)
    app.add_directive("mpinn-api", ApiDirective)
    app.add_directive("mpinn-perf-runs", PerfRunsDirective)
    app.connect("builder-inited", check_environment)
    app.connect("builder-inited", draw_plots)
    return {"parallel_read_safe": True, "version": "1"}
