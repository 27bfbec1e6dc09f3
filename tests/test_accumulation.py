"""Gradient accumulation: zero updates on micro-steps, the mean on the last."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamax_optax import AccumulateGradientsState, accumulate_gradients, adamax


def test_updates_with_the_group_mean_every_n_calls():
    tx = accumulate_gradients(optax.sgd(1.0), 3)
    state = tx.init(jnp.zeros(2))
    update = jax.jit(tx.update)
    outputs = []
    for g in ([1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [1.0, 1.0], [1.0, 1.0], [4.0, 1.0]):
        updates, state = update(jnp.array(g), state)
        outputs.append(np.asarray(updates).tolist())
    assert outputs == [[0, 0], [0, 0], [-3, -4], [0, 0], [0, 0], [-2, -1]]
    assert isinstance(state, AccumulateGradientsState)
    assert int(state.micro_step) == 0
    # Not reset: it holds the finished group's mean, which nothing reads again ...
    np.testing.assert_array_equal(state.accumulator, [2.0, 1.0])
    # ... because the next group's first call overwrites it.
    _, state = update(jnp.array([2.0, 5.0]), state)
    np.testing.assert_array_equal(state.accumulator, [2.0, 5.0])


def test_inner_state_only_moves_on_update_steps():
    tx = adamax(0.1, gradient_accumulation_steps=4)
    params = jnp.ones(3)
    state = tx.init(params)
    for call in range(1, 10):
        _, state = tx.update(jnp.full(3, float(call)), state, params)
        acc = state["accumulate"]
        assert int(acc.inner_state["adamax"].count) == call // 4
        assert int(acc.micro_step) == call % 4


def test_equals_one_large_batch_step():
    """N micro-steps on g_i equal one step on mean(g_i) (Adamax is not linear)."""
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(6, 5)).astype(np.float32)
    params = jnp.zeros(5)
    accumulated = adamax(0.1, gradient_accumulation_steps=3)
    state = accumulated.init(params)
    for g in grads:
        updates, state = accumulated.update(jnp.asarray(g), state, params)
        params = params + updates
    plain = adamax(0.1)
    expected = jnp.zeros(5)
    plain_state = plain.init(expected)
    for group in grads.reshape(2, 3, 5):
        updates, plain_state = plain.update(jnp.asarray(group.mean(0)), plain_state)
        expected = expected + updates
    np.testing.assert_allclose(params, expected, rtol=1e-6, atol=1e-7)


def test_accumulator_in_float32_for_bf16_gradients():
    tx = accumulate_gradients(optax.sgd(1.0), 2, state_dtype=jnp.float32)
    params = jnp.zeros(2, jnp.bfloat16)
    state = tx.init(params)
    assert state.accumulator.dtype == jnp.float32
    updates, state = tx.update(jnp.ones(2, jnp.bfloat16), state)
    assert updates.dtype == jnp.bfloat16 and state.accumulator.dtype == jnp.float32


def test_extra_args_reach_the_inner_transformation():
    seen = []

    def inner_update(updates, state, params=None, *, value=None):
        seen.append(value)
        return updates, state

    inner = optax.GradientTransformationExtraArgs(
        lambda p: optax.EmptyState(), inner_update
    )
    tx = accumulate_gradients(inner, 2)
    state = tx.init(jnp.zeros(1))
    tx.update(jnp.ones(1), state, value=7.0)
    assert 7.0 in seen
