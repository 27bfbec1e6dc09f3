"""How a case is timed: the bandwidth probe, compile and step timing, and
interleaved ratios with their statistics.

A :class:`Case` is one jitted step with its buffers; :func:`time_case` gives its
median, :func:`interleaved_ratio` its time over another case's, timed A B A B in
this process, and :func:`over_floor` its time over the memory-bandwidth floor of
its words, timed the same way against a donated elementwise kernel.
"""

from __future__ import annotations

import dataclasses
import pathlib
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from footprint import peak_bytes


@dataclasses.dataclass
class Case:
    """One timed configuration: its step function, state and floor words."""

    name: str
    words: int
    step: Callable[..., Any]
    state: Any
    grads: Any
    # The micro-step index of (params, state), for accumulation.
    phase: Callable[[Any], int] | None = None
    wanted_phase: int | None = None
    peer: str | None = None


def make_tree(
    total: int, leaves: int, dtype: Any, value: float
) -> dict[str, jax.Array]:
    """``leaves`` arrays holding ``total`` parameters together."""
    size = total // leaves
    return {f"w{i:04d}": jnp.full((size,), value, dtype) for i in range(leaves)}


def state_bytes(state: Any) -> int:
    return sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if hasattr(x, "size")
    )


def cpu_description() -> str:
    """The host CPU's model and its widest x86 vector extension, where Linux
    says: a compute-bound kernel's time follows the vector width (the 8-bit
    state's update step measured 1.02-1.11x float32 state's on one 2-core
    machine, 1.4-1.9x on a 2-core AVX2 one)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = {
        key.strip(): value.strip()
        for key, value in (
            line.split(":", 1) for line in text.splitlines() if ":" in line
        )
    }
    flags = set(fields.get("flags", "").split())
    widest = next(
        (f for f in ("avx512f", "avx2", "avx", "sse4_2") if f in flags), "none"
    )
    return f"{fields.get('model name', platform.machine())}, {widest}"


def default_bandwidth_elements() -> int:
    """64M float32 on a CPU (past its caches); 1G on an accelerator (4 GiB)."""
    return 64 * 2**20 if jax.default_backend() == "cpu" else 2**30


def measure_bandwidth(elements: int | None = None, repeats: int = 15) -> float:
    """Bytes per second of a donated float32 scale: read once, write once."""
    elements = elements or default_bandwidth_elements()
    scale = jax.jit(lambda x: x * 1.0001, donate_argnums=0)
    x = scale(jnp.ones((elements,), jnp.float32))
    x.block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x = scale(x)
        x.block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * 4 * elements / float(np.median(times))


def compile_case(case: Case, total_bytes: int) -> float | None:
    """Compiles a jitted step ahead of time (``case.step`` becomes the executable).

    Returns XLA's peak (arguments + outputs - aliased + temporaries) over
    p + s + g, or None for a step that is not one jitted function (Keras).
    """
    lower = getattr(case.step, "lower", None)
    if lower is None:
        return None
    case.step = lower(*case.state, case.grads).compile()
    peak = peak_bytes(case.step)
    if peak is None:
        return None
    return peak / total_bytes


def time_case(case: Case, repeats: int) -> tuple[float, float]:
    """Median seconds of the case's step, and its first call (with any compile)."""
    params, state = case.state
    start = time.perf_counter()
    params, state = case.step(params, state, case.grads)
    jax.block_until_ready((params, state))
    first = time.perf_counter() - start
    times = []
    while len(times) < repeats:
        if case.phase is not None and case.phase((params, state)) != case.wanted_phase:
            params, state = case.step(params, state, case.grads)
            continue
        jax.block_until_ready((params, state))
        start = time.perf_counter()
        params, state = case.step(params, state, case.grads)
        jax.block_until_ready((params, state))
        times.append(time.perf_counter() - start)
    case.state = (params, state)
    return float(np.median(times)), first


def step_time(case: Case) -> float:
    """Seconds of one call of the case's step in its wanted phase (calls outside
    that phase advance it untimed)."""
    params, state = case.state
    while case.phase is not None and case.phase((params, state)) != case.wanted_phase:
        params, state = case.step(params, state, case.grads)
    jax.block_until_ready((params, state))
    start = time.perf_counter()
    params, state = case.step(params, state, case.grads)
    jax.block_until_ready((params, state))
    case.state = (params, state)
    return time.perf_counter() - start


SPREAD_TOO_WIDE = 0.10
"""A ratio whose interquartile range exceeds this fraction of its median is
reported as inconclusive: the machine was too noisy to tell."""


def interleaved_ratio(a: Case, b: Case, pairs: int = 15) -> dict[str, Any]:
    """``a``'s time over ``b``'s, timed A B A B ... in this process.

    One warm call of each first; then ``pairs`` pairs, each giving one ratio,
    so that a slow spell of the machine hits both sides of a pair alike. Returns
    the median ratio, its quartiles and whether the spread allows a conclusion.
    """
    step_time(a), step_time(b)  # compile and warm
    ratios, a_times, b_times = [], [], []
    for _ in range(pairs):
        a_times.append(step_time(a))
        b_times.append(step_time(b))
        ratios.append(a_times[-1] / b_times[-1])
    q25, median, q75 = np.percentile(ratios, [25, 50, 75])
    return dict(
        ratio=float(median),
        q25=float(q25),
        q75=float(q75),
        pairs=pairs,
        a_ms=float(np.median(a_times)) * 1e3,
        b_ms=float(np.median(b_times)) * 1e3,
        conclusive=bool((q75 - q25) / median <= SPREAD_TOO_WIDE),
    )


def floor_case(total: int, words: int) -> Case:
    """The memory-bandwidth floor of ``words`` per parameter, as a case: a
    donated float32 scale of ``total`` elements (2 words), timed and scaled by
    ``words / 2`` by :func:`over_floor`."""
    scale = jax.jit(lambda x, unused: (x * 1.0001, unused), donate_argnums=0)
    x = jnp.ones((total,), jnp.float32)
    return Case(f"{words}-word floor", words, lambda p, s, g: scale(p, s), (x, 0), None)


def over_floor(case: Case, total: int, pairs: int) -> dict[str, Any]:
    """``case``'s time over its floor, interleaved with the floor's kernel."""
    result = interleaved_ratio(case, floor_case(total, case.words), pairs)
    for key in ("ratio", "q25", "q75"):
        result[key] *= 2 / case.words  # the kernel moves 2 words
    result["b_ms"] *= case.words / 2
    return result
