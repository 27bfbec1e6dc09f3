"""Live parity with ``keras.optimizers.Adamax`` on the JAX backend.

The tolerance is ``1e-6 * (1 + max|w|)``.

Both optimizers get the same 50 random gradients; after the last step every
parameter (and the EMA, where on) must agree within ``1e-6 * (1 + max|w_keras|)``.
"""

from __future__ import annotations

import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from conftest import assert_parity, make_problem, run_ours
from keras_oracle import run_keras

from adamax_optax import adamax, finalize_variable_values


def exponential_decay():
    return keras.optimizers.schedules.ExponentialDecay(0.05, 7, 0.5)


def piecewise():
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        [10, 25], [0.05, 0.02, 0.005]
    )


def cosine_warmup():
    return keras.optimizers.schedules.CosineDecay(
        0.0, 40, warmup_target=0.03, warmup_steps=10
    )


# Each entry: an id and the Keras keyword arguments, applied to both optimizers.
# Schedules are factories so that each optimizer gets its own object.
CONFIGS = {
    "defaults": {},
    "large_lr": {"learning_rate": 0.1},
    "betas_epsilon": {"beta_1": 0.5, "beta_2": 0.9, "epsilon": 1e-3},
    "beta_1_zero": {"learning_rate": 0.01, "beta_1": 0.0},
    "weight_decay": {"learning_rate": 0.05, "weight_decay": 0.1},
    "weight_decay_excluded": {
        "learning_rate": 0.05,
        "weight_decay": 0.1,
        "exclude_from_weight_decay": ["bias"],
    },
    "clipnorm": {"learning_rate": 0.05, "clipnorm": 0.5},
    "global_clipnorm": {"learning_rate": 0.05, "global_clipnorm": 1.0},
    "clipvalue": {"learning_rate": 0.05, "clipvalue": 0.3},
    "ema": {"learning_rate": 0.05, "use_ema": True},
    "ema_momentum": {"learning_rate": 0.05, "use_ema": True, "ema_momentum": 0.7},
    "ema_overwrite": {
        "learning_rate": 0.05,
        "use_ema": True,
        "ema_momentum": 0.8,
        "ema_overwrite_frequency": 4,
    },
    "loss_scale_factor": {"learning_rate": 0.05, "loss_scale_factor": 256.0},
    "accumulation_2": {"learning_rate": 0.05, "gradient_accumulation_steps": 2},
    "accumulation_3": {"learning_rate": 0.05, "gradient_accumulation_steps": 3},
    "schedule_exponential": {"learning_rate": exponential_decay},
    "schedule_piecewise": {"learning_rate": piecewise},
    "schedule_cosine_warmup": {"learning_rate": cosine_warmup},
    "schedule_under_accumulation": {
        "learning_rate": exponential_decay,
        "gradient_accumulation_steps": 3,
    },
    "zero_argument_callable": {"learning_rate": lambda: 0.02},
    "clip_decay_ema_scale": {
        "learning_rate": 0.05,
        "weight_decay": 0.05,
        "global_clipnorm": 2.0,
        "use_ema": True,
        "ema_overwrite_frequency": 5,
        "loss_scale_factor": 8.0,
    },
    "everything_but_ema_with_accumulation": {
        "learning_rate": piecewise,
        "beta_1": 0.8,
        "weight_decay": 0.02,
        "clipnorm": 1.0,
        "loss_scale_factor": 4.0,
        "gradient_accumulation_steps": 4,
        "exclude_from_weight_decay": ["bias"],
    },
    "clipvalue_decay_schedule_ema": {
        "learning_rate": cosine_warmup,
        "weight_decay": 0.2,
        "clipvalue": 1.0,
        "use_ema": True,
        "ema_momentum": 0.9,
    },
}


def build(config: dict) -> dict:
    """Fresh keyword arguments: schedule factories are called."""
    kwargs = dict(config)
    lr = kwargs.get("learning_rate")
    if callable(lr) and lr.__name__ != "<lambda>":
        kwargs["learning_rate"] = lr()
    return kwargs


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_parity_after_50_steps(config):
    params, grads = make_problem(seed=1, steps=50)
    keras_params, keras_ema = run_keras(params, grads, **build(config))
    ours, state = run_ours(adamax(**build(config)), params, grads)
    assert_parity(ours, keras_params)
    if keras_ema is not None:
        assert_parity(finalize_variable_values(ours, state), keras_ema)


@pytest.mark.parametrize("name", ["weight_decay", "clip_decay_ema_scale"])
def test_parity_without_jit(name):
    config = CONFIGS[name]
    params, grads = make_problem(seed=2, steps=20)
    keras_params, _ = run_keras(params, grads, **build(config))
    ours, _ = run_ours(adamax(**build(config)), params, grads, jit=False)
    assert_parity(ours, keras_params)


def test_parity_with_large_and_zero_gradients():
    """Clipping's zero-leaf branch and large norms, against Keras."""
    params, grads = make_problem(seed=3, steps=30, scale=50.0)
    for g in grads[::3]:
        g["dense/bias"] = np.zeros_like(g["dense/bias"])
    for config in ({"clipnorm": 0.1}, {"global_clipnorm": 0.1}):
        keras_params, _ = run_keras(params, grads, learning_rate=0.05, **config)
        ours, _ = run_ours(adamax(0.05, **config), params, grads)
        assert_parity(ours, keras_params)


def test_keras_golden_value():
    """Keras' own test: lr=0.5, grads [1, 6, 7, 2], vars [1, 2, 3, 4]."""
    tx = adamax(learning_rate=0.5)
    params = jnp.array([1.0, 2.0, 3.0, 4.0])
    updates, _ = tx.update(jnp.array([1.0, 6.0, 7.0, 2.0]), tx.init(params))
    np.testing.assert_allclose(
        optax.apply_updates(params, updates), [0.5, 1.5, 2.5, 3.5], rtol=1e-6
    )


def test_keras_golden_value_matches_keras_itself():
    params = {"w": np.array([1.0, 2.0, 3.0, 4.0], np.float32)}
    grads = [{"w": np.array([1.0, 6.0, 7.0, 2.0], np.float32)}]
    keras_params, _ = run_keras(params, grads, learning_rate=0.5)
    ours, _ = run_ours(adamax(0.5), params, grads)
    np.testing.assert_array_equal(ours["w"], keras_params["w"])
