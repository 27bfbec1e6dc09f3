"""Keras optimizer state carried into JAX and back (Keras 3, JAX backend).

Each round trip trains ``k`` steps on one side, carries the state over,
continues ``m`` steps there, and compares with the other side continuing the
same ``m`` steps: within the parity tolerance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from conftest import assert_parity, make_problem, run_ours

import adamax_optax as ao
from adamax_optax import adamax, from_keras_optimizer, to_keras_optimizer

KEYS = ["dense/bias", "dense/kernel", "out/kernel"]
K, M = 7, 8


def problem(scale=3.0):
    params, grads = make_problem(steps=K + M, scale=scale)
    return [params[k] for k in KEYS], [[g[k] for k in KEYS] for g in grads]


def keras_variables(values):
    return [keras.Variable(np.asarray(v)) for v in values]


def keras_train(optimizer, variables, grads):
    """Keras' steps, run the way ``fit`` runs them on JAX (``stateless_apply``:
    a LossScaleOptimizer's stateful path leaks tracers there), then written
    back into the variables."""
    with jax.numpy_dtype_promotion("standard"):  # Keras' own code
        if not optimizer.built:
            optimizer.build(variables)
        state = [v.value for v in optimizer.variables]
        values = [v.value for v in variables]
        for g in grads:
            values, state = optimizer.stateless_apply(
                state, [np.asarray(x) for x in g], values
            )
        for variable, value in zip(optimizer.variables, state, strict=True):
            variable.assign(value)
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)


def as_dict(values):
    return {k: np.asarray(v) for k, v in zip(KEYS, values, strict=True)}


SCHEDULE = keras.optimizers.schedules.ExponentialDecay(0.01, 5, 0.9)
CASES = {
    # EMA and accumulation apart: Keras moves its EMA on every micro-step.
    "decay, clipping, EMA with overwrite": lambda: keras.optimizers.Adamax(
        0.01,
        weight_decay=0.01,
        global_clipnorm=1.0,
        use_ema=True,
        ema_momentum=0.9,
        ema_overwrite_frequency=3,
    ),
    "schedule, decay, clipnorm, accumulation stopped mid-group": lambda: (
        keras.optimizers.Adamax(
            SCHEDULE, weight_decay=0.01, clipnorm=1.0, gradient_accumulation_steps=3
        )
    ),
    "LossScaleOptimizer": lambda: keras.optimizers.LossScaleOptimizer(
        keras.optimizers.Adamax(0.01, weight_decay=0.01, clipvalue=0.5),
        initial_scale=2.0**4,
        dynamic_growth_steps=3,
    ),
}


def with_overflows(grads):
    """Two non-finite steps, one on each side of the hand-over."""
    grads = [list(g) for g in grads]
    grads[4][0] = grads[4][0] * np.inf  # 2 finite steps follow: a count of 2
    grads[K + 2][1] = grads[K + 2][1] * np.nan
    return grads


def ema_of(optimizer, variables):
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if not inner.use_ema:
        return None
    return as_dict(v.value for v in inner._model_variables_moving_average)


@pytest.mark.parametrize("name", CASES)
def test_keras_to_jax(name):
    params, grads = problem()
    if "LossScale" in name:
        grads = with_overflows(grads)
    variables = keras_variables(params)
    optimizer = CASES[name]()
    keras_train(optimizer, variables, grads[:K])
    tx, state = from_keras_optimizer(optimizer, variables)
    ours, state = run_ours(tx, [v.value for v in variables], grads[K:], state=state)
    keras_train(optimizer, variables, grads[K:])
    assert_parity(as_dict(ours), as_dict(v.value for v in variables))
    keras_ema = ema_of(optimizer, variables)
    if keras_ema is not None:
        assert_parity(as_dict(ao.finalize_variable_values(ours, state)), keras_ema)
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    assert int(ao.get_iterations(state)) == int(inner.iterations)
    if "LossScale" in name:
        assert float(ao.get_loss_scale(state)) == float(optimizer.dynamic_scale)


OURS = {
    "decay, clipping, EMA with overwrite": dict(
        weight_decay=0.01,
        global_clipnorm=1.0,
        use_ema=True,
        ema_momentum=0.9,
        ema_overwrite_frequency=3,
    ),
    "schedule, decay, clipnorm, accumulation stopped mid-group": dict(
        learning_rate=SCHEDULE,
        weight_decay=0.01,
        clipnorm=1.0,
        gradient_accumulation_steps=3,
    ),
    "LossScaleOptimizer": dict(
        weight_decay=0.01,
        clipvalue=0.5,
        dynamic_loss_scale={"initial_scale": 2.0**4, "growth_steps": 3},
    ),
    "LossScaleOptimizer, default settings": dict(dynamic_loss_scale=True),
    "LossScaleOptimizer, some settings": dict(dynamic_loss_scale={"growth_steps": 3}),
}


@pytest.mark.parametrize("name", OURS)
def test_jax_to_keras(name):
    params, grads = problem()
    if "LossScale" in name:
        grads = with_overflows(grads)
    options = {"learning_rate": 0.01, **OURS[name]}
    tx = adamax(**options)
    mid, state = run_ours(tx, params, grads[:K])
    variables = keras_variables(mid)
    optimizer = to_keras_optimizer(tx, state, variables)
    keras_train(optimizer, variables, grads[K:])
    ours, state = run_ours(tx, mid, grads[K:], state=state)
    assert_parity(as_dict(ours), as_dict(v.value for v in variables))
    keras_ema = ema_of(optimizer, variables)
    if keras_ema is not None:
        assert_parity(as_dict(ao.finalize_variable_values(ours, state)), keras_ema)
    if "LossScale" in name:
        assert float(ao.get_loss_scale(state)) == float(optimizer.dynamic_scale)


def test_what_cannot_carry_over_is_refused():
    variables = keras_variables([np.ones(3, np.float32)])
    with pytest.raises(TypeError, match="Received: Adam"):
        from_keras_optimizer(keras.optimizers.Adam(), variables)
    with pytest.raises(ValueError, match="zero-argument callable"):
        from_keras_optimizer(keras.optimizers.Adamax(lambda: 0.01), variables)
    params = [v.value for v in variables]
    refused = {
        "skip_nonfinite=True": dict(skip_nonfinite=True),
        "ema_warmup=True": dict(use_ema=True, ema_warmup=True),
        "exclude_from_ema": dict(use_ema=True, exclude_from_ema=["0"]),
        "state_dtype=bfloat16": dict(state_dtype=jnp.bfloat16),
        "optax schedule": dict(learning_rate=optax.linear_schedule(0.1, 0.0, 10)),
        "max_loss_scale=": dict(dynamic_loss_scale={"max_loss_scale": 2.0**20}),
    }
    for message, options in refused.items():
        tx = adamax(**options)
        with pytest.raises(ValueError, match=message.split("=")[0]):
            to_keras_optimizer(tx, tx.init(params), variables)
    tx = adamax(gradient_accumulation_steps=4)
    _, state = tx.update(params, tx.init(params), params, weight=3.0)
    with pytest.raises(ValueError, match="weighted accumulation group"):
        to_keras_optimizer(tx, state, variables)


def test_export_refuses_what_a_migration_left_unlike_keras():
    """A schedule moved to another N, or a group longer than N: Keras'
    iteration counter cannot say either."""
    variables = keras_variables([np.ones(3, np.float32)])
    params = [v.value for v in variables]
    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, 5, 0.9)
    one = adamax(schedule)
    state = one.init(params)
    for _ in range(3):
        _, state = one.update(params, state, params)
    four = adamax(schedule, gradient_accumulation_steps=4)
    state = ao.migrate_state(four, state, params)
    with pytest.raises(ValueError, match="schedule is at step 3, but Keras"):
        to_keras_optimizer(four, state, variables)
    eight = adamax(gradient_accumulation_steps=8)
    state = eight.init(params)
    for _ in range(6):
        _, state = eight.update(params, state, params)
    two = adamax(gradient_accumulation_steps=2)
    state = ao.migrate_state(two, state, params)
    with pytest.raises(ValueError, match="holds 6 calls, more than"):
        to_keras_optimizer(two, state, variables)
