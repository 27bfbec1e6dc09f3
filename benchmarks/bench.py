"""``python benchmarks/bench.py``: update time against the memory-bandwidth floor.

The cost model: an update is memory-bound, so its floor is the minimal traffic
(``words`` per parameter, 4 bytes each in float32) over the bandwidth measured in
this process by a buffer-donating elementwise scale. Every case is timed in this one
process, buffers donated, and reported as median time, time over its floor, ratio to
the peers, XLA's peak memory over parameters + state + gradients, and compile time.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import pathlib
import platform
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from models import MODELS
from peers import FULL_OPTIONS, optax_chain, step_with_ema
from train_steps import print_rows, run_model

from adamax_optax import (
    AccumulateGradientsState,
    accumulate_gradients,
    adamax,
    decoupled_weight_decay,
    dynamic_loss_scale,
    keras_global_clipnorm,
    named_chain,
    parameter_ema,
    scale_by_keras_adamax,
    scale_by_keras_learning_rate,
)

ACCUMULATION = 4


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


def donated(tx: optax.GradientTransformation) -> Callable[..., Any]:
    """``update`` then ``apply_updates``, params and state donated (any optax tx)."""

    def apply(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(apply, donate_argnums=(0, 1))


def donated_weighted(tx: optax.GradientTransformation) -> Callable[..., Any]:
    """:func:`donated` with a traced accumulation ``weight``: its ``grads``
    argument is ``(grads, weight)``."""

    def apply(params, state, grads_and_weight):
        grads, weight = grads_and_weight
        updates, state = tx.update(grads, state, params, weight=weight)
        return optax.apply_updates(params, updates), state

    return jax.jit(apply, donate_argnums=(0, 1))


def keras_step(params: dict[str, jax.Array]) -> tuple[Callable[..., Any], Any] | None:
    """Keras 3 ``Adamax.stateless_apply`` under ``jax.jit``, donated; None without."""
    import os

    os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        import keras
    except ImportError:
        return None
    if keras.backend.backend() != "jax":
        return None
    names = sorted(params)
    optimizer = keras.optimizers.Adamax()
    variables = [keras.Variable(params[k]) for k in names]
    optimizer.build(variables)
    opt_vars = [v.value for v in optimizer.variables]

    def apply(trainable, opt_vars, grads):
        return optimizer.stateless_apply(opt_vars, grads, trainable)

    step = jax.jit(apply, donate_argnums=(0, 1))

    def run(params, state, grads):
        trainable, opt = step(
            [params[k] for k in names], state, [grads[k] for k in names]
        )
        return dict(zip(names, trainable, strict=True)), opt

    del variables
    return run, opt_vars


def torch_time(total: int, leaves: int, repeats: int) -> dict[str, float] | None:
    """``torch.optim.Adamax`` step medians (foreach off and on); None without torch.

    On the GPU that JAX uses when torch sees one (CUDA), else on the CPU.
    """
    try:
        import torch
    except ImportError:
        return None
    on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    synchronize = torch.cuda.synchronize if on_gpu else (lambda: None)
    out = {}
    for foreach in (False, True):
        weights = [
            torch.nn.Parameter(torch.ones(total // leaves, device=device))
            for _ in range(leaves)
        ]
        for w in weights:
            w.grad = torch.full_like(w, 0.5)
        optimizer = torch.optim.Adamax(weights, lr=1e-3, foreach=foreach)
        optimizer.step()
        times = []
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            optimizer.step()
            synchronize()
            times.append(time.perf_counter() - start)
        out[f"torch.optim.Adamax (foreach={foreach})"] = float(np.median(times))
        del optimizer, weights
        if on_gpu:
            torch.cuda.empty_cache()
    return out


def build_cases(total: int, leaves: int, dtype: Any) -> Iterator[Case]:
    """Every configuration of the brief, at one size, built one at a time.

    Each case's buffers are made when the case is reached, so that only one case's
    parameters and state are alive at once (1B parameters fit on one GPU).
    """
    grads = make_tree(total, leaves, dtype, 0.5)

    def theirs(name, words, tx, phase=None, peer=None):
        """A donated step of ``tx``, timed at micro-step ``phase`` if given."""
        params = make_tree(total, leaves, dtype, 1.0)
        phase_of = micro_step_of if phase is not None else None
        state = (params, tx.init(params))
        return Case(name, words, donated(tx), state, grads, phase_of, phase, peer)

    def ours(name, words, phase=None, **options):
        return theirs(name, words, adamax(**options), phase)

    yield ours("adamax_optax defaults", 7)
    yield theirs("optax.adamax", 7, optax.adamax(1e-3), peer="adamax_optax defaults")
    yield ours("adamax_optax clip+decay+EMA", 10, **FULL_OPTIONS)
    init, step = step_with_ema(optax_chain())
    params = make_tree(total, leaves, dtype, 1.0)
    yield Case(
        "optax chain clip+decay+EMA",
        10,
        step,
        (params, init(params)),
        grads,
        peer="adamax_optax clip+decay+EMA",
    )
    del params
    steps = ACCUMULATION
    yield ours(
        "adamax_optax accumulation micro-step",
        5,
        0,
        gradient_accumulation_steps=steps,
    )
    yield ours(
        "adamax_optax accumulation update step",
        9,
        steps - 1,
        gradient_accumulation_steps=steps,
    )
    yield theirs(
        "optax.MultiSteps micro-step",
        5,
        optax.MultiSteps(optax.adamax(1e-3), steps),
        0,
        peer="adamax_optax accumulation micro-step",
    )
    yield theirs(
        "optax.MultiSteps update step",
        9,
        optax.MultiSteps(optax.adamax(1e-3), steps),
        steps - 1,
        peer="adamax_optax accumulation update step",
    )
    yield from wrapped_cases(total, leaves, dtype, grads)
    keras = keras_step(make_tree(total, leaves, dtype, 1.0))
    if keras is not None:
        run, opt_vars = keras
        yield Case(
            "Keras Adamax stateless_apply",
            7,
            run,
            (make_tree(total, leaves, dtype, 1.0), opt_vars),
            grads,
            peer="adamax_optax defaults",
        )


MICRO_STEP_NAMES = ("micro_step", "mini_step")  # ours, optax.MultiSteps'


def micro_step_of(tree: Any) -> int:
    """The accumulation's micro-step index, found anywhere in ``tree`` (also in
    the flattened state of ``nnx.split``, where it is a path ending in it, and
    in ``optax.MultiSteps``' state, which calls it ``mini_step``)."""
    is_state = lambda x: isinstance(x, AccumulateGradientsState)  # noqa: E731
    found = [x for x in jax.tree.leaves(tree, is_leaf=is_state) if is_state(x)]
    if found:
        return int(found[0].micro_step)
    (value,) = [
        leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if any(name in jax.tree_util.keystr(path) for name in MICRO_STEP_NAMES)
    ]
    return int(value)


def wrapped_cases(total: int, leaves: int, dtype: Any, grads: Any) -> Iterator[Case]:
    """Accumulation (N = 4) through the forms users wrap ``adamax`` in, each a
    jitted ``tx.update`` + ``optax.apply_updates`` with its buffers donated."""
    steps = ACCUMULATION
    accumulate = dict(gradient_accumulation_steps=steps)
    forms: dict[str, Callable[[], Any]] = {
        "chain(identity, adamax)": lambda: optax.chain(
            optax.identity(), adamax(**accumulate)
        ),
        "inject_hyperparams(adamax)": lambda: optax.inject_hyperparams(
            adamax,
            static_args=("gradient_accumulation_steps",),
            hyperparam_dtype=jnp.float32,  # beta_2 = 0.999 is 1.0 in bfloat16
        )(learning_rate=1e-3, **accumulate),
        "adamax(dynamic_loss_scale=True)": lambda: adamax(
            dynamic_loss_scale=True, **accumulate
        ),
    }
    for form, make in forms.items():
        for phase, label, words in (
            (0, "micro-step", 5),
            (steps - 1, "update step", 9),
        ):
            tx = make()
            params = make_tree(total, leaves, dtype, 1.0)
            yield Case(
                f"{form} {label}",
                words,
                donated(tx),
                (params, tx.init(params)),
                grads,
                micro_step_of,
                phase,
                peer=f"adamax_optax accumulation {label}",
            )
    try:
        from flax.training import train_state
    except ImportError:  # reported once by ``run``
        return
    for phase, label, words in ((0, "micro-step", 5), (steps - 1, "update step", 9)):
        params = make_tree(total, leaves, dtype, 1.0)
        state = train_state.TrainState.create(
            apply_fn=None, params=params, tx=adamax(**accumulate)
        )
        step = jax.jit(
            lambda state, unused, grads: (state.apply_gradients(grads=grads), unused),
            donate_argnums=0,
        )
        yield Case(
            f"Flax TrainState {label}",
            words,
            step,
            (state, jnp.zeros([])),
            grads,
            micro_step_of,
            phase,
            peer=f"adamax_optax accumulation {label}",
        )
    for phase, label, words in ((0, "micro-step", 5), (steps - 1, "update step", 9)):
        model = make_tree(total, leaves, dtype, 1.0)
        yield nnx_case(model, accumulate, label, words, phase)


def nnx_case(model, options, label, words, phase) -> Case:
    """An ``nnx.Optimizer`` step on a module holding ``model``'s leaves, fed
    gradients of 0.5 shaped as ``nnx.state(module, nnx.Param)``."""
    from flax import nnx

    class Holder(nnx.Module):
        def __init__(self, tree):
            self.leaves = nnx.data({k: nnx.Param(v) for k, v in tree.items()})

    holder = Holder(model)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), nnx.state(holder, nnx.Param))
    optimizer = nnx.Optimizer(holder, adamax(**options), wrt=nnx.Param)
    graphdef, state = nnx.split((holder, optimizer))
    del holder, optimizer

    def step(state, unused, grads):
        holder, optimizer = nnx.merge(graphdef, state)
        optimizer.update(holder, grads)
        return nnx.state((holder, optimizer)), unused

    return Case(
        f"nnx.Optimizer {label}",
        words,
        jax.jit(step, donate_argnums=0),
        (state, jnp.zeros([])),
        grads,
        micro_step_of,
        phase,
        peer=f"adamax_optax accumulation {label}",
    )


def compile_case(case: Case, total_bytes: int) -> float | None:
    """Compiles a jitted step ahead of time (``case.step`` becomes the executable).

    Returns XLA's peak (arguments + outputs - aliased + temporaries) over
    p + s + g, or None for a step that is not one jitted function (Keras).
    """
    lower = getattr(case.step, "lower", None)
    if lower is None:
        return None
    case.step = lower(*case.state, case.grads).compile()
    analysis = case.step.memory_analysis()
    if analysis is None:
        return None
    peak = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
        + analysis.temp_size_in_bytes
    )
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


def state_bytes(state: Any) -> int:
    return sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if hasattr(x, "size")
    )


def run_size(total: int, leaves: int, dtype: Any, bandwidth: float, repeats: int):
    """Rows for one (size, leaves, dtype)."""
    rows = []
    itemsize = jnp.dtype(dtype).itemsize
    peers: dict[str, Case] = {}
    for case in build_cases(total, leaves, dtype):
        total_bytes = state_bytes(case.state) + state_bytes(case.grads)
        start = time.perf_counter()
        peak = compile_case(case, total_bytes)
        compiled = time.perf_counter() - start
        median, first = time_case(case, repeats)
        floor = case.words * itemsize * total / bandwidth
        rows.append(
            dict(
                case=case.name,
                parameters=total,
                leaves=leaves,
                dtype=jnp.dtype(dtype).name,
                words=case.words,
                median_ms=median * 1e3,
                floor_ms=floor * 1e3,
                over_floor=median / floor,
                first_call_s=compiled + first,
                peak_over_p_s_g=peak,
            )
        )
        if case.peer in peers:
            # Ours over the reference, on our row: a peer from optax or Keras is
            # the reference of the adamax_optax row it names; a wrapped form of
            # ours is compared with the bare adamax_optax row it names.
            external = case.name.startswith(("optax", "Keras"))
            ours, reference = (peers[case.peer], case) if external else (case, None)
            ratio = interleaved_ratio(
                ours, reference or peers[case.peer], max(15, repeats)
            )
            row = next(r for r in rows if r["case"] == ours.name)
            row.setdefault("references", []).append(
                dict(case=(reference or peers[case.peer]).name, **ratio)
            )
        if case.name.startswith("adamax_optax"):
            peers[case.name] = case  # kept for the cases compared with it
        else:
            case.state = None  # free the buffers before the next case
    del peers
    by_name = {row["case"]: row for row in rows}
    if jnp.dtype(dtype) == jnp.float32:
        torch = torch_time(total, leaves, repeats)
        for name, seconds in (torch or {}).items():
            floor = 7 * 4 * total / bandwidth
            rows.append(
                dict(
                    case=name,
                    parameters=total,
                    leaves=leaves,
                    dtype="float32",
                    words=7,
                    median_ms=seconds * 1e3,
                    floor_ms=floor * 1e3,
                    over_floor=seconds / floor,
                    references=[
                        dict(
                            case="adamax_optax defaults",
                            ratio=seconds
                            * 1e3
                            / by_name["adamax_optax defaults"]["median_ms"],
                            pairs=0,  # another process: not interleaved
                        )
                    ],
                )
            )
    return rows


def _blocks() -> Any:
    """``adamax(**FULL_OPTIONS)``'s blocks, composed by hand."""
    return named_chain(
        ("global_clipnorm", keras_global_clipnorm(1.0)),
        ("adamax", scale_by_keras_adamax()),
        ("weight_decay", decoupled_weight_decay(1e-3)),
        ("learning_rate", scale_by_keras_learning_rate(1e-3)),
        ("ema", parameter_ema(0.99)),
    )


IN_PLACE_SHAPES = {"w": (256, 1024), "b": (128, 1024)}
"""Two float32 leaves; the smaller, 512 KiB, is the unit of the in-place table."""


def in_place_rows() -> list[dict[str, Any]]:
    """Leaf-sized temporaries and leaf copies of one donated step, per gating:
    what XLA's buffer assignment holds besides parameters, state and gradients."""
    accumulation = dict(gradient_accumulation_steps=ACCUMULATION)
    compositions = {
        "adamax(N=4)": lambda g: adamax(**accumulation, gating=g),
        "adamax(N=4, clip, decay, EMA)": lambda g: adamax(
            **accumulation, **FULL_OPTIONS, gating=g
        ),
        "adamax(N=4, clip, decay, EMA, dynamic_loss_scale)": lambda g: adamax(
            **accumulation, **FULL_OPTIONS, dynamic_loss_scale=True, gating=g
        ),
        "accumulate_gradients(named_chain(blocks), 4)": lambda g: accumulate_gradients(
            _blocks(), ACCUMULATION, gating=g
        ),
        "dynamic_loss_scale(accumulate_gradients(...))": lambda g: dynamic_loss_scale(
            accumulate_gradients(_blocks(), ACCUMULATION), gating=g
        ),
        "adamax(dynamic_loss_scale), no accumulation": lambda g: adamax(
            dynamic_loss_scale=True, gating=g
        ),
        "adamax(N=4, clip, decay, EMA, skip_nonfinite)": lambda g: adamax(
            **accumulation, **FULL_OPTIONS, skip_nonfinite=True, gating=g
        ),
        "adamax(N=4, ..., skip_nonfinite, dynamic_loss_scale)": lambda g: adamax(
            **accumulation,
            **FULL_OPTIONS,
            skip_nonfinite=True,
            dynamic_loss_scale=True,
            gating=g,
        ),
        "adamax(N=4, ..., skip_nonfinite, loss_scale_factor)": lambda g: adamax(
            **accumulation,
            **FULL_OPTIONS,
            skip_nonfinite=True,
            loss_scale_factor=3.0,
            gating=g,
        ),
        "adamax(), no accumulation": lambda g: adamax(gating=g),
        "adamax(skip_nonfinite), no accumulation": lambda g: adamax(
            skip_nonfinite=True, gating=g
        ),
        "optax.MultiSteps(optax_chain(), 4)": lambda g: optax.MultiSteps(
            optax_chain(), ACCUMULATION
        ).gradient_transformation(),
    }
    unit = 128 * 1024 * 4
    copy = re.compile(r"= f32\[(256|128),1024\]\{[0-9,]*\} copy\(")
    params = {k: jnp.ones(shape) for k, shape in IN_PLACE_SHAPES.items()}
    gradient_bytes = sum(np.prod(shape) * 4 for shape in IN_PLACE_SHAPES.values())
    rows = []
    print(
        f"{'composition':52s} temporaries / copies, in units of 512 KiB;"
        " bytes accessed (XLA's cost model, every branch of a gate counted), in"
        " gradients"
    )
    for name, make in compositions.items():
        row: dict[str, Any] = dict(composition=name)
        for gating in ("loop", "cond", "where"):
            tx = make(gating)
            compiled = donated(tx).lower(params, tx.init(params), params).compile()
            temporaries = compiled.memory_analysis().temp_size_in_bytes / unit
            copies = len(copy.findall(compiled.as_text()))
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            accessed = float(cost["bytes accessed"]) / gradient_bytes
            row[gating] = dict(
                temporaries=temporaries, copies=copies, bytes_accessed=accessed
            )
        rows.append(row)
        cells = "  ".join(
            f"{g} {row[g]['temporaries']:4.1f} / {row[g]['copies']}"
            for g in ("loop", "cond", "where")
        )
        print(f"{name:52s} {cells}  bytes (cond) {row['cond']['bytes_accessed']:4.1f}")
    return rows


def target_rows(total: int, leaves: int, pairs: int) -> list[dict[str, Any]]:
    """The gating targets, each timed interleaved with what it is compared to."""
    grads = make_tree(total, leaves, jnp.float32, 0.5)
    steps = ACCUMULATION

    def case(name, tx, words=0, phase=None):
        params = make_tree(total, leaves, jnp.float32, 1.0)
        phase_of = micro_step_of if phase is not None else None
        state = (params, tx.init(params))
        return Case(name, words, donated(tx), state, grads, phase_of, phase)

    rows = []

    def compare(target, name, a, b, limit):
        if b is None:
            result = over_floor(a, total, pairs)
            against = f"{a.words}-word floor"
        else:
            result = interleaved_ratio(a, b, pairs)
            against = b.name
        # Met when three quarters of the pairs are within the limit, missed when
        # three quarters are above it; otherwise the quartiles straddle it.
        met = True if result["q75"] <= limit else None
        if result["q25"] > limit:
            met = False
        rows.append(
            dict(
                target=target,
                case=name,
                against=against,
                limit=limit,
                met=met,
                **result,
            )
        )
        a.state = None
        if b is not None:
            b.state = None
        spread = f"[{result['q25']:.2f}, {result['q75']:.2f}]"
        verdict = {True: "met", False: "NOT met"}.get(
            met, "inconclusive: the quartiles straddle the limit"
        )
        print(
            f"{name:52s} {against:32s} {result['ratio']:5.2f} {spread:13s} "
            f"<= {limit:<4} {verdict}"
        )

    print(f"{'case':52s} {'against':32s} {'ratio':>5s} {'quartiles':13s} limit")
    for gating in (None, "loop", "cond", "where"):
        label = gating or "default"
        for phase, words, limit, what in (
            (0, 5, 1.3, "micro-step"),
            (steps - 1, 9, 1.6, "update step"),
        ):
            tx = adamax(gradient_accumulation_steps=steps, gating=gating)
            name = f"adamax(N={steps}, gating={label}) {what}"
            compare(
                f"{what} over floor", name, case(name, tx, words, phase), None, limit
            )
    for phase, what in ((0, "micro-step"), (steps - 1, "update step")):
        compositions = {
            "accumulate(named_chain(blocks))": (
                accumulate_gradients(_blocks(), steps),
                adamax(gradient_accumulation_steps=steps, **FULL_OPTIONS),
            ),
            "dynamic_loss_scale(accumulate(blocks))": (
                dynamic_loss_scale(accumulate_gradients(_blocks(), steps)),
                adamax(
                    gradient_accumulation_steps=steps,
                    dynamic_loss_scale=True,
                    **FULL_OPTIONS,
                ),
            ),
        }
        for name, (composed, ours) in compositions.items():
            compare(
                "composition over adamax()",
                f"{name} {what}",
                case(name, composed, phase=phase),
                case("adamax() with the same options", ours, phase=phase),
                1.1,
            )
    compare(
        "defaults over optax.adamax",
        "adamax() defaults",
        case("adamax()", adamax()),
        case("optax.adamax", optax.adamax(1e-3)),
        1.05,
    )
    accumulate = dict(gradient_accumulation_steps=steps)
    for phase, what in ((0, "micro-step"), (steps - 1, "update step")):
        tx = adamax(**accumulate)
        weighted = case(f"adamax(N={steps}, weight=w) {what}", tx, phase=phase)
        weighted.step = donated_weighted(tx)
        weighted.grads = (grads, jnp.float32(3.0))
        compare(
            "weight over none",
            weighted.name,
            weighted,
            case(f"adamax(N={steps})", tx, phase=phase),
            1.1,
        )
    # One more read of the gradient: 8/7 of the defaults' 7 words, 6/5 of a
    # micro-step's 5, 7/6 of a micro-step under dynamic loss scaling (whose own
    # check reads the gradient once).
    scaled = dict(accumulate, dynamic_loss_scale=True)
    for name, options, phase, limit in (
        ("adamax(skip_nonfinite)", {}, None, 1.15),
        (f"adamax(N={steps}, skip_nonfinite) micro-step", accumulate, 0, 1.2),
        (
            f"adamax(N={steps}, skip_nonfinite, dynamic_loss_scale) micro-step",
            scaled,
            0,
            1.17,
        ),
    ):
        compare(
            "skip_nonfinite over none",
            name,
            case(name, adamax(skip_nonfinite=True, **options), phase=phase),
            case("without it", adamax(**options), phase=phase),
            limit,
        )
    return rows


def compile_times(leaves: int, total: int) -> list[dict[str, Any]]:
    """Compile seconds of one donated step over a many-leaf tree, each of ours
    beside its like-for-like optax setup."""
    params = make_tree(total, leaves, jnp.float32, 1.0)
    accumulation = dict(gradient_accumulation_steps=ACCUMULATION)
    pairs = {
        "defaults": (donated(adamax()), adamax(), optax.adamax(1e-3)),
        "clip+decay+EMA": (
            donated(adamax(**FULL_OPTIONS)),
            adamax(**FULL_OPTIONS),
            step_with_ema(optax_chain()),
        ),
        "clip+decay+EMA, N=4": (
            donated(adamax(**FULL_OPTIONS, **accumulation)),
            adamax(**FULL_OPTIONS, **accumulation),
            step_with_ema(
                optax.MultiSteps(optax_chain(), ACCUMULATION).gradient_transformation()
            ),
        ),
    }
    rows = []
    for name, (ours_step, ours, theirs) in pairs.items():
        if isinstance(theirs, optax.GradientTransformation):
            theirs_init, theirs_step = theirs.init, donated(theirs)
        else:  # (init, step) with the EMA beside it
            theirs_init, theirs_step = theirs
        row = dict(case=name, leaves=leaves)
        for side, step, init in (
            ("adamax_optax", ours_step, ours.init),
            ("optax", theirs_step, theirs_init),
        ):
            start = time.perf_counter()
            step.lower(params, init(params), params).compile()
            row[f"{side}_compile_s"] = time.perf_counter() - start
        rows.append(row)
    return rows


COLUMNS = """\
Columns: median ms, the median time of one donated step (update + apply_updates);
floor ms, the minimal traffic of the case (words per parameter x 4 bytes x
parameters) over the bandwidth measured in this process; x floor, their ratio;
x ref, this row's time over the reference row's (named in "reference"), timed
interleaved A B A B in this process ("?": quartiles wider than 10%% of the median);
peak/(p+s+g), XLA's peak memory over parameters + state + gradients."""


def print_table(rows: list[dict[str, Any]]) -> None:
    print(COLUMNS.replace("%%", "%"))
    header = (
        f"{'case':42s} {'params':>7s} {'dtype':>8s} {'median ms':>10s}"
        f" {'floor ms':>9s} {'x floor':>8s} {'x ref':>6s} {'reference':34s}"
        f" {'peak/(p+s+g)':>12s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        references = r.get("references") or [{}]
        for index, reference in enumerate(references):
            ratio = reference.get("ratio")
            ref = f"{ratio:.2f}" if ratio is not None else ""
            if reference.get("conclusive") is False:
                ref += "?"
            if index:  # a further reference of the same row
                print(f"{'':89s} {ref:>6s} {reference['case']}")
                continue
            peak = f"{r['peak_over_p_s_g']:.2f}" if r.get("peak_over_p_s_g") else ""
            print(
                f"{r['case']:42s} {r['parameters'] / 2**20:6.0f}M "
                f"{r['dtype']:>8s} {r['median_ms']:10.1f} {r['floor_ms']:9.1f} "
                f"{r['over_floor']:8.2f} {ref:>6s} {reference.get('case', ''):34s}"
                f" {peak:>12s}"
            )


def draw(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtype = (
        "float32" if any(r["dtype"] == "float32" for r in rows) else rows[0]["dtype"]
    )
    names = sorted(
        {r["case"] for r in rows}, key=lambda n: [r["case"] for r in rows].index(n)
    )
    figure, axis = plt.subplots(figsize=(10, 5))
    colors = plt.get_cmap("tab20").colors
    for index, name in enumerate(names):
        mine = [r for r in rows if r["case"] == name and r["dtype"] == dtype]
        if mine:  # one size gives one marker per case
            mine.sort(key=lambda r: r["parameters"])
            axis.plot(
                [r["parameters"] / 2**20 for r in mine],
                [r["over_floor"] for r in mine],
                "o-" if name.startswith("adamax_optax") else "s--",
                color=colors[index % len(colors)],
                label=name,
            )
    axis.set(
        xscale="log",
        yscale="log",
        xlabel=f"parameters (millions, {dtype})",
        ylabel="median time / bandwidth floor",
        title="Update time over the floor",
    )
    axis.axhline(1.0, color="k", lw=0.8)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


QUICK = dict(sizes=[1.0], leaves=[8], dtypes=["float32"], repeats=3, compile_leaves=50)
"""What ``--quick`` runs: one small size, float32, a 50-leaf compile; under a
minute on 2 CPU cores."""

PEERS = {
    "keras": "the Keras Adamax row (pip install keras)",
    "torch": "the torch.optim.Adamax rows (pip install torch)",
    "flax": "the Flax TrainState and nnx.Optimizer rows (pip install flax)",
}
"""Optional peers: the rows skipped, and how to get them, when one is missing."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run under a minute: 1M float32 parameters in 8 leaves, "
        "3 repeats, a 50-leaf compile; overrides the size options",
    )
    parser.add_argument(
        "--sizes",
        type=float,
        nargs="+",
        default=[1, 8, 32],
        help="parameter counts, in millions (2**20)",
    )
    parser.add_argument(
        "--leaves", type=int, nargs="+", default=[8], help="leaves the parameters span"
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        help="parameter dtypes",
    )
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed calls per case (median)"
    )
    parser.add_argument(
        "--compile-leaves",
        type=int,
        default=1000,
        help="leaves of the compile-time tree (0 skips it)",
    )
    parser.add_argument(
        "--train-models",
        nargs="*",
        default=[],
        choices=sorted(MODELS),
        help="also compile and time whole training steps of these models "
        "(mlp: 1000 leaves, resnet: ResNet-50-like, gpt: GPT-2-small-like)",
    )
    parser.add_argument(
        "--targets",
        action="store_true",
        help="only the gating measurements: leaf-sized temporaries and copies "
        "of each composition and gating, then, at the largest --sizes and "
        "--leaves, micro-step and update step over their floors for each gating, "
        "compositions over adamax(), defaults over optax.adamax, each timed "
        "interleaved (A B A B, --pairs pairs)",
    )
    parser.add_argument(
        "--pairs", type=int, default=15, help="interleaved pairs per comparison"
    )
    parser.add_argument(
        "--json", default="bench_results.json", help="where to write the results"
    )
    parser.add_argument(
        "--plot", default=None, help="also draw the table as a PNG at this path"
    )


def missing_peers() -> list[str]:
    """The optional peers that are not installed."""
    return [name for name in PEERS if importlib.util.find_spec(name) is None]


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit(
            "--plot needs matplotlib: python -m pip install matplotlib "
            '(or the demo extra: python -m pip install "adamax_optax[demo]")'
        )
    if getattr(args, "quick", False):
        args = argparse.Namespace(**{**vars(args), **QUICK})
    if getattr(args, "targets", False):
        total, leaves = int(max(args.sizes) * 2**20), max(args.leaves)
        print(
            f"jax {jax.__version__} on {jax.devices()[0].device_kind}: "
            f"{total / 2**20:.0f}M float32 in {leaves} leaves, {args.pairs} pairs"
        )
        result = dict(
            jax=jax.__version__,
            device_kind=jax.devices()[0].device_kind,
            parameters=total,
            leaves=leaves,
            in_place=in_place_rows(),
            targets=target_rows(total, leaves, args.pairs),
        )
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
        return result
    for name in missing_peers():
        print(f"skipped {PEERS[name]}: {name} is not installed")
    bandwidth = measure_bandwidth()
    machine = platform.processor() or platform.machine()
    print(
        f"{jax.devices()[0].device_kind} ({machine}),"
        f" jax {jax.__version__}, optax {optax.__version__}; "
        f"measured bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    rows = []
    for dtype in args.dtypes:
        for leaves in args.leaves:
            for size in args.sizes:
                rows += run_size(
                    int(size * 2**20), leaves, jnp.dtype(dtype), bandwidth, args.repeats
                )
    print_table(rows)
    compiled = compile_times(args.compile_leaves, 2**20) if args.compile_leaves else []
    for row in compiled:
        print(
            f"compile, {row['leaves']} leaves, {row['case']:20s} adamax_optax "
            f"{row['adamax_optax_compile_s']:5.1f} s, optax "
            f"{row['optax_compile_s']:5.1f} s"
        )
    train_steps = [row for name in args.train_models for row in run_model(name)]
    if train_steps:
        print_rows(train_steps)
    result = dict(
        device=str(jax.devices()[0]),
        device_kind=jax.devices()[0].device_kind,
        jax=jax.__version__,
        bandwidth_gb_s=bandwidth / 1e9,
        rows=rows,
        compile=compiled,
        train_steps=train_steps,
    )
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    if args.plot:
        draw(rows, pathlib.Path(args.plot))
        print(f"wrote {args.plot}")
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench.py",
        description="Update time against the memory-bandwidth floor and the "
        "optax, Keras and PyTorch equivalents.",
        epilog=COLUMNS,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
