"""Config round trips, and building from real Keras configs."""

from __future__ import annotations

import json

import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from conftest import assert_parity, make_problem, run_ours
from keras_oracle import run_keras

from adamax_optax import adamax, from_config, from_keras_config, get_config
from adamax_optax.keras import KERAS_BASE_DEFAULTS

FULL = {
    "learning_rate": 0.01,
    "beta_1": 0.8,
    "beta_2": 0.99,
    "epsilon": 1e-6,
    "weight_decay": 0.01,
    "global_clipnorm": 1.0,
    "use_ema": True,
    "ema_momentum": 0.9,
    "ema_overwrite_frequency": 5,
    "gradient_accumulation_steps": 2,
    "exclude_from_weight_decay": ["bias"],
    "state_dtype": jnp.float32,
    "dynamic_loss_scale": {"initial_scale": 1024.0},
}


def test_round_trip_is_json_serialisable_and_stable():
    config = get_config(adamax(**FULL))
    assert config["state_dtype"] == "float32"
    assert config["dynamic_loss_scale"] == {"initial_scale": 1024.0}
    restored = json.loads(json.dumps(config))
    assert get_config(from_config(restored)) == config


@pytest.mark.parametrize(
    "state_dtype",
    [jnp.bfloat16, "bfloat16", np.dtype("float32"), jnp.dtype("bfloat16")],
    ids=["type", "name", "numpy dtype", "jax dtype"],
)
def test_state_dtype_is_written_as_its_name(state_dtype):
    # A dtype instance (`params["w"].dtype`) has `shape == ()` like a scalar.
    config = get_config(adamax(state_dtype=state_dtype))
    assert config["state_dtype"] == np.dtype(state_dtype).name
    assert json.loads(json.dumps(config))["state_dtype"] == config["state_dtype"]


def test_round_trip_gives_the_same_numbers():
    params, grads = make_problem(steps=8)
    config = {k: v for k, v in FULL.items() if k != "dynamic_loss_scale"}
    a, _ = run_ours(adamax(**config), params, grads)
    b, _ = run_ours(
        from_config(json.loads(json.dumps(get_config(adamax(**config))))), params, grads
    )
    for key in a:
        assert bool(jnp.all(a[key] == b[key]))


def test_keras_schedule_serialises_like_keras():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    config = get_config(adamax(schedule))
    assert (
        config["learning_rate"]
        == keras.optimizers.Adamax(schedule).get_config()["learning_rate"]
    )
    restored = from_config(json.loads(json.dumps(config)))
    assert get_config(restored)["learning_rate"] == config["learning_rate"]


def test_optax_schedule_round_trips_in_process():
    schedule = optax.linear_schedule(0.1, 0.0, 10)
    assert get_config(from_config(get_config(adamax(schedule))))["learning_rate"] is (
        schedule
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"learning_rate": 0.05, "beta_1": 0.8, "weight_decay": 0.05, "clipnorm": 0.5},
        {"learning_rate": 0.05, "use_ema": True, "ema_overwrite_frequency": 3},
        # Keras keeps a NumPy scalar in its config as given.
        {"learning_rate": 0.05, "use_ema": True, "ema_momentum": np.float32(0.9)},
        {
            "learning_rate": 0.05,
            "gradient_accumulation_steps": 2,
            "loss_scale_factor": 4.0,
            "global_clipnorm": 1.0,
        },
    ],
)
def test_from_keras_config_reproduces_keras(kwargs):
    params, grads = make_problem(seed=9, steps=20)
    keras_config = keras.optimizers.Adamax(**kwargs).get_config()
    keras_params, _ = run_keras(params, grads, **kwargs)
    ours, _ = run_ours(from_keras_config(keras_config), params, grads)
    assert_parity(ours, keras_params)


def test_from_keras_config_with_schedule_and_loss_scale_optimizer():
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([5], [0.1, 0.01])
    inner = keras.optimizers.Adamax(schedule, clipvalue=0.5)
    config = keras.optimizers.LossScaleOptimizer(
        inner, initial_scale=128.0, dynamic_growth_steps=10
    ).get_config()
    ours = get_config(from_keras_config(config))
    assert ours["dynamic_loss_scale"] == {"initial_scale": 128.0, "growth_steps": 10}
    assert ours["clipvalue"] == 0.5
    assert ours["learning_rate"]["class_name"] == "PiecewiseConstantDecay"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"learning_rate": 0.1, "amsgrad": True},
            r"Unsupported Keras Adamax config keys \['amsgrad'\]",
        ),
        ({"decay": 0.1}, "decay"),
    ],
)
def test_unsupported_keras_keys_are_errors(config, message):
    with pytest.raises(ValueError, match=message):
        from_keras_config(config)


def test_unsupported_loss_scale_inner_optimizer():
    config = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam()).get_config()
    with pytest.raises(ValueError, match="wrapping Adamax"):
        from_keras_config(config)


def test_from_config_rejects_unknown_keys_and_get_config_foreign_optimizers():
    with pytest.raises(ValueError, match=r"Unsupported config keys \['momentum'\]"):
        from_config({"momentum": 0.9})
    with pytest.raises(ValueError, match=r"built by `adamax_optax\.adamax"):
        get_config(optax.adam(0.1))


def test_keras_older_loss_scale_optimizer_config_is_accepted():
    """Keras' own backward-compatibility case: the base-optimizer keys at their
    defaults (Keras' ``test_deserialization_backwards_compatibility``)."""
    inner = keras.optimizers.Adamax(0.5, clipvalue=0.25)
    config = {
        "name": "loss_scale_optimizer",
        **KERAS_BASE_DEFAULTS,
        "inner_optimizer": keras.optimizers.serialize(inner),
        "initial_scale": 2.0,
        "dynamic_growth_steps": 2,
    }
    ours = get_config(from_keras_config(config))
    assert ours["dynamic_loss_scale"] == {"initial_scale": 2.0, "growth_steps": 2}
    assert (ours["learning_rate"], ours["clipvalue"]) == (0.5, 0.25)
    with pytest.raises(ValueError, match=r"sets `clipnorm=1\.0`"):
        from_keras_config({**config, "clipnorm": 1.0})


@pytest.mark.parametrize(
    "optimizer", ["Adam", "SGD", "AdamW"], ids=lambda name: name.lower()
)
def test_a_non_adamax_keras_config_is_an_error(optimizer):
    keras_optimizer = getattr(keras.optimizers, optimizer)()
    config = keras_optimizer.get_config()
    config.pop("amsgrad", None)  # an Adam without amsgrad has only Adamax keys
    with pytest.raises(ValueError, match=r"not an Adamax optimizer's name"):
        from_keras_config(config)
    with pytest.raises(ValueError, match=f"class_name='{optimizer}'"):
        from_keras_config(keras.optimizers.serialize(keras_optimizer))


def test_serialized_keras_adamax_with_a_custom_name_is_accepted():
    serialized = keras.optimizers.serialize(keras.optimizers.Adamax(0.3, name="mine"))
    config = get_config(from_keras_config(serialized))
    assert config["learning_rate"] == pytest.approx(0.3)
