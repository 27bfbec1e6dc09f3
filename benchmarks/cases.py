"""The case catalogue of the bench's table: every configuration timed, each
built when it is reached, and the compile-time pairs.

:func:`build_cases` yields ours, the optax peers, the forms users wrap
``adamax`` in (:func:`wrapped_cases`, :func:`nnx_case`) and Keras, each a
:class:`harness.Case` naming the row it is compared with; :func:`compile_times`
compiles each of ours beside its like-for-like optax setup.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax
from footprint import donated
from harness import Case, make_tree
from peers import FULL_OPTIONS, keras_step, optax_chain, step_with_ema

from adamax_optax import AccumulateGradientsState, adamax

ACCUMULATION = 4


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
