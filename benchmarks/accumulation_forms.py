"""Why the accumulation fast path is built as it is (benchmarks/RESULTS.md).

Times the micro-step and the update step of ``adamax(gradient_accumulation_steps=4)``
at 32M float32 parameters in three forms: the chain's ``lax.cond`` through
``tx.update``, ``jit_apply``'s 0/1-trip loop with its ``optimization_barrier``, and
the same loop without the barrier; then the last two with ``loss_scale_factor``,
whose division by the scale is a pure function of g. Prints a markdown table.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adamax_optax import adamax, jit_apply
from adamax_optax._bench import (
    Case,
    compile_case,
    donated,
    measure_bandwidth,
    state_bytes,
)

PARAMETERS = 32 * 2**20
STEPS = 4


def run(
    name: str, make_step: Callable[[Any], Any], word_ms: float, **options: Any
) -> None:
    tx = adamax(gradient_accumulation_steps=STEPS, **options)
    params = {f"w{i}": jnp.ones((PARAMETERS // 8,)) for i in range(8)}
    grads = {k: jnp.full_like(v, 0.5) for k, v in params.items()}
    state = tx.init(params)
    case = Case(name, 5, make_step(tx), (params, state), grads)
    peak = compile_case(case, state_bytes((params, state, grads)))
    step = case.step
    times: dict[int, list[float]] = {k: [] for k in range(STEPS)}
    for _ in range(6 * STEPS):
        phase = int(state["accumulate"].mini_step)
        jax.block_until_ready((params, state))
        start = time.perf_counter()
        params, state = step(params, state, grads)
        jax.block_until_ready((params, state))
        times[phase].append(time.perf_counter() - start)
    micro = np.median(times[1][1:] + times[2][1:]) * 1e3
    update = np.median(times[STEPS - 1][1:]) * 1e3
    print(
        f"| {name} | {micro:.1f} | {micro / word_ms:.1f} | {update:.1f} "
        f"| {update / word_ms:.1f} | {peak:.2f} |"
    )


def main() -> None:
    bandwidth = measure_bandwidth()
    word_ms = 4 * PARAMETERS / bandwidth * 1e3
    print(f"bandwidth {bandwidth / 1e9:.1f} GB/s; one word = {word_ms:.2f} ms")
    print("| form | micro-step ms | words | update step ms | words | peak/(p+s+g) |")
    print("|---|---:|---:|---:|---:|---:|")
    run("tx.update + apply_updates (lax.cond), donated", donated, word_ms)
    run("jit_apply: 0/1-trip fori_loop + barrier", jit_apply, word_ms)
    scaled = "jit_apply, loss_scale_factor=3"
    run(f"{scaled}: with the barrier", jit_apply, word_ms, loss_scale_factor=3.0)
    barrier = jax.lax.optimization_barrier
    jax.lax.optimization_barrier = lambda x: x
    try:
        run("the same loop without the barrier", jit_apply, word_ms)
        run(f"{scaled}: without", jit_apply, word_ms, loss_scale_factor=3.0)
    finally:
        jax.lax.optimization_barrier = barrier


if __name__ == "__main__":
    main()
