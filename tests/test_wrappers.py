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
    injected_adamax,
    make_problem,
    run_donated,
)

from adamax_optax import accumulate_gradients, adamax

WRAPPED = {
    "chain(identity, tx)": lambda: optax.chain(optax.identity(), adamax(**ACCUMULATE)),
    "inject_hyperparams": lambda: injected_adamax(**ACCUMULATE),
    "dynamic_loss_scale": lambda: adamax(dynamic_loss_scale=True, **EVERY_OPTION),
}


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
    want = run_donated(adamax(**bare), params, grads)[0]
    if name == "dynamic_loss_scale":
        grads = [{k: v * 2.0**15 for k, v in g.items()} for g in grads]
    got = run_donated(WRAPPED[name](), params, grads)[0]
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=2e-7, atol=1e-8)


def test_accumulate_gradients_of_a_foreign_transformation():
    """An inner optax optimizer keeps its own numbers: optax.MultiSteps'."""
    params, grads = make_problem(steps=9)
    params = {k: jnp.asarray(v) for k, v in params.items()}
    with jax.numpy_dtype_promotion("standard"):  # optax's own code
        got = run_donated(accumulate_gradients(optax.adam(0.01), 3), params, grads)[0]
        multi = optax.MultiSteps(optax.adam(0.01), 3).gradient_transformation()
        want = run_donated(multi, params, grads)[0]
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7)
