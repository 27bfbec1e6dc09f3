"""Dynamic loss scaling: closed-form scale dynamics, skipped steps, Keras parity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from conftest import assert_parity, make_problem

from adamax_optax import (
    DynamicLossScaleState,
    adamax,
    dynamic_loss_scale,
    get_iterations,
    get_loss_scale,
)


def scales(tx, grads):
    state = tx.init(jnp.zeros(1))
    seen = []
    for g in grads:
        _, state = tx.update(jnp.array([g]), state, jnp.zeros(1))
        seen.append(float(get_loss_scale(state)))
    return seen


def test_grows_after_growth_steps_and_halves_on_overflow():
    tx = dynamic_loss_scale(optax.sgd(1.0), initial_scale=8.0, growth_steps=3)
    got = scales(tx, [1.0, 1.0, 1.0, 1.0, np.inf, 1.0, 1.0, np.nan, 1.0])
    assert got == [8.0, 8.0, 16.0, 16.0, 8.0, 8.0, 8.0, 4.0, 4.0]


def test_floor_and_no_growth_into_infinity():
    tx = dynamic_loss_scale(optax.sgd(1.0), initial_scale=4.0, min_loss_scale=2.0)
    assert scales(tx, [np.inf] * 3) == [2.0, 2.0, 2.0]
    big = float(np.finfo(np.float32).max)
    tx = dynamic_loss_scale(optax.sgd(1.0), initial_scale=big, growth_steps=1)
    assert scales(tx, [1.0, 1.0]) == [big, big]


def test_the_scale_never_exceeds_max_loss_scale():
    """Growth every step, capped at 64 (reached and held); a back-off from the
    cap halves it, and it grows back to the cap, not past it."""
    tx = dynamic_loss_scale(
        optax.sgd(1.0), initial_scale=8.0, growth_steps=1, max_loss_scale=64.0
    )
    got = scales(tx, [1.0] * 5 + [np.inf] + [1.0] * 3)
    assert got == [16.0, 32.0, 64.0, 64.0, 64.0, 32.0, 64.0, 64.0, 64.0]
    uncapped = dynamic_loss_scale(optax.sgd(1.0), initial_scale=8.0, growth_steps=1)
    assert scales(uncapped, [1.0] * 5)[-1] == 256.0  # Keras' default: no cap
    # A cap that is not a power of the factor is reached exactly.
    odd = dynamic_loss_scale(
        optax.sgd(1.0), initial_scale=8.0, growth_steps=1, max_loss_scale=100.0
    )
    assert max(scales(odd, [1.0] * 6)) == 100.0


def test_counts_its_skips():
    tx = dynamic_loss_scale(optax.sgd(1.0), initial_scale=8.0)
    state = tx.init(jnp.zeros(1))
    for g in (1.0, np.inf, 1.0, np.nan, np.nan):
        _, state = tx.update(jnp.array([g]), state)
    assert int(state.skipped_steps) == 3
    assert state.skipped_steps.dtype == jnp.int32


def test_inner_sees_unscaled_gradients():
    tx = dynamic_loss_scale(optax.sgd(1.0), initial_scale=4.0)
    updates, _ = tx.update(jnp.array([8.0]), tx.init(jnp.zeros(1)))
    assert float(updates[0]) == -2.0


def test_non_finite_step_leaves_everything_bit_identical():
    """Accumulator, moments, EMA and counters do not move on a skipped step."""
    tx = adamax(
        0.1,
        use_ema=True,
        gradient_accumulation_steps=3,
        weight_decay=0.01,
        dynamic_loss_scale={"initial_scale": 16.0},
    )
    params = {"w": jnp.arange(4.0), "b": jnp.ones(2)}
    state = tx.init(params)
    good = {"w": jnp.ones(4), "b": jnp.ones(2)}
    for _ in range(4):  # end mid-group, with a non-zero accumulator
        _, state = tx.update(good, state, params)
    bad = {"w": jnp.array([1.0, jnp.inf, 0.0, 0.0]), "b": jnp.ones(2)}
    updates, new_state = jax.jit(tx.update)(bad, state, params)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    before, after = state.inner_state, new_state.inner_state
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(old, new)
    assert float(new_state.loss_scale) == 8.0
    assert int(get_iterations(new_state)) == int(get_iterations(state)) == 1
    assert isinstance(new_state, DynamicLossScaleState)


def test_matches_keras_loss_scale_optimizer():
    """Same scaled gradients, with overflows injected, as Keras' LossScaleOptimizer."""
    params, grads = make_problem(seed=11, steps=40)
    scale0 = 64.0
    keras_opt = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.Adamax(0.05, weight_decay=0.01),
        initial_scale=scale0,
        dynamic_growth_steps=3,
    )
    tx = adamax(
        0.05,
        weight_decay=0.01,
        dynamic_loss_scale={"initial_scale": scale0, "growth_steps": 3},
    )
    keys = sorted(params)
    ours = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(ours)
    update = jax.jit(tx.update)
    keras_scales, our_scales = [], []
    with jax.numpy_dtype_promotion("standard"):
        variables = [keras.Variable(params[k], name=k.replace("/", "_")) for k in keys]
        keras_opt.build(variables)
        # Keras runs LossScaleOptimizer statelessly on JAX (its stateful path
        # leaks tracers from lax.cond), so drive it the way `fit` does.
        scale_index = [id(v) for v in keras_opt.variables].index(
            id(keras_opt.dynamic_scale)
        )
        optimizer_values = [v.value for v in keras_opt.variables]
        trainable_values = [v.value for v in variables]
        for i, g in enumerate(grads):
            scale = float(optimizer_values[scale_index])
            scaled = {k: v * scale for k, v in g.items()}
            if i % 7 == 3:
                scaled["dense/bias"] = scaled["dense/bias"].copy()
                scaled["dense/bias"][0] = np.inf
            trainable_values, optimizer_values = keras_opt.stateless_apply(
                optimizer_values, [scaled[k] for k in keys], trainable_values
            )
            keras_scales.append(float(optimizer_values[scale_index]))
            updates, state = update(scaled, state, ours)
            ours = optax.apply_updates(ours, updates)
            our_scales.append(float(get_loss_scale(state)))
    keras_params = {
        k: np.asarray(v) for k, v in zip(keys, trainable_values, strict=True)
    }
    assert our_scales == keras_scales
    assert len(set(keras_scales)) > 2  # it really grew and shrank
    assert_parity(ours, keras_params)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"initial_scale": 0.0}, "initial_scale=0.0"),
        ({"growth_steps": 0}, "growth_steps=0"),
        ({"factor": 1.0}, "`factor` must be > 1. Received: factor=1.0"),
        ({"min_loss_scale": -1.0}, "min_loss_scale=-1.0"),
        ({"initial_scale": 1.0, "min_loss_scale": 4.0}, "initial_scale=1.0"),
        ({"max_loss_scale": 0.0}, "max_loss_scale=0.0"),
        ({"initial_scale": 8.0, "max_loss_scale": 4.0}, "max_loss_scale=4.0"),
    ],
)
def test_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        dynamic_loss_scale(optax.sgd(1.0), **settings)
    with pytest.raises(ValueError, match=message):
        adamax(dynamic_loss_scale=settings)


def test_adamax_dynamic_loss_scale_argument_errors():
    with pytest.raises(ValueError, match="Unknown `dynamic_loss_scale` settings"):
        adamax(dynamic_loss_scale={"initial": 2.0})
    with pytest.raises(TypeError, match="dynamic_loss_scale='yes'"):
        adamax(dynamic_loss_scale="yes")
    with pytest.raises(ValueError, match="either `loss_scale_factor` or"):
        adamax(loss_scale_factor=2.0, dynamic_loss_scale=True)
