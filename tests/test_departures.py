"""The places where we depart from Keras on purpose (docs/semantics.md).

Each is pinned against the NumPy reference written from the documented rule, and
where Keras computes something else, the test also shows that Keras really does differ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_parity, make_problem, run_ours, tolerance
from keras_oracle import run_keras
from reference import ReferenceAdamax

from adamax_optax import adamax, finalize_variable_values


def run_reference(params, grads, **kwargs) -> ReferenceAdamax:
    reference = ReferenceAdamax(params, **kwargs)
    for g in grads:
        reference.step(g)
    return reference


@pytest.mark.parametrize(
    "config",
    [
        {"learning_rate": 0.05, "weight_decay": 0.1, "clipnorm": 0.5},
        {"learning_rate": 0.05, "use_ema": True, "ema_overwrite_frequency": 3},
        {
            "learning_rate": 0.05,
            "global_clipnorm": 1.0,
            "gradient_accumulation_steps": 3,
        },
    ],
)
def test_reference_itself_agrees_with_keras(config):
    """The NumPy oracle is trusted because it matches Keras where we follow Keras."""
    params, grads = make_problem(seed=4, steps=30)
    keras_params, _ = run_keras(params, grads, **config)
    assert_parity(run_reference(params, grads, **config).params, keras_params)


def ema_accumulation_config(overwrite):
    return {
        "learning_rate": 0.05,
        "use_ema": True,
        "ema_momentum": 0.8,
        "ema_overwrite_frequency": overwrite,
        "gradient_accumulation_steps": 3,
    }


@pytest.mark.parametrize("overwrite", [None, 2])
def test_ema_under_accumulation_moves_once_per_update(overwrite):
    config = ema_accumulation_config(overwrite)
    params, grads = make_problem(seed=5, steps=30)
    reference = run_reference(params, grads, **config)
    ours, state = run_ours(adamax(**config), params, grads)
    assert_parity(ours, reference.params)
    assert_parity(finalize_variable_values(ours, state), reference.ema)


def test_keras_moves_the_ema_on_every_micro_step():
    """The departure is real: Keras' average is far from the documented one."""
    config = ema_accumulation_config(None)
    params, grads = make_problem(seed=5, steps=30)
    reference = run_reference(params, grads, **config)
    _, keras_ema = run_keras(params, grads, **config)
    errors = [
        np.max(np.abs(keras_ema[k] - reference.ema[k])) / tolerance(reference.ema[k])
        for k in reference.ema
    ]
    assert max(errors) > 10


def test_integer_learning_rate_is_accepted_and_equals_the_float():
    params, grads = make_problem(seed=6, steps=5)
    as_int, _ = run_ours(adamax(learning_rate=1), params, grads)
    as_float, _ = run_ours(adamax(learning_rate=1.0), params, grads)
    for key in as_int:
        np.testing.assert_array_equal(as_int[key], as_float[key])


def test_ema_before_any_update_is_the_parameters():
    """Keras starts its average at zeros; we start it at the parameters."""
    params = {"w": jnp.array([1.5, -2.0])}
    state = adamax(use_ema=True).init(params)
    np.testing.assert_array_equal(
        finalize_variable_values(params, state)["w"], params["w"]
    )


def test_low_precision_parameters_with_float32_state_keep_exact_moments():
    """bf16 parameters, float32 state: m and u equal the float32 run's.

    Keras would keep m and u in bfloat16; we compute in float32 and store in the
    requested ``state_dtype``. Without weight decay the moments depend only on the
    gradients, so feeding bf16-representable gradients must give the same moments
    as an all-float32 run.
    """
    params, grads = make_problem(seed=7, steps=20)
    grads = [
        {
            k: np.asarray(jnp.asarray(v, jnp.bfloat16).astype(jnp.float32))
            for k, v in g.items()
        }
        for g in grads
    ]
    params_bf16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in params.items()}
    tx = adamax(0.01, state_dtype=jnp.float32)
    state = tx.init(params_bf16)
    update = jax.jit(tx.update)
    for g in grads:
        g16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in g.items()}
        updates, state = update(g16, state, params_bf16)
        assert all(u.dtype == jnp.bfloat16 for u in updates.values())
        params_bf16 = optax.apply_updates(params_bf16, updates)
    _, state32 = run_ours(adamax(0.01), params, grads)
    for key in params:
        assert state["adamax"].m[key].dtype == jnp.float32
        np.testing.assert_array_equal(state["adamax"].m[key], state32["adamax"].m[key])
        np.testing.assert_array_equal(state["adamax"].u[key], state32["adamax"].u[key])
        assert params_bf16[key].dtype == jnp.bfloat16
