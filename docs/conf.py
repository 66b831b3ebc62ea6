"""Sphinx configuration of the rais-jax reference docs (``docs/``)."""

project = "rais-jax"
author = "rais-jax developers"
copyright = "2026, rais-jax developers"  # pylint: disable=redefined-builtin

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Google-style "Args:" / "Returns:" sections
    "sphinx.ext.mathjax",
    "myst_parser",  # the user guide, results and contributing pages are Markdown
]
myst_heading_anchors = 3
suppress_warnings = ["myst.xref_missing"]
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the signatures show them; jax's aliases do not resolve
napoleon_google_docstring = True
napoleon_numpy_docstring = False
default_role = "code"
exclude_patterns = ["_build"]
html_theme = "alabaster"
