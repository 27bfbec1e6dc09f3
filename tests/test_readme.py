"""The README's code runs: Python blocks in one namespace, shell commands checked.

Python blocks are executed in order. Each shell command is either run (the demo), or
checked against what CI runs (tests, lint) and what the package provides (extras).
"""

from __future__ import annotations

import pathlib
import re
import shlex
import subprocess
import sys
from importlib.metadata import metadata

import jax
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def shell_commands() -> list[str]:
    """Every command of the README's bash blocks, comments dropped, ``&&`` split."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.DOTALL):
        for line in block.splitlines():
            code = line.split("  #")[0].strip()
            if code and not code.startswith("#"):
                commands += [part.strip() for part in code.split("&&")]
    return commands


def test_readme_has_its_example():
    assert len(python_blocks()) == 1  # one example; the rest lives in docs/


def test_readme_python_blocks_run():
    namespace: dict = {}
    # README code is user code: it runs under JAX's default promotion rules.
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        for block in python_blocks():
            exec(compile(block, str(README), "exec"), namespace)
    assert float(namespace["loss"]) < 0.05  # the example trained


def test_readme_links_resolve():
    targets = re.findall(r"\]\(((?!https?:)[^)#]+)", README.read_text())
    assert len(targets) >= 10
    for target in targets:
        assert (README.parent / target).exists(), target


TEST_COMMAND = "python -m pytest -q -n 2 --doctest-modules adamax_optax tests"


def test_readme_test_command_is_the_ci_command():
    ci = (README.parent / ".ci" / "run").read_text()
    assert TEST_COMMAND in README.read_text() and f'tests="{TEST_COMMAND}"' in ci


@pytest.mark.parametrize("command", sorted(set(shell_commands())))
def test_readme_shell_command(command, tmp_path):
    words = shlex.split(command)
    ci = (README.parent / ".ci" / "run").read_text()
    if words[:4] == ["python", "-m", "pip", "install"]:
        extras = re.findall(r"\[(.*)\]", words[-1])
        provided = set(metadata("adamax_optax").get_all("Provides-Extra") or [])
        assert words[-2:] == ["-e", words[-1]] and words[-1].startswith(".")
        assert set(",".join(extras).split(",")) - {""} <= provided, command
    elif words[:2] == ["python", "examples/train_digits.py"]:
        # The main job, exactly as written, writing into a scratch directory.
        done = subprocess.run(
            [sys.executable, str(README.parent / words[1]), *words[2:]],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "final test accuracy" in done.stdout
        assert (tmp_path / "adamax_demo.png").stat().st_size > 10_000
    elif words[:2] == ["bash", ".ci/newest-jax"]:
        # The newest jax line: .ci/run runs the README's test command through it.
        assert words[2] == TEST_COMMAND and 'bash .ci/newest-jax "$tests"' in ci
    elif words[0] in ("ruff", "python") and command in ci:
        pass  # run by .ci/run itself (lint, and the test command above)
    else:
        pytest.fail(f"README command not covered by the tests: {command}")


def rendered() -> list:
    """The README's tokens as a CommonMark renderer with tables sees them."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable("table").parse(README.read_text())


def test_readme_renders_its_comparison_table_as_a_table():
    """A stray code fence once turned the table into one code block."""
    tokens = rendered()
    headers = [
        tokens[i + 1].content
        for i, token in enumerate(tokens)
        if token.type == "th_open"
    ]
    assert "`keras.optimizers.Adamax`" in headers and "`optax.adamax`" in headers
    rows = [token for token in tokens if token.type == "tr_open"]
    assert len(rows) >= 15


def test_readme_code_fences_close():
    """Every fenced block closes where it should: the fences the renderer finds
    are exactly the blocks written, each with a language."""
    fences = [token for token in rendered() if token.type == "fence"]
    opened = [
        line for line in README.read_text().splitlines() if line.startswith("```")
    ]
    assert len(fences) * 2 == len(opened)
    assert all(fence.info in ("bash", "python") for fence in fences)
    assert "## Against Keras and optax" not in "".join(f.content for f in fences)
