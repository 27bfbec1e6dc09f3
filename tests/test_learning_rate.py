"""Every form of learning rate, and Keras' schedule index under accumulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest

from adamax_optax import adamax, scale_by_keras_learning_rate


def rates(tx, calls):
    state = tx.init(jnp.zeros(1))
    seen = []
    for _ in range(calls):
        updates, state = tx.update(-jnp.ones(1), state)
        seen.append(float(updates[0]))
    return seen, state


def test_float_and_int():
    assert rates(scale_by_keras_learning_rate(0.25), 2)[0] == [0.25, 0.25]
    assert rates(scale_by_keras_learning_rate(2), 1)[0] == [2.0]


def test_optax_schedule_is_evaluated_at_the_zero_based_count():
    seen, state = rates(scale_by_keras_learning_rate(lambda count: 1.0 + count), 3)
    assert seen == [1.0, 2.0, 3.0]
    assert float(state.learning_rate) == 4.0  # the next update's rate


def test_schedule_under_accumulation_uses_keras_micro_step_index():
    """Update k (0-based) with N steps per update uses schedule(k * N + N - 1)."""
    seen, _ = rates(
        scale_by_keras_learning_rate(lambda step: step * 1.0, steps_per_update=4), 3
    )
    assert seen == [3.0, 7.0, 11.0]


def test_keras_schedule_object():
    schedule = keras.optimizers.schedules.ExponentialDecay(1.0, 1, 0.5)
    seen, _ = rates(scale_by_keras_learning_rate(schedule), 3)
    np.testing.assert_allclose(seen, [1.0, 0.5, 0.25], rtol=1e-6)


def test_zero_argument_callable_is_called_per_update_outside_jit():
    box = {"lr": 1.0}
    tx = scale_by_keras_learning_rate(lambda: box["lr"])
    state = tx.init(jnp.zeros(1))
    first, state = tx.update(-jnp.ones(1), state)
    box["lr"] = 3.0
    second, state = tx.update(-jnp.ones(1), state)
    assert (float(first[0]), float(second[0])) == (1.0, 3.0)


def test_zero_argument_callable_is_frozen_when_traced():
    box = {"lr": 1.0}
    tx = scale_by_keras_learning_rate(lambda: box["lr"])
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(1))
    first, state = update(-jnp.ones(1), state)
    box["lr"] = 3.0
    second, state = update(-jnp.ones(1), state)
    assert (float(first[0]), float(second[0])) == (1.0, 1.0)


@pytest.mark.parametrize("n", [2, 3])
def test_adamax_with_accumulation_remaps_schedule(n):
    schedule = optax.piecewise_constant_schedule(0.1, {n * 2: 0.0})
    tx = adamax(schedule, gradient_accumulation_steps=n)
    params = jnp.zeros(1)
    state = tx.init(params)
    moved = []
    for _ in range(4 * n):
        updates, state = tx.update(jnp.ones(1), state, params)
        moved.append(float(updates[0]) != 0.0)
    # Updates at calls n and 2n use steps n-1 and 2n-1 (< 2n): rate 0.1.
    # Updates at calls 3n and 4n use steps 3n-1 and 4n-1 (>= 2n): rate 0.
    assert [i + 1 for i, m in enumerate(moved) if m] == [n, 2 * n]
