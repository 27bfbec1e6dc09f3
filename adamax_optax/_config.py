"""Configs: ``get_config`` / ``from_config`` round trips, and Keras' configs."""

from __future__ import annotations

import inspect
import numbers
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import optax

from adamax_optax._alias import adamax, arguments_of

KERAS_ADAMAX_KEYS = frozenset(
    {
        "learning_rate",
        "beta_1",
        "beta_2",
        "epsilon",
        "weight_decay",
        "clipnorm",
        "clipvalue",
        "global_clipnorm",
        "use_ema",
        "ema_momentum",
        "ema_overwrite_frequency",
        "loss_scale_factor",
        "gradient_accumulation_steps",
    }
)
"""The keys of ``keras.optimizers.Adamax(...).get_config()`` that carry numerics."""

KERAS_IGNORED_KEYS = frozenset({"name", "jit_compile"})
"""Keys with no meaning here: no variable names; XLA compiles under ``jax.jit``."""

KERAS_BASE_DEFAULTS: Mapping[str, Any] = {
    "weight_decay": None,
    "clipnorm": None,
    "global_clipnorm": None,
    "clipvalue": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "loss_scale_factor": None,
    "gradient_accumulation_steps": None,
}
"""The base-optimizer keys that older Keras versions wrote into a
``LossScaleOptimizer`` config, at the values Keras accepts there."""

_KERAS_ADAMAX_NAME = re.compile(r"adamax(_\d+)?", re.IGNORECASE)
"""Keras' automatic names of ``Adamax`` optimizers: ``adamax``, ``adamax_1``..."""


def _plain(value: Any) -> Any:
    """NumPy / JAX scalars as Python numbers, so that configs serialise to JSON."""
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


def _keras_adamax_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """The :func:`adamax` arguments of a Keras ``Adamax`` config."""
    name = config.get("name")
    if name is not None and not _KERAS_ADAMAX_NAME.fullmatch(str(name)):
        raise ValueError(
            f"This config is named {name!r}, not an Adamax optimizer's name, and a "
            "bare Keras config does not say its class. Pass "
            "`keras.optimizers.serialize(optimizer)` (it carries "
            '`class_name`), or set `"name": "adamax"` if it is an Adamax.'
        )
    unsupported = set(config) - KERAS_ADAMAX_KEYS - KERAS_IGNORED_KEYS
    if unsupported:
        raise ValueError(
            f"Unsupported Keras Adamax config keys {sorted(unsupported)}; "
            f"supported: {sorted(KERAS_ADAMAX_KEYS | KERAS_IGNORED_KEYS)}."
        )
    return _deserialized({k: v for k, v in config.items() if k in KERAS_ADAMAX_KEYS})


def from_keras_config(
    config: Mapping[str, Any],
) -> optax.GradientTransformationExtraArgs:
    """Builds the optimizer from ``keras.optimizers.Adamax(...).get_config()``.

    Also accepts the config of a ``keras.optimizers.LossScaleOptimizer`` wrapping
    an ``Adamax``: it becomes ``adamax(..., dynamic_loss_scale={...})``; the
    older format, which also carries the base-optimizer keys
    (``weight_decay: None``, ``clipnorm: None``, ...), is accepted when they
    hold Keras' defaults. Either config may come as
    ``keras.optimizers.serialize`` writes it (``{"class_name": ..., "config":
    ...}``). A serialised Keras schedule is deserialised (this needs Keras
    installed). ``name`` and tf.keras' ``jit_compile`` (which Keras 3 refuses)
    are accepted and ignored (no variable names here; XLA compiles whatever you
    ``jax.jit``); any other key
    this library cannot honour is an error, never silently dropped.

    A bare config does not name its class, so its ``name`` must be Keras'
    automatic name for an Adamax (``"adamax"``, ``"adamax_1"``, ...): the
    config of an ``Adam`` (``"adam"``) is refused, never built as an Adamax.

    Args:
      config: a Keras optimizer config.

    Returns:
      The equivalent :func:`adamax` transformation.

    Raises:
      ValueError: for keys, values or optimizer classes that are not supported.

    Example:
      >>> from adamax_optax import from_keras_config, get_config
      >>> keras_config = {"name": "adamax", "learning_rate": 0.002,
      ...                 "beta_1": 0.8, "clipvalue": 0.5}
      >>> config = get_config(from_keras_config(keras_config))
      >>> config["learning_rate"], config["beta_1"], config["clipvalue"]
      (0.002, 0.8, 0.5)
    """
    if "class_name" in config:
        class_name = config["class_name"]
        if class_name not in ("Adamax", "LossScaleOptimizer"):
            raise ValueError(
                "Only Keras' Adamax, or a LossScaleOptimizer wrapping one, is "
                f"supported. Received class_name={class_name!r}"
            )
        config = dict(config["config"])
        if class_name == "Adamax":
            config.pop("name", None)  # the class says what it is
    if "inner_optimizer" not in config:
        return adamax(**_keras_adamax_kwargs(config))
    known = {"name", "inner_optimizer", "initial_scale", "dynamic_growth_steps"}
    unsupported = set(config) - known - set(KERAS_BASE_DEFAULTS)
    if unsupported:
        raise ValueError(
            f"Unsupported Keras LossScaleOptimizer config keys {sorted(unsupported)}."
        )
    for key, default in KERAS_BASE_DEFAULTS.items():
        if key in config and config[key] != default:
            raise ValueError(
                f"A LossScaleOptimizer config sets `{key}={config[key]!r}`; Keras "
                f"only accepts {default!r} there (set it on the inner optimizer)."
            )
    inner = config["inner_optimizer"]
    class_name = inner.get("class_name") if isinstance(inner, Mapping) else None
    if class_name != "Adamax":
        raise ValueError(
            "Only a LossScaleOptimizer wrapping Adamax is supported. Received "
            f"inner optimizer: {class_name or inner!r}"
        )
    inner_config = dict(inner["config"])
    inner_config.pop("name", None)  # its class_name says Adamax
    if inner_config.pop("loss_scale_factor", None) is not None:
        raise ValueError(
            "A LossScaleOptimizer disables its inner optimizer's "
            "`loss_scale_factor`, but this config sets one."
        )
    scaling = {
        "initial_scale": config.get("initial_scale", 2.0**15),
        "growth_steps": config.get("dynamic_growth_steps", 2000),
    }
    return adamax(**_keras_adamax_kwargs(inner_config), dynamic_loss_scale=scaling)
