"""The tutorials run as written: every command block is executed and its quoted output checked.

The convention of the pages in docs/tutorials/ (docs/guides/testing.md says it too):

* A ```` ```console ```` block is run. Its lines that start with ``$ `` are commands (a
  trailing ``\\`` continues one on the next line), run one after another by bash in one
  temporary directory per page, which holds links to the checkout's ``data/`` and
  ``examples/``; ``python`` is this environment's. Every other non-empty line is output
  the text quotes: it must match a line that its command printed, in order, token by
  token, numbers within the page's tolerance. A quoted line ending in ``...`` checks only
  the tokens before it; a line that is only ``...`` checks nothing.
* A ```` ```python ```` block right after a MyST comment ``% file: NAME`` is written to NAME
  in that directory before the page's commands run.
* ``% doctest: tolerance R`` sets the page's relative tolerance for numbers (default 0);
  ``% doctest: skip REASON`` marks a page whose commands need what a test cannot have
  (a SLURM cluster, network namespaces), and says which test runs them instead.

``python tests/system/test_docs.py PAGE.md`` runs one page and prints each command's output.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = ROOT / "docs" / "tutorials"
ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
       "OMPI_MCA_mpi_yield_when_idle": "1", "PYTHONPATH": str(ROOT),
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
NUMBER = re.compile(r"^[(\[]?[-+]?(\d[\d,]*\.?\d*|\.\d+)(e[-+]?\d+)?[%x)\],:;]*$")
COMMAND_TIMEOUT = 120
# pages run side by side: their commands mostly start Python and MPI, which leaves room on
# 2 cores (measured under a load of about 2: one page at a time 146 s, three 59 s)
WORKERS = int(os.environ.get("MPINN_DOCS_WORKERS", "3"))


@dataclass
class Step:
    """One command of a page and the output lines its text quotes."""

    command: str
    quoted: list[str] = field(default_factory=list)


@dataclass
class Page:
    path: Path
    files: dict[str, str] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    tolerance: float = 0.0
    skip: str | None = None


def read_page(path: Path) -> Page:
    """The files, commands and quoted outputs of a tutorial, in the order of the text."""
    page = Page(path)
    lines = path.read_text().splitlines()
    pending_file = None
    i = 0
    while i < len(lines):
        line = lines[i]
        directive = re.match(r"^%\s*doctest:\s*(\w+)\s*(.*)$", line)
        if directive:
            key, value = directive.groups()
            if key == "tolerance":
                page.tolerance = float(value)
            elif key == "skip":
                page.skip = value.strip() or "skipped"
            else:
                raise ValueError(f"{path}: unknown doctest directive {key!r}")
        named = re.match(r"^%\s*file:\s*(\S+)\s*$", line)
        if named:
            pending_file = named.group(1)
        fence = re.match(r"^(`{3,})\s*(\S*)", line)
        if fence:  # a MyST directive (```{literalinclude} ...) is skipped like any other
            ticks, language = fence.groups()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(ticks)
                       and lines[j].strip() == ticks)
            body = lines[i + 1:end]
            if language == "python" and pending_file:
                page.files[pending_file] = "\n".join(body) + "\n"
            elif language == "console":
                page.steps += _steps(body)
            pending_file = None
            i = end
        i += 1
    return page


def _steps(body: list[str]) -> list[Step]:
    steps: list[Step] = []
    continuing = False
    for line in body:
        if continuing:
            steps[-1].command += "\n" + line
            continuing = line.endswith("\\")
        elif line.startswith("$ "):
            steps.append(Step(line[2:]))
            continuing = line.endswith("\\")
        elif line.strip() and steps:
            steps[-1].quoted.append(line)
    return steps


def _number(token: str) -> float | None:
    if not NUMBER.match(token):
        return None
    try:
        return float(token.strip("()[]%x,:;").replace(",", ""))
    except ValueError:
        return None


def tokens_match(quoted: str, printed: str, tolerance: float) -> bool:
    """Whether a printed line is the quoted one: the same words, numbers within tolerance."""
    want, got = quoted.split(), printed.split()
    prefix = bool(want) and want[-1] == "..."
    if prefix:
        want = want[:-1]
        got = got[:len(want)]
    if len(want) != len(got):
        return False
    for a, b in zip(want, got, strict=True):
        x, y = _number(a), _number(b)
        if x is not None and y is not None:
            if not math.isclose(x, y, rel_tol=tolerance, abs_tol=1e-12):
                return False
        elif a != b:
            return False
    return True


def check_output(step: Step, output: str, tolerance: float) -> list[str]:
    """The quoted lines the output lacks (matched in order)."""
    printed = output.splitlines()
    missing = []
    at = 0
    for quoted in step.quoted:
        if quoted.strip() == "...":
            continue
        found = next((j for j in range(at, len(printed))
                      if tokens_match(quoted, printed[j], tolerance)), None)
        if found is None:
            missing.append(quoted)
        else:
            at = found + 1
    return missing


def run_page(page: Page, where: Path, show: bool = False) -> list[str]:
    """Run a page's commands in ``where``; the problems found, one line each."""
    for name in ("data", "examples"):
        (where / name).symlink_to(ROOT / name)
    for name, text in page.files.items():
        (where / name).write_text(text)
    problems = []
    for step in page.steps:
        started = time.perf_counter()
        result = subprocess.run(["bash", "-c", step.command], cwd=where, env=ENV,
                                capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
        output = result.stdout + result.stderr
        if show:
            print(f"$ {step.command}   # {time.perf_counter() - started:.1f} s\n{output}")
        if result.returncode != 0:
            problems.append(f"`{step.command}` exited {result.returncode}:\n{output}")
            break
        for quoted in check_output(step, output, page.tolerance):
            problems.append(f"`{step.command}`: the page quotes {quoted!r}, not printed "
                            f"(tolerance {page.tolerance}):\n{output}")
    return problems


PAGES = sorted(TUTORIALS.glob("*.md"))


@pytest.fixture(scope="module")
def page_problems(tmp_path_factory) -> dict[Path, list[str]]:
    """Every runnable tutorial run once, ``WORKERS`` pages at a time: page -> problems."""
    pages = [page for page in map(read_page, PAGES) if not page.skip]
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        running = {page.path: pool.submit(run_page, page, tmp_path_factory.mktemp(page.path.stem))
                   for page in pages}
    return {path: future.result() for path, future in running.items()}


def test_the_tutorials_have_commands_to_run():
    assert PAGES, "no tutorials found"
    for path in PAGES:
        page = read_page(path)
        assert page.steps or page.skip, f"{path.name}: no ```console block and no skip reason"


@pytest.mark.timeout(600)  # the first one waits for every page (page_problems): 50-200 s measured
@pytest.mark.parametrize("path", PAGES, ids=[p.stem for p in PAGES])
def test_a_tutorial_runs_as_written_and_prints_what_it_quotes(path, page_problems):
    page = read_page(path)
    if page.skip:
        pytest.skip(page.skip)
    problems = page_problems[path]
    assert not problems, "\n".join(problems)


README = ROOT / "README.md"
# the install, which make setup and make test-pip run (tests/system/test_pip_install.py)
INSTALL = ("make ", "source ", "python3 -m venv ")


def readme_blocks() -> list[tuple[str, list[str], str | None]]:
    """README's code blocks: (language, lines, the file of an ``<!-- excerpt of F -->``)."""
    lines = README.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(\S*)", lines[i])
        if fence:
            end = lines.index("```", i + 1)
            excerpt = re.match(r"^<!-- excerpt of (\S+) -->$", lines[i - 1]) if i else None
            blocks.append((fence.group(1), lines[i + 1:end], excerpt and excerpt.group(1)))
            i = end
        i += 1
    return blocks


def _normal(command: str) -> str:
    """A command as the README and a tutorial may both write it: no comment, no --quiet
    (the tutorials keep training quiet where the README shows no output)."""
    command = re.split(r"\s+#\s", command)[0].replace(" --quiet", "")
    return " ".join(command.split())


def test_every_readme_command_is_run_by_a_tutorial():
    tutorials = {_normal(step.command) for path in PAGES for step in read_page(path).steps}
    commands = [line for language, body, _ in readme_blocks() if language == "sh"
                for line in body if line.strip() and not line.startswith(INSTALL)]
    assert commands
    missing = [line for line in commands if _normal(line) not in tutorials]
    assert not missing, f"README commands no tutorial runs: {missing}"


def test_every_readme_script_is_a_tutorial_file_or_names_what_it_is_an_excerpt_of():
    files = {text for path in PAGES for text in read_page(path).files.values()}
    for language, body, excerpt in readme_blocks():
        if language != "python":
            continue
        if excerpt:
            assert (ROOT / excerpt).is_file(), excerpt
        else:
            assert "\n".join(body) + "\n" in files, f"README script no tutorial runs:\n{body}"


def test_every_performance_figure_has_its_date_machine_command_and_role():
    """docs/perf/*.json, which the performance pages plot (benchmarks/perf_record.py)."""
    files = sorted((ROOT / "docs" / "perf").glob("*.json"))
    assert {f.stem for f in files} >= {"train_mlp", "sparse_dnn", "cluster", "servers"}
    for path in files:
        record = json.loads(path.read_text())
        assert record["benchmark"] == path.stem and record["runs"], path
        dates = [run["date"] for run in record["runs"]]
        assert dates == sorted(dates, reverse=True), f"{path.name}: runs not newest first"
        for run in record["runs"]:
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", run["date"]), path
            assert run["machine"] and run["command"].startswith(("python ", "bash ", "PARTS=")), path
            assert run["results"] or run.get("predicted"), path
            for result in run["results"]:
                assert result["role"] in ("mpinn", "peer", "ceiling"), result
                assert result["value"] > 0, result


def test_quoted_numbers_match_within_the_tolerance_and_words_exactly():
    assert tokens_match("loss 0.130555  accuracy 0.9667", "loss 0.13  accuracy 0.97", 0.01)
    assert not tokens_match("loss 0.130555", "loss 0.15", 0.01)
    assert not tokens_match("accuracy 0.9667", "accurac 0.9667", 0.5)
    assert tokens_match("epoch 20  loss 0.05 ...", "epoch 20 loss 0.05 samples/s 26,000", 0)
    assert tokens_match("85,002 parameters (0.32 MiB)", "85,002 parameters (0.32 MiB)", 0)


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        with tempfile.TemporaryDirectory(prefix="mpinn-docs-") as tmp:
            found = run_page(read_page(Path(argument)), Path(tmp), show=True)
            print("\n".join(found) if found else f"{argument}: as quoted")
