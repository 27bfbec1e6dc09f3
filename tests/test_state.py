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
    has_updated,
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


def test_an_injected_schedule_reads_as_the_last_update_used_it():
    # As documented: optax evaluates an injected schedule when an update runs.
    schedule = optax.linear_schedule(0.1, 0.0, 8)
    injected = optax.inject_hyperparams(adamax)(learning_rate=schedule)
    _, state = run(injected, 3)
    assert float(get_learning_rate(state)) == pytest.approx(float(schedule(2)))
    _, state = run(adamax(schedule), 3)
    assert float(get_learning_rate(state)) == pytest.approx(float(schedule(3)))


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


def multisteps_has_updated(gradients, steps):
    """``optax.MultiSteps.has_updated`` after each call, skipping non-finite
    gradients as ``adamax(skip_nonfinite=True)`` does."""
    multi = optax.MultiSteps(
        optax.adamax(1e-3), steps, should_skip_update_fn=optax.skip_not_finite
    )
    seen = []
    with jax.numpy_dtype_promotion("standard"):  # optax's own code
        state = multi.init(jnp.zeros(2))
        for g in gradients:
            _, state = multi.update(jnp.asarray(g), state, jnp.zeros(2))
            seen.append(bool(multi.has_updated(state)))
    return seen


def has_updated_after_each_call(tx, gradients, flushes=()):
    state = tx.init(jnp.zeros(2))
    seen = []
    for i, g in enumerate(gradients):
        extra = {"flush": True} if i in flushes else {}
        _, state = tx.update(jnp.asarray(g), state, jnp.zeros(2), **extra)
        seen.append(bool(has_updated(state)))
    return seen


GOOD, BAD = [1.0, 2.0], [np.nan, 1.0]


@pytest.mark.parametrize("steps", [None, 3])
def test_has_updated_equals_optax_multisteps(steps):
    # Skips only where the last call was not an update: there optax agrees.
    calls = [GOOD, GOOD, BAD, GOOD, GOOD, GOOD, BAD, GOOD, GOOD, GOOD]
    if steps is None:
        calls = [GOOD, GOOD, GOOD]
    tx = adamax(gradient_accumulation_steps=steps, skip_nonfinite=True)
    ours = has_updated_after_each_call(tx, calls)
    assert ours == multisteps_has_updated(calls, steps or 1)
    if steps == 3:  # the updates: the 3rd good call of each group
        assert [i for i, updated in enumerate(ours) if updated] == [3, 7]


@pytest.mark.parametrize(
    "options",
    [dict(skip_nonfinite=True), dict(dynamic_loss_scale=True)],
)
def test_a_skipped_call_right_after_an_update_is_not_an_update(options):
    calls = [GOOD, GOOD, BAD, GOOD]
    tx = adamax(gradient_accumulation_steps=2, **options)
    assert has_updated_after_each_call(tx, calls) == [False, True, False, False]
    # optax's reads its counters only, unchanged by the skip: True.
    assert multisteps_has_updated(calls, 2) == [False, True, True, False]
    no_accumulation = adamax(**options)
    assert has_updated_after_each_call(no_accumulation, calls) == [
        True,
        True,
        False,
        True,
    ]


def test_has_updated_after_flushes_and_empty_groups():
    tx = adamax(gradient_accumulation_steps=4)
    # A flush ends a partial group with an update.
    assert has_updated_after_each_call(tx, [GOOD, GOOD, GOOD], flushes={1}) == [
        False,
        True,
        False,
    ]
    # A group of zero weight applies no update, flushed or not.
    state = tx.init(jnp.zeros(2))
    _, state = tx.update(jnp.asarray(GOOD), state, weight=0.0, flush=True)
    assert not bool(has_updated(state)) and int(get_iterations(state)) == 0
    assert not bool(has_updated(adamax().init(jnp.zeros(2))))  # nothing yet
