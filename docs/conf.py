"""Sphinx configuration of the hypercolumn_ops documentation.

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The API reference is generated from the docstrings (autodoc, Google-style sections read by
napoleon); the Markdown pages are read by myst-parser. autodoc imports the package, so build in an
environment where ``import hypercolumn_ops`` works (the compiled extension is optional).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import hypercolumn_ops  # noqa: E402

project = "hypercolumn_ops"
author = "hypercolumn_ops contributors"
copyright = "hypercolumn_ops contributors"
release = hypercolumn_ops.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Headings get anchors, so that pages link to sections as [text](page.md#section).
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Types only for the parameters a docstring describes (its Args list the shapes).
autodoc_typehints_description_target = "documented"
# Each directive of api.rst names the members it documents (the modules' public names).
autodoc_default_options = {}

napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "alabaster"
html_title = f"hypercolumn_ops {release}"
