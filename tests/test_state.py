"""State accessors, on plain, nested, injected and Flax TrainState states."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from adamax_optax import (
    adamax,
    finalize_variable_values,
    get_iterations,
    get_learning_rate,
    get_loss_scale,
)


def run(tx, steps, params=None, grads=None):
    params = {"w": jnp.ones(3)} if params is None else params
    state = tx.init(params)
    for _ in range(steps):
        g = {"w": jnp.ones(3)} if grads is None else grads
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_iterations_count_updates_not_micro_steps_or_skips():
    _, state = run(adamax(gradient_accumulation_steps=3), 7)
    assert int(get_iterations(state)) == 2
    tx = adamax(dynamic_loss_scale=True)
    _, state = run(tx, 2, grads={"w": jnp.full(3, jnp.inf)})
    assert int(get_iterations(state)) == 0


def test_learning_rate_is_the_next_updates_rate():
    schedule = optax.linear_schedule(1.0, 0.0, 10)
    _, state = run(adamax(schedule), 3)
    assert float(get_learning_rate(state)) == pytest.approx(0.7)
    # Under accumulation the schedule sees Keras' micro-step index.
    _, state = run(adamax(schedule, gradient_accumulation_steps=2), 2)
    assert float(get_learning_rate(state)) == pytest.approx(1.0 - 0.1 * 3)


def test_accessors_through_chain_and_inject_hyperparams():
    tx = optax.chain(optax.identity(), adamax(0.02, loss_scale_factor=4.0))
    _, state = run(tx, 2)
    assert int(get_iterations(state)) == 2
    assert float(get_loss_scale(state)) == 4.0
    assert float(get_learning_rate(state)) == pytest.approx(0.02)

    injected = optax.inject_hyperparams(adamax)(learning_rate=0.02, use_ema=True)
    params, state = run(injected, 2)
    state.hyperparams["learning_rate"] = jnp.asarray(0.5)
    assert float(get_learning_rate(state)) == 0.5
    assert int(get_iterations(state)) == 2
    ema = finalize_variable_values(params, state)
    assert not np.allclose(ema["w"], params["w"])


def test_accessors_on_a_flax_train_state():
    tx = adamax(0.1, use_ema=True, dynamic_loss_scale={"initial_scale": 256.0})
    params = {"w": jnp.ones(3)}
    ts = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)

    @jax.jit
    def step(ts):
        return ts.apply_gradients(grads={"w": jnp.full(3, 256.0)})

    for _ in range(3):
        ts = step(ts)
    assert int(get_iterations(ts)) == 3
    assert float(get_loss_scale(ts)) == 256.0
    assert float(get_learning_rate(ts)) == pytest.approx(0.1)
    ema = finalize_variable_values(ts.params, ts)
    assert ema["w"].shape == (3,) and not np.allclose(ema["w"], ts.params["w"])


def test_missing_pieces_are_clear_errors():
    state = optax.sgd(0.1).init(jnp.zeros(1))
    with pytest.raises(ValueError, match="exactly one ScaleByKerasAdamaxState"):
        get_iterations(state)
    with pytest.raises(ValueError, match="ScaleByKerasLearningRateState"):
        get_learning_rate(state)
    assert float(get_loss_scale(state)) == 1.0
