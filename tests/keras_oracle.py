"""Runs real ``keras.optimizers.Adamax`` (JAX backend) on the same gradients."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import keras
import numpy as np

assert keras.backend.backend() == "jax", "the parity oracle is Keras on JAX"


def keras_name(key: str) -> str:
    """Keras variable names cannot hold ``/``."""
    return key.replace("/", "_")


def run_keras(
    params: dict[str, np.ndarray],
    grads: list[dict[str, np.ndarray]],
    *,
    exclude_from_weight_decay: list[str] | None = None,
    **kwargs,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Applies ``grads`` with Keras; returns final params and EMA (``None`` if off).

    Keras' own code is run under standard dtype promotion: the strict mode of
    our test suite is for our code, not the oracle's.
    """
    keys = sorted(params)
    with jax.numpy_dtype_promotion("standard"):
        optimizer = keras.optimizers.Adamax(**kwargs)
        if exclude_from_weight_decay:
            optimizer.exclude_from_weight_decay(var_names=exclude_from_weight_decay)
        variables = [keras.Variable(params[k], name=keras_name(k)) for k in keys]
        optimizer.build(variables)
        # Keras' own step, compiled as `fit` compiles it on JAX: the same
        # code as `apply`, traced once instead of run eagerly 50 times.
        step = jax.jit(optimizer.stateless_apply)
        state = [v.value for v in optimizer.variables]
        values = [v.value for v in variables]
        for g in grads:
            values, state = step(state, [g[k] for k in keys], values)
        for variable, value in zip(optimizer.variables, state, strict=True):
            variable.assign(value)
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)
        final = {k: np.asarray(v.value) for k, v in zip(keys, variables, strict=True)}
        ema = None
        if optimizer.use_ema:
            optimizer.finalize_variable_values(variables)
            ema = {k: np.asarray(v.value) for k, v in zip(keys, variables, strict=True)}
    return final, ema
