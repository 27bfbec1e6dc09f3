"""Sphinx configuration: optax's stack (sphinx-book-theme, autodoc with
autosummary and napoleon, myst-nb for the notebooks)."""

from __future__ import annotations

import inspect
import os
import pathlib
import re
import socket
import sys

from sphinx.errors import ExtensionError

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KERAS_BACKEND", "jax")

import adamax_optax  # noqa: E402

project = "adamax_optax"
author = "The adamax_optax authors"
copyright = "The adamax_optax authors"
release = adamax_optax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "myst_nb",
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
master_doc = "index"

html_theme = "sphinx_book_theme"
html_title = "adamax_optax"
html_theme_options = {"show_toc_level": 2}

autosummary_generate = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

# The notebooks run here, once, when the docs are built (the tests only check
# that they are stored without outputs); an error in one fails the build.
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_timeout = 600

INTERSPHINX = {
    "jax": ("https://docs.jax.dev/en/latest/", None),
    "optax": ("https://optax.readthedocs.io/en/latest/", None),
    "flax": ("https://flax.readthedocs.io/en/latest/", None),
}


def _online(host: str = "optax.readthedocs.io") -> bool:
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return False
    return True


# Offline (as on the CI machines, which reach package registries only) the links
# to JAX, optax and Flax stay plain text instead of failing the build.
intersphinx_mapping = INTERSPHINX if _online() else {}


def _documented_names() -> set[str]:
    text = (pathlib.Path(__file__).parent / "api.md").read_text()
    return set(re.findall(r"^\s{0,4}([A-Za-z_][A-Za-z0-9_]*)\s*$", text, re.MULTILINE))


def check_api_reference(app, config) -> None:
    """Fails the build when a public name is missing from the API reference."""
    public = {name for name in adamax_optax.__all__ if not name.startswith("__")}
    missing = sorted(public - _documented_names())
    if missing:
        raise ExtensionError(
            f"Public names missing from docs/api.md: {', '.join(missing)}"
        )
    undocumented = sorted(
        name for name in public if not inspect.getdoc(getattr(adamax_optax, name))
    )
    if undocumented:
        raise ExtensionError(f"Public names without a docstring: {undocumented}")


def setup(app) -> None:
    app.connect("config-inited", check_api_reference)
