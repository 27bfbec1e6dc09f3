"""Parameter EMA and ``finalize_variable_values``, against closed forms."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adamax_optax import (
    ParameterEMAState,
    adamax,
    finalize_variable_values,
    parameter_ema,
)


def walk(tx, steps, params=None):
    """sgd(1) with gradient -1: parameters go 1, 2, 3, ... one per update."""
    params = jnp.zeros(1) if params is None else params
    state = tx.init(params)
    history = []
    for _ in range(steps):
        updates, state = tx.update(-jnp.ones(1), state, params)
        params = optax.apply_updates(params, updates)
        history.append(float(params[0]))
    return params, state, history


def test_ema_closed_form():
    momentum = 0.5
    _, state, _ = walk(optax.chain(optax.sgd(1.0), parameter_ema(momentum)), 3)
    ema = 1.0  # first update: ema = w
    for w in (2.0, 3.0):
        ema = momentum * ema + (1 - momentum) * w
    assert float(state[1].ema[0]) == pytest.approx(ema)
    assert int(state[1].count) == 3


def test_overwrite_every_f_updates():
    tx = optax.chain(optax.sgd(1.0), parameter_ema(0.5, ema_overwrite_frequency=2))
    _, _, history = walk(tx, 4)
    # 1; then w=2 -> ema=1.5 -> overwrite; 2.5; w=3.5 -> ema = .5*2 + .5*3.5 = 2.75
    assert history == pytest.approx([1.0, 1.5, 2.5, 2.75])


def test_momentum_zero_tracks_the_parameters_and_one_freezes_the_first():
    params, state, _ = walk(optax.chain(optax.sgd(1.0), parameter_ema(0.0)), 3)
    assert float(finalize_variable_values(params, state)[0]) == 3.0
    params, state, _ = walk(optax.chain(optax.sgd(1.0), parameter_ema(1.0)), 3)
    assert float(finalize_variable_values(params, state)[0]) == 1.0


def test_finalize_without_ema_returns_params_unchanged():
    params = {"w": jnp.arange(3.0)}
    state = adamax().init(params)
    assert finalize_variable_values(params, state) is params


def test_finalize_finds_the_ema_inside_nested_states():
    params = {"w": jnp.arange(3.0)}
    wrapped = optax.inject_hyperparams(adamax)(learning_rate=0.1, use_ema=True)
    state = wrapped.init(params)
    nested = {"outer": (state, optax.EmptyState())}
    out = finalize_variable_values(params, nested)
    np.testing.assert_array_equal(out["w"], params["w"])


def test_finalize_rejects_two_emas():
    params = jnp.zeros(2)
    tx = optax.chain(parameter_ema(), parameter_ema())
    with pytest.raises(ValueError, match="2 parameter EMAs"):
        finalize_variable_values(params, tx.init(params))


def test_ema_in_float32_for_bf16_params():
    params = jnp.ones(4, jnp.bfloat16)
    tx = parameter_ema(state_dtype=jnp.float32)
    state = tx.init(params)
    assert isinstance(state, ParameterEMAState) and state.ema.dtype == jnp.float32
    updates, state = tx.update(jnp.zeros(4, jnp.bfloat16), state, params)
    assert updates.dtype == jnp.bfloat16
    assert finalize_variable_values(params, state).dtype == jnp.bfloat16


def test_ema_state_never_shares_the_parameters_buffer():
    """A step donating params and state must not donate one buffer twice."""
    tx = adamax(0.1, use_ema=True)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    ema = state["ema"].ema["w"]
    assert ema.unsafe_buffer_pointer() != params["w"].unsafe_buffer_pointer()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state):
        updates, state = tx.update({"w": jnp.ones(3)}, state, params)
        return optax.apply_updates(params, updates), state

    params, state = step(params, state)  # raised "donate the same buffer twice"
    assert float(params["w"][0]) < 1.0
