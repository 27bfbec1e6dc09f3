"""Wrapped optimizers move as the bare one; foreign inners keep their numbers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    ACCUMULATE,
    EVERY_OPTION,
    donated_step,
    injected_adamax,
    make_problem,
)

from adamax_optax import accumulate_gradients, adamax

WRAPPED = {
    "chain(identity, tx)": lambda: optax.chain(optax.identity(), adamax(**ACCUMULATE)),
    "inject_hyperparams": lambda: injected_adamax(**ACCUMULATE),
    "dynamic_loss_scale": lambda: adamax(dynamic_loss_scale=True, **EVERY_OPTION),
}


def run(tx, params, grads):
    """Feeds ``grads`` through a donated step; ``params`` is left intact."""
    step = donated_step(tx)
    params = jax.tree.map(jnp.array, params)
    state = tx.init(params)
    for g in grads:
        params, state = step(params, state, g)
    return params


@pytest.mark.parametrize(
    "name", ["chain(identity, tx)", "inject_hyperparams", "dynamic_loss_scale"]
)
def test_wrapped_optimizer_moves_as_the_bare_one(name):
    """The wrappers change nothing (an injected rate is a float32 array rather
    than a Python float, which can move the last bit). Dynamic loss scaling gets
    the gradients times its initial scale, a power of two: exact."""
    params, grads = make_problem(steps=11)
    params = {k: jnp.asarray(v) for k, v in params.items()}
    bare = dict(EVERY_OPTION) if name == "dynamic_loss_scale" else dict(ACCUMULATE)
    want = run(adamax(**bare), params, grads)
    if name == "dynamic_loss_scale":
        grads = [{k: v * 2.0**15 for k, v in g.items()} for g in grads]
    got = run(WRAPPED[name](), params, grads)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=2e-7, atol=1e-8)


def test_accumulate_gradients_of_a_foreign_transformation():
    """An inner optax optimizer keeps its own numbers: optax.MultiSteps'."""
    params, grads = make_problem(steps=9)
    params = {k: jnp.asarray(v) for k, v in params.items()}
    with jax.numpy_dtype_promotion("standard"):  # optax's own code
        got = run(accumulate_gradients(optax.adam(0.01), 3), params, grads)
        multi = optax.MultiSteps(optax.adam(0.01), 3).gradient_transformation()
        want = run(multi, params, grads)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7)
