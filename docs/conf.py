"""Sphinx configuration of gradcomp's manual.

Build (warnings are errors; nothing is fetched):

    PYTHONPATH=src sphinx-build -W --keep-going -b html docs docs/_build/html
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # document this checkout, whatever gradcomp is installed

import gradcomp  # noqa: E402

project = "gradcomp"
author = "the gradcomp authors"
copyright = "the gradcomp authors (MIT licence)"
release = gradcomp.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Markdown: heading anchors so that pages can link to each other's sections (page.md#section)
myst_heading_anchors = 3

# Google-style docstrings (Args:, Returns:, Raises:)
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

html_theme = "furo"
html_title = f"gradcomp {release}"
