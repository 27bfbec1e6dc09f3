"""Optimizer state bytes per parameter, and the update step with 8-bit state.

* The bytes: exact, from ``jax.eval_shape(tx.init, params)``, for a 1M-parameter
  float32 MLP and the same in bfloat16, for each state precision with and
  without the EMA and accumulation.
* The speed: the donated update step (``tx.update`` and ``apply_updates``) at
  32M float32 parameters in 8 leaves, quantized state over float32 state,
  timed interleaved in this process (median and quartiles of the pair ratios).

Run ``python benchmarks/memory.py [--pairs 15] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from cases import micro_step_of
from footprint import donated
from harness import Case, cpu_description, interleaved_ratio, make_tree

from adamax_optax import adamax

MLP_SHAPES = {
    "dense_0/kernel": (784, 1024),
    "dense_0/bias": (1024,),
    "dense_1/kernel": (1024, 256),
    "dense_1/bias": (256,),
    "out/kernel": (256, 10),
    "out/bias": (10,),
}
"""A 1M-parameter MLP (1,068,810): two large kernels, a small one, biases."""

STATES = {
    "float32": dict(state_dtype=jnp.float32),
    "bfloat16": dict(state_dtype=jnp.bfloat16),
    "quantized": dict(quantized_state=True),
    "quantized+bf16": dict(quantized_state=True, state_dtype=jnp.bfloat16),
}
EXTRAS = {
    "": {},
    "EMA": dict(use_ema=True),
    "N=4": dict(gradient_accumulation_steps=4),
    "EMA, N=4": dict(use_ema=True, gradient_accumulation_steps=4),
}


def params_of(dtype: Any) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct(s, dtype) for k, s in MLP_SHAPES.items()}


def bytes_per_parameter(tx: Any, params: Any) -> float:
    """The state's bytes (every array: moments, scales, counters, EMA,
    accumulator, key) over the number of parameters."""
    state = jax.eval_shape(tx.init, params)
    total = sum(
        int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state)
    )
    return total / sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def bytes_rows() -> list[dict[str, Any]]:
    rows = []
    for params_dtype in (jnp.float32, jnp.bfloat16):
        params = params_of(params_dtype)
        for state, options in STATES.items():
            for extra, more in EXTRAS.items():
                rows.append(
                    dict(
                        params=np.dtype(params_dtype).name,
                        state=state,
                        options=extra or "-",
                        bytes_per_parameter=bytes_per_parameter(
                            adamax(**options, **more), params
                        ),
                    )
                )
        if params_dtype == jnp.bfloat16:
            for state in ("bfloat16", "quantized"):
                options = dict(STATES[state], stochastic_rounding=True)
                rows.append(
                    dict(
                        params="bfloat16",
                        state=state,
                        options="stochastic_rounding",
                        bytes_per_parameter=bytes_per_parameter(
                            adamax(**options), params
                        ),
                    )
                )
    return rows


def speed_rows(total: int, leaves: int, pairs: int) -> list[dict[str, Any]]:
    """Quantized over float32 state: the defaults' step, and the update step
    (the 4th call) of ``gradient_accumulation_steps=4``; and bfloat16
    parameters (and gradients) with ``stochastic_rounding`` over without."""

    def case(
        name: str, accumulate: bool, dtype: Any = jnp.float32, **options: Any
    ) -> Case:
        steps = dict(gradient_accumulation_steps=4) if accumulate else {}
        tx = adamax(**options, **steps)
        params = make_tree(total, leaves, dtype, 1.0)
        grads = make_tree(total, leaves, dtype, 0.5)
        phase = (micro_step_of, 3) if accumulate else (None, None)
        return Case(name, 0, donated(tx), (params, tx.init(params)), grads, *phase)

    size = f"{total // 2**20}M in {leaves} leaves"
    rows = []
    for label, accumulate in (("defaults", False), ("N=4 update step", True)):
        quantized = case("quantized", accumulate, quantized_state=True)
        plain = case("float32", accumulate, state_dtype=jnp.float32)
        ratio = interleaved_ratio(quantized, plain, pairs)
        compared = "quantized / float32 state"
        rows.append(dict(case=f"{label}, {size}", compared=compared, **ratio))
        del quantized, plain
    rounded = case("rounded", False, jnp.bfloat16, stochastic_rounding=True)
    plain = case("bfloat16", False, jnp.bfloat16)
    ratio = interleaved_ratio(rounded, plain, pairs)
    compared = "stochastic_rounding / without"
    rows.append(dict(case=f"bfloat16 parameters, {size}", compared=compared, **ratio))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--size", type=int, default=32, help="millions of parameters")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument(
        "--json", type=pathlib.Path, default=pathlib.Path("bench_results_memory.json")
    )
    args = parser.parse_args(argv)
    result: dict[str, Any] = dict(
        jax=jax.__version__, cpu=cpu_description(), bytes=bytes_rows()
    )
    print(f"jax {jax.__version__}, {result['cpu']}")
    print(f"{'params':9} {'state':14} {'options':20} {'state bytes / parameter':>24}")
    for r in result["bytes"]:
        print(
            f"{r['params']:9} {r['state']:14} {r['options']:20} "
            f"{r['bytes_per_parameter']:24.3f}"
        )
    if not args.no_speed:
        result["speed"] = speed_rows(args.size * 2**20, 8, args.pairs)
        print()
        for r in result["speed"]:
            print(
                f"{r['case']}: {r['compared']} = {r['ratio']:.3f} "
                f"[{r['q25']:.3f}, {r['q75']:.3f}] "
                f"({r['a_ms']:.1f} / {r['b_ms']:.1f} ms, {r['pairs']} pairs)"
            )
    args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
