"""Configs: ``get_config`` / ``from_config`` round trips, and Keras' configs."""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import optax

from adamax_optax._alias import adamax, arguments_of


def _plain(value: Any) -> Any:
    """NumPy / JAX scalars as Python numbers, so that configs serialise to JSON
    (a dtype, whose ``shape`` is ``()`` too, is left to ``get_config``)."""
    if isinstance(value, np.dtype):
        return value
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral | np.integer):
        return int(value)
    if isinstance(value, numbers.Real | np.floating) or (
        hasattr(value, "shape") and np.shape(value) == ()
    ):
        return float(value)
    return value


def _is_keras_schedule(value: Any) -> bool:
    try:
        import keras
    except ImportError:
        return False
    return isinstance(value, keras.optimizers.schedules.LearningRateSchedule)


def _deserialize_schedule(value: Mapping[str, Any]) -> Any:
    try:
        import keras
    except ImportError as error:
        raise ImportError(
            "This config holds a serialised Keras learning-rate schedule; "
            "deserialising it needs Keras 3 (`pip install keras`)."
        ) from error
    return keras.optimizers.schedules.deserialize(dict(value))


def get_config(optimizer: optax.GradientTransformation) -> dict[str, Any]:
    """The arguments ``optimizer`` was built with, as a dict for :func:`from_config`.

    Numbers come back as Python numbers and ``state_dtype`` as a dtype name, so a
    config of plain values is JSON-serialisable. A Keras ``LearningRateSchedule``
    is serialised the way Keras serialises it; an optax schedule or other
    callable stays the callable itself (it round-trips in the same process).

    Args:
      optimizer: a transformation returned by :func:`adamax`.

    Returns:
      A dict of :func:`adamax`'s keyword arguments.

    Example:
      >>> from adamax_optax import adamax, from_config, get_config
      >>> config = get_config(adamax(0.01, clipnorm=1.0))
      >>> config["learning_rate"], config["clipnorm"], config["beta_1"]
      (0.01, 1.0, 0.9)
      >>> get_config(from_config(config)) == config
      True
    """
    config = {name: _plain(value) for name, value in arguments_of(optimizer).items()}
    learning_rate = config["learning_rate"]
    if _is_keras_schedule(learning_rate):
        import keras

        config["learning_rate"] = keras.optimizers.schedules.serialize(learning_rate)
    if config["state_dtype"] is not None:
        config["state_dtype"] = np.dtype(config["state_dtype"]).name
    if isinstance(config["exclude_from_weight_decay"], tuple | set | frozenset):
        config["exclude_from_weight_decay"] = sorted(
            config["exclude_from_weight_decay"]
        )
    if isinstance(config["dynamic_loss_scale"], Mapping):
        config["dynamic_loss_scale"] = {
            k: _plain(v) for k, v in config["dynamic_loss_scale"].items()
        }
    return config


def _deserialized(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with a serialised Keras schedule turned back into an object."""
    if isinstance(kwargs.get("learning_rate"), Mapping):
        kwargs["learning_rate"] = _deserialize_schedule(kwargs["learning_rate"])
    return kwargs


def from_config(config: Mapping[str, Any]) -> optax.GradientTransformationExtraArgs:
    """Builds the optimizer a :func:`get_config` dict describes.

    Args:
      config: keyword arguments of :func:`adamax`; a ``learning_rate`` given
        as a dict is a serialised Keras schedule.

    Returns:
      ``adamax(**config)``.

    Raises:
      ValueError: for a key :func:`adamax` does not take.

    Example:
      >>> from adamax_optax import from_config
      >>> tx = from_config({"learning_rate": 0.01, "use_ema": True})
    """
    accepted = set(inspect.signature(adamax).parameters)
    unknown = set(config) - accepted
    if unknown:
        raise ValueError(
            f"Unsupported config keys {sorted(unknown)}: `adamax` takes "
            f"{sorted(accepted)}."
        )
    return adamax(**_deserialized(dict(config)))
