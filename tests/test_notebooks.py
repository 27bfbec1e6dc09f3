"""The notebooks are stored without outputs, and the docs build runs every one.

Each notebook asserts its own results (accuracy reached, parity within tolerance,
the learners tracking the process), so a run that completes is a run whose claims
held. They run once, in the docs build (myst-nb, a fresh kernel each, any error
fails ``sphinx -W``, which ``.ci/run`` runs), not a second time here.
"""

from __future__ import annotations

import pathlib

import nbformat
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["quickstart", "keras_parity", "time_variant"]


def read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def test_every_notebook_is_listed():
    assert sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    notebook = read(name)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("name", NAMES)
def test_the_docs_build_runs_the_notebook(name):
    """Each notebook is in the docs' toctree, and the docs execute notebooks and
    fail on an error."""
    docs = NOTEBOOKS.parent / "docs"
    linked = docs / "notebooks" / f"{name}.ipynb"
    assert linked.resolve() == (NOTEBOOKS / f"{name}.ipynb").resolve()
    assert f"notebooks/{name}" in (docs / "index.md").read_text()
    conf = (docs / "conf.py").read_text()
    assert 'nb_execution_mode = "force"' in conf
    assert "nb_execution_raise_on_error = True" in conf
