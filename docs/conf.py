"""Sphinx configuration of mpinn's documentation site (``make docs``).

The pages are Markdown (myst-parser); the reference is generated from the code at build
time (``_ext/mpinn_docs.py``); ``make docs`` builds with ``-W -n``: any warning, a broken
cross-reference or link to a missing page included, fails the build.
"""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path[:0] = [str(DOCS.parent), str(DOCS / "_ext")]  # this checkout's mpinn, the extension

project = "mpinn"
author = "the mpinn developers"
copyright = "2026, " + author
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "mpinn_docs"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}  # .rst: the generated reference
html_theme = "furo"
html_title = "mpinn"
exclude_patterns = ["_build", "perf/_plots"]
suppress_warnings: list[str] = []  # none: a warning is a failure

# myst: `{ref}`-style labels on headings, and a heading-anchor for every level that pages
# link to (#errors); a link to a missing page or anchor is a warning, hence an error
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]

# autodoc: the public names of mpinn (reference/api.rst); the signatures show the hints,
# the descriptions the numpy-style Parameters / Returns / Raises sections
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "separated"
napoleon_numpy_docstring = True
napoleon_google_docstring = False
# types in the docstrings are prose ("numpy array or str"), shown as written, not linked
napoleon_use_param = False
napoleon_use_rtype = False

# nitpicky: every cross-reference must resolve, but the site is built without network, so
# there is no intersphinx inventory of these libraries; their names are left unlinked
nitpick_ignore_regex = [
    ("py:class", r"(np|numpy|MPI|mpi4py|os|collections\.abc|typing|torch|dataclasses)\..*"),
    ("py:class", r"(Any|Callback|Callable|Iterable|Sequence|Iterator|PathLike)"),
    # internal types in signatures that are not part of the public API
    ("py:class", r"(mpinn_choice|mpinn\.partition\.choice)\.PartitionChoice"),
    ("py:class", r"(mpinn_model|mpinn\.model)\.DistributedModel"),
    # History.epochs's annotation, list[dict[str, Any]], which Sphinx cuts at the comma
    ("py:class", r"list\[dict\[str"),
]
