"""Sphinx configuration: the Markdown pages of docs/ as a site (MyST), theme furo.

Build it with ``nox -s docs``, or in an environment with the ``docs`` extra::

    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import sys
from pathlib import Path

# The package is imported from this checkout, installed or not (autodoc and the version).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ctxguard

project = "ctxguard"
author = "ctxguard developers"
copyright = "ctxguard developers"
version = release = ctxguard.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
# tests/test_docs.py reads this list: a page left out here need not be in a toctree.
exclude_patterns = ["_build"]

# Anchors for headings down to ###, as GitHub makes them, so that links such as
# runbook.md#ctxguardcontexterrors work on the site as they do on GitHub.
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"

html_theme = "furo"
html_title = f"ctxguard {release}"
