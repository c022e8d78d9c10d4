"""Sphinx configuration. Built with -W by tests/test_docs.py, so a broken docstring fails CI."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "hypergrad"
author = "the hypergrad developers"
copyright = "2026, the hypergrad developers"
extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
html_theme = "alabaster"
suppress_warnings = ["myst.header"]
nitpicky = False


def _registered_solvers(app, docname, source):
    """Expand ``<!-- registered-solvers -->`` into one autodoc block per registered solver."""
    from hypergrad.solvers._registry import api_markdown

    source[0] = source[0].replace("<!-- registered-solvers -->", api_markdown())


def setup(app):
    app.connect("source-read", _registered_solvers)
