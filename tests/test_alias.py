"""``adamax(...)``: state by name, composition with optax, runtime hyperparameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_problem, run_ours

from adamax_optax import adamax


def test_state_reads_by_name():
    params = {"w": jnp.ones(3)}
    state = adamax(
        weight_decay=0.1, clipnorm=1.0, use_ema=True, loss_scale_factor=2.0
    ).init(params)
    assert list(state) == [
        "loss_scale",
        "clipnorm",
        "adamax",
        "weight_decay",
        "learning_rate",
        "ema",
    ]
    state = adamax(gradient_accumulation_steps=2, use_ema=True).init(params)
    assert list(state) == ["accumulate"]
    assert list(state["accumulate"].inner_state) == ["adamax", "learning_rate", "ema"]


def test_defaults_are_keras_defaults():
    """lr 0.001, beta_1 0.9, beta_2 0.999, eps 1e-7: step 1 is lr*g/(|g|+eps)."""
    g = jnp.array([0.5, -2.0])
    tx = adamax()
    updates, state = tx.update(g, tx.init(g))
    np.testing.assert_allclose(
        updates, -0.001 * np.asarray(g) / (np.abs(g) + 1e-7), rtol=1e-6
    )
    assert float(state["learning_rate"].learning_rate) == pytest.approx(0.001)


def test_minimises_a_quadratic_under_jit():
    target = jnp.array([1.0, -2.0, 3.0])
    loss = lambda p: jnp.sum((p - target) ** 2)  # noqa: E731
    tx = adamax(0.05, weight_decay=1e-4, global_clipnorm=1.0, use_ema=True)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    params = jnp.zeros(3)
    state = tx.init(params)
    for _ in range(300):
        params, state = step(params, state)
    assert float(loss(params)) < 1e-3


def test_composes_inside_optax_chain():
    params, grads = make_problem(steps=10)
    alone, _ = run_ours(adamax(0.05), params, grads)
    chained, _ = run_ours(
        optax.chain(optax.identity(), adamax(0.05), optax.scale(1.0)), params, grads
    )
    for key in alone:
        np.testing.assert_array_equal(alone[key], chained[key])


def test_works_inside_optax_multisteps():
    """optax.MultiSteps around adamax equals adamax's own accumulation."""
    params, grads = make_problem(steps=12)
    with jax.numpy_dtype_promotion("standard"):  # MultiSteps is not strict-clean
        multi, _ = run_ours(optax.MultiSteps(adamax(0.05), 3), params, grads)
    ours, _ = run_ours(adamax(0.05, gradient_accumulation_steps=3), params, grads)
    for key in ours:
        np.testing.assert_allclose(multi[key], ours[key], rtol=1e-6, atol=1e-7)


NUMERIC_HYPERPARAMETERS = {
    "learning_rate": (0.01, 0.05),
    "beta_1": (0.9, 0.5),
    "beta_2": (0.999, 0.9),
    "epsilon": (1e-7, 1e-2),
    "weight_decay": (0.01, 0.3),
    "clipnorm": (1.0, 0.1),
    "clipvalue": (1.0, 0.1),
    "global_clipnorm": (1.0, 0.1),
    "ema_momentum": (0.99, 0.5),
    "loss_scale_factor": (2.0, 8.0),
}


@pytest.mark.parametrize("name", NUMERIC_HYPERPARAMETERS)
def test_inject_hyperparams_changes_value_without_recompiling(name):
    before, after = NUMERIC_HYPERPARAMETERS[name]
    extra = {"use_ema": True} if name == "ema_momentum" else {}
    injected = optax.inject_hyperparams(adamax)(**{name: before}, **extra)
    params, grads = make_problem(steps=6)
    params = {k: jnp.asarray(v) for k, v in params.items()}
    traces = []

    @jax.jit
    def step(params, state, g):
        traces.append(1)
        updates, state = injected.update(g, state, params)
        return optax.apply_updates(params, updates), state

    state = injected.init(params)
    for g in grads[:3]:
        params, state = step(params, state, g)
    state.hyperparams[name] = jnp.asarray(after, jnp.float32)
    for g in grads[3:]:
        params, state = step(params, state, g)
    assert len(traces) == 1

    # The same run with the value switched by rebuilding must agree.
    reference_params, _ = make_problem(steps=6)
    first = {**extra, name: before}
    second = {**extra, name: after}
    p_ref, s_ref = run_ours(adamax(**first), reference_params, grads[:3])
    tx = adamax(**second)
    for g in grads[3:]:
        updates, s_ref = tx.update(g, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, updates)
    for key in params:
        np.testing.assert_allclose(params[key], p_ref[key], rtol=1e-5, atol=1e-6)
