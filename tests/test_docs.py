"""The documentation's examples run, and the API reference lists every public name.

The site itself is built by ``.ci/run`` (``sphinx -W``: any warning fails it),
which also runs the notebooks; here each page's Python blocks run in order, in
a namespace of their own, as a reader would paste them.
"""

from __future__ import annotations

import pathlib
import re

import jax
import pytest

import adamax_optax

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(
    p
    for p in DOCS.rglob("*.md")
    # Pages written by hand: not the build's output or autosummary's stubs.
    if not {"_build", "_autosummary", "jupyter_execute"} & set(p.parts)
    and p.name != "api.md"
)


def python_blocks(page: pathlib.Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), re.M | re.S)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_examples_run(page):
    blocks = python_blocks(page)
    namespace: dict = {}
    # Documentation code is user code: JAX's default promotion rules.
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        for block in blocks:
            exec(compile(block, str(page), "exec"), namespace)


def test_every_option_page_has_a_runnable_example():
    options = [p for p in (DOCS / "options").glob("*.md") if p.name != "index.md"]
    assert len(options) == 13
    assert all(python_blocks(p) for p in options)


def test_api_reference_lists_every_public_name():
    text = (DOCS / "api.md").read_text()
    listed = set(re.findall(r"^ {4}([A-Za-z_]\w*)$", text, re.M))
    public = {n for n in adamax_optax.__all__ if not n.startswith("__")}
    assert public == listed
