"""``python benchmarks/kernels.py``: the kernels of the optimizer part of a step.

A structural count, free of timing noise and valid for any backend: the number of
XLA fusions, loops and conditionals, in every computation of the compiled program,
of one donated ``tx.update`` then ``optax.apply_updates``, for 8, 100 and 1000
float32 leaves of 32x32. Each configuration is counted grouped (the library's
form: the small leaves of a shape that ``_grouping.MIN_SHARED`` leaves or more
share, stacked at most ``_grouping.MAX_MEMBERS`` a group; fewer stay per leaf)
and per leaf (``MAX_MEMBERS = 1``), to show what grouping removes: grouped, the
count grows with the groups, plus one parameter write per leaf.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from footprint import donated
from peers import FULL_OPTIONS

from adamax_optax import _grouping, adamax

CONFIGURATIONS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adamax()": lambda: adamax(),
    "clip+decay+EMA, N=4": lambda: adamax(
        **FULL_OPTIONS, gradient_accumulation_steps=4
    ),
}
KERNEL = re.compile(r"=\s*\S+\s+(fusion|while|conditional)\(")
"""An instruction that runs as a kernel of its own: a fusion, a loop, a conditional."""


def kernels(tx: optax.GradientTransformation, leaves: int) -> int:
    """The kernels of one donated update + apply step over ``leaves`` leaves."""
    params = {f"w{i:04d}": jnp.zeros((32, 32)) for i in range(leaves)}
    state = jax.eval_shape(tx.init, params)
    compiled = donated(tx).lower(params, state, params).compile()
    return sum(1 for line in compiled.as_text().splitlines() if KERNEL.search(line))


def count(leaf_counts: Sequence[int]) -> list[dict[str, Any]]:
    """One row per configuration and leaf count: kernels per leaf and grouped."""
    rows = []
    default = _grouping.MAX_MEMBERS
    for name, make in CONFIGURATIONS.items():
        for leaves in leaf_counts:
            row: dict[str, Any] = dict(configuration=name, leaves=leaves)
            for form, members in (("per_leaf", 1), ("grouped", default)):
                _grouping.MAX_MEMBERS = members
                try:
                    row[form] = kernels(make(), leaves)
                finally:
                    _grouping.MAX_MEMBERS = default
            rows.append(row)
            print(
                f"{name:22s} {leaves:5d} leaves: {row['per_leaf']:5d} per leaf, "
                f"{row['grouped']:5d} grouped",
                flush=True,
            )
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/kernels.py",
        description="Kernels (XLA fusions, loops, conditionals) of the optimizer "
        "part of a step, by leaf count, per leaf and grouped.",
    )
    parser.add_argument("--leaves", type=int, nargs="+", default=[8, 100, 1000])
    parser.add_argument("--json", default="bench_results_kernels.json")
    args = parser.parse_args(argv)
    result = dict(jax=jax.__version__, rows=count(args.leaves))
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
