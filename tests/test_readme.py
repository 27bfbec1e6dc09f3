"""Every Python block of the README runs, in order, in one namespace."""

from __future__ import annotations

import pathlib
import re

import jax

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_examples():
    assert len(python_blocks()) >= 4


def test_readme_python_blocks_run(capsys):
    namespace: dict = {}
    # README code is user code: it runs under JAX's default promotion rules.
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        for block in python_blocks():
            exec(compile(block, str(README), "exec"), namespace)
    assert (
        "['adamax', 'weight_decay', 'learning_rate', 'ema']" in capsys.readouterr().out
    )


def test_readme_test_command_is_the_ci_command():
    ci = (README.parent / ".ci" / "run").read_text()
    command = "python -m pytest -q --doctest-modules adamax_optax tests"
    assert command in README.read_text() and command in ci
