"""Keras interop: a Keras ``Adamax`` (config or trained optimizer) to JAX and back.

``from_keras_config`` builds :func:`adamax_optax.adamax` from a Keras config;
``from_keras_optimizer`` carries a trained Keras optimizer's state into JAX, and
``to_keras_optimizer`` a state back into a Keras optimizer. All three are
host-side code, run once, outside ``jit``; the top-level package re-exports
them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamax_optax import _common, _grouping
from adamax_optax._accumulation import AccumulateGradientsState
from adamax_optax._adamax import ScaleByKerasAdamaxState
from adamax_optax._alias import _dynamic_loss_scale_settings, adamax, arguments_of
from adamax_optax._config import from_config
from adamax_optax._dynamic_loss_scale import (
    DYNAMIC_LOSS_SCALE_DEFAULTS,
    DynamicLossScaleState,
)
from adamax_optax._ema import ParameterEMAState
from adamax_optax._learning_rate import (
    ScaleByKerasLearningRateState,
    takes_no_arguments,
)
from adamax_optax._migration import migrate_state, state_mismatch

__all__ = ["from_keras_config", "from_keras_optimizer", "to_keras_optimizer"]

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

KERAS_SCALING = {
    key: DYNAMIC_LOSS_SCALE_DEFAULTS[key] for key in ("initial_scale", "growth_steps")
}
"""Keras' ``LossScaleOptimizer`` defaults, which are this library's."""


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
    return {k: v for k, v in config.items() if k in KERAS_ADAMAX_KEYS}


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
        return from_config(_keras_adamax_kwargs(config))
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
        "initial_scale": config.get("initial_scale", KERAS_SCALING["initial_scale"]),
        "growth_steps": config.get(
            "dynamic_growth_steps", KERAS_SCALING["growth_steps"]
        ),
    }
    return from_config(
        {**_keras_adamax_kwargs(inner_config), "dynamic_loss_scale": scaling}
    )


def _keras() -> Any:
    try:
        import keras
    except ImportError as error:  # pragma: no cover - Keras is in every extra
        raise ImportError(
            "Carrying optimizer state to or from Keras needs Keras 3 "
            "(`pip install keras`)."
        ) from error
    return keras


def _values(variables: Sequence[Any]) -> list[jax.Array]:
    return [jnp.asarray(v.value if hasattr(v, "value") else v) for v in variables]


def _split_loss_scale(optimizer: Any) -> tuple[Any, Any]:
    """``(the Adamax, the LossScaleOptimizer around it or None)``, or a clear
    error for anything else."""
    keras = _keras()
    scaler = None
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        scaler, optimizer = optimizer, optimizer.inner_optimizer
    if not isinstance(optimizer, keras.optimizers.Adamax):
        raise TypeError(
            "Only `keras.optimizers.Adamax`, or a `LossScaleOptimizer` around "
            f"one, carries over. Received: {type(optimizer).__name__}"
        )
    return optimizer, scaler


def _current_learning_rate(optimizer: Any) -> Any:
    """The rate as the optimizer holds it now: a float, or its schedule."""
    keras = _keras()
    rate = optimizer._learning_rate
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        return rate
    if callable(rate) and takes_no_arguments(rate):
        raise ValueError(
            f"The optimizer's `learning_rate={rate!r}` is a zero-argument "
            "callable, whose value cannot be carried over (it may read "
            "anything). Use a float or a "
            "`keras.optimizers.schedules.LearningRateSchedule`."
        )
    return float(np.asarray(rate.value if hasattr(rate, "value") else rate))


def from_keras_optimizer(
    optimizer: Any, variables: Sequence[Any]
) -> tuple[optax.GradientTransformationExtraArgs, optax.OptState]:
    r"""The optax twin of a Keras ``Adamax``, with its state, to continue in JAX.

    ``optimizer`` is a ``keras.optimizers.Adamax`` (or a
    ``keras.optimizers.LossScaleOptimizer`` around one) and ``variables`` the
    model variables it trains, in the order it was built with: they are mapped
    by position, since Keras names can collide. The parameters are then the
    list of their values, ``[v.value for v in variables]``.

    Everything carries over: every option; the learning rate as the optimizer
    holds it now (a float, or its ``LearningRateSchedule``); and its state:
    ``m`` and ``u``, the update count (``iteration // N``) and the schedule's
    step, the EMA, the accumulator and its micro-step (``iteration % N``), the
    loss scale and its count of finite steps. An unbuilt optimizer gives a
    fresh state. Keras moves its EMA on every micro-step under accumulation
    (a documented departure): such an EMA is imported as Keras left it.

    Args:
      optimizer: a built Keras ``Adamax`` or ``LossScaleOptimizer``.
      variables: its trainable variables, in build order.

    Returns:
      ``(tx, opt_state)``: ``tx`` is an :func:`adamax` transformation and
      ``opt_state`` its state for ``params = [v.value for v in variables]``.

    Raises:
      TypeError: for another optimizer class.
      ValueError: for a zero-argument callable learning rate, or variables
        unlike those the optimizer was built with.

    Example:
      >>> import os; os.environ.setdefault("KERAS_BACKEND", "jax")
      'jax'
      >>> import keras, numpy as np
      >>> from adamax_optax import from_keras_optimizer, get_iterations
      >>> variables = [keras.Variable(np.ones(3, "float32"))]
      >>> optimizer = keras.optimizers.Adamax(0.1)
      >>> for _ in range(2):
      ...     optimizer.apply([np.ones(3, "float32")], variables)
      >>> tx, state = from_keras_optimizer(optimizer, variables)
      >>> params = [v.value for v in variables]
      >>> int(get_iterations(state)), float(state["adamax"].u[0][0])
      (2, 1.0)
    """
    adamax_optimizer, scaler = _split_loss_scale(optimizer)
    learning_rate = _current_learning_rate(adamax_optimizer)
    config = dict(adamax_optimizer.get_config())
    config.pop("name", None)
    config["learning_rate"] = 0.0  # the Keras form; replaced below
    kwargs = _keras_adamax_kwargs(config)
    kwargs["learning_rate"] = learning_rate
    if scaler is not None:
        kwargs["loss_scale_factor"] = None
        kwargs["dynamic_loss_scale"] = {
            "initial_scale": float(scaler.initial_scale),
            "growth_steps": int(scaler.dynamic_growth_steps),
        }
    tx = adamax(**kwargs)
    params = _values(variables)
    if not adamax_optimizer.built:
        return tx, tx.init(params)
    built = adamax_optimizer._trainable_variables
    if len(built) != len(params) or any(
        np.shape(b) != np.shape(p) for b, p in zip(built, params, strict=False)
    ):
        raise ValueError(
            "`variables` must be the variables the optimizer was built with, in "
            f"that order: it was built with {len(built)} of shapes "
            f"{[tuple(b.shape) for b in built]}, received {len(params)} of shapes "
            f"{[tuple(np.shape(p)) for p in params]}."
        )
    steps = adamax_optimizer.gradient_accumulation_steps or 1
    iteration = int(np.asarray(adamax_optimizer._iterations.value))
    updates, micro_step = divmod(iteration, steps)
    updates_state: dict[str, Any] = {
        "adamax": {
            "count": updates,
            "m": _values(adamax_optimizer._m),
            "u": _values(adamax_optimizer._u),
        },
        "learning_rate": {
            "count": updates,
            "schedule_step": updates * steps + steps - 1,
            "learning_rate": 0.0,  # `migrate_state` records the rate
        },
    }
    if adamax_optimizer.use_ema:
        updates_state["ema"] = {
            "count": updates,
            "ema": _values(adamax_optimizer._model_variables_moving_average),
        }
    keras_state: dict[str, Any] = updates_state
    if steps > 1:
        keras_state = {
            "micro_step": micro_step,
            "weight_sum": float(micro_step),
            "accumulator": _values(adamax_optimizer._accumulated_gradients),
            "inner_state": updates_state,
        }
    if scaler is not None:
        keras_state = {
            "loss_scale": float(np.asarray(scaler.dynamic_scale.value)),
            "good_steps": int(np.asarray(scaler.step_counter.value)),
            "skipped_steps": 0,
            "inner_state": keras_state,
        }
    return tx, migrate_state(tx, keras_state, params)


KERAS_OPTIONS = sorted(KERAS_ADAMAX_KEYS - {"learning_rate"})
"""The arguments of :func:`adamax` that a Keras ``Adamax`` takes as they are."""

UNEXPORTABLE = (
    "skip_nonfinite",
    "ema_warmup",
    "exclude_from_ema",
    "exclude_from_weight_decay",
    "quantized_state",
    "stochastic_rounding",
)
"""Options Keras has no variable or setting for (harmless when off or empty)."""


def _is_off(value: Any) -> bool:
    return (
        value is None
        or value is False
        or (isinstance(value, list | tuple) and not value)
    )


def _refuse_unexportable(arguments: dict[str, Any], params: list[Any]) -> None:
    keras = _keras()
    for name in UNEXPORTABLE:
        if not _is_off(arguments[name]):
            raise ValueError(
                f"`{name}={arguments[name]!r}` has no Keras equivalent that an "
                "exported optimizer could hold; build the optimizer without it."
            )
    state_dtype = arguments["state_dtype"]
    if state_dtype is not None and any(
        np.dtype(state_dtype) != np.dtype(p.dtype) for p in params
    ):
        raise ValueError(
            f"`state_dtype={np.dtype(state_dtype).name}` differs from the "
            "parameters' dtypes: Keras keeps each variable's state in its dtype."
        )
    rate = arguments["learning_rate"]
    if callable(rate) and not isinstance(
        rate, keras.optimizers.schedules.LearningRateSchedule
    ):
        raise ValueError(
            f"`learning_rate={rate!r}` is an optax schedule or another callable; "
            "Keras takes a float or a `keras.optimizers.schedules."
            "LearningRateSchedule`."
        )
    scaling = arguments["dynamic_loss_scale"]
    if isinstance(scaling, Mapping):
        extra = {
            k: v
            for k, v in scaling.items()
            if k not in ("initial_scale", "growth_steps")
        }
        keras_like = {"factor": 2.0, "min_loss_scale": 1.0, "max_loss_scale": None}
        for key, value in extra.items():
            if value != keras_like.get(key, object()):
                raise ValueError(
                    f"`dynamic_loss_scale` sets `{key}={value!r}`; Keras' "
                    "LossScaleOptimizer has no such setting (its factor is 2, its "
                    "floor 1 here, and it has no cap)."
                )


def to_keras_optimizer(
    tx: optax.GradientTransformation,
    opt_state: optax.OptState,
    variables: Sequence[Any],
) -> Any:
    r"""A built Keras optimizer holding ``opt_state``, to continue in Keras.

    The reverse of :func:`from_keras_optimizer`, for an optimizer built by
    :func:`adamax`: returns a ``keras.optimizers.Adamax`` (a
    ``LossScaleOptimizer`` around one with ``dynamic_loss_scale``), built on
    ``variables`` (mapped by position to the parameter list) and holding the
    state: ``iteration = k * N + micro_step``, ``m``, ``u``, the EMA, the
    accumulator (zeros at micro-step 0: ours keeps the finished group's mean
    until the next call overwrites it) and the loss scale with its count.

    Refused, with a ``ValueError`` naming it, is what Keras has no variable or
    setting for: ``skip_nonfinite``, ``ema_warmup``, ``exclude_from_ema``,
    ``exclude_from_weight_decay`` (Keras holds no exclusion in its config or
    its variables), a ``state_dtype`` other than the parameters', an optax
    schedule, a loss scale
    with ``max_loss_scale`` or another factor than 2, and a weighted
    accumulation group in progress.

    Args:
      tx: an optimizer built by :func:`adamax`.
      opt_state: its state, for ``params = [v.value for v in variables]``.
      variables: the Keras variables the parameters are the values of.

    Returns:
      A built Keras optimizer.

    Example:
      >>> import os; os.environ.setdefault("KERAS_BACKEND", "jax")
      'jax'
      >>> import keras, numpy as np
      >>> from adamax_optax import adamax, to_keras_optimizer
      >>> variables = [keras.Variable(np.ones(3, "float32"))]
      >>> tx = adamax(0.1, gradient_accumulation_steps=2)
      >>> params = [v.value for v in variables]
      >>> state = tx.init(params)
      >>> _, state = tx.update([np.ones(3, "float32")], state, params)
      >>> optimizer = to_keras_optimizer(tx, state, variables)
      >>> accumulator = optimizer._accumulated_gradients[0]
      >>> int(optimizer._iterations.value), float(accumulator[0])
      (1, 1.0)
    """
    keras = _keras()
    arguments = arguments_of(tx, "to_keras_optimizer")
    params = _values(variables)
    _refuse_unexportable(arguments, params)
    mismatch = state_mismatch(tx, opt_state, params)
    if mismatch is not None:
        raise ValueError(mismatch)
    opt_state = _grouping.ungroup(opt_state)
    find = lambda kind: _common.find_states(opt_state, kind)  # noqa: E731
    (adamax_state,) = find(ScaleByKerasAdamaxState)
    steps = arguments["gradient_accumulation_steps"] or 1
    micro_step, accumulator = 0, None
    if steps > 1:
        (accumulation,) = find(AccumulateGradientsState)
        micro_step = int(accumulation.micro_step)
        if micro_step and float(accumulation.weight_sum) != micro_step:
            raise ValueError(
                "A weighted accumulation group is in progress (weight sum "
                f"{float(accumulation.weight_sum)} over {micro_step} calls): Keras "
                "sums its gradients unweighted. Export at the end of a group."
            )
        if micro_step >= steps:
            raise ValueError(
                f"The accumulation group in progress holds {micro_step} calls, more "
                f"than `gradient_accumulation_steps={steps}` (it was migrated from "
                "a larger N): Keras' counter cannot say so. Export after its next "
                "call, which ends it."
            )
        accumulator = jax.tree.leaves(accumulation.accumulator)
    rate = arguments["learning_rate"]
    (rate_state,) = find(ScaleByKerasLearningRateState)
    keras_step = int(adamax_state.count) * steps + steps - 1
    if callable(rate) and int(rate_state.schedule_step) != keras_step:
        raise ValueError(
            f"The schedule is at step {int(rate_state.schedule_step)}, but Keras "
            f"would evaluate it at {keras_step} (`iteration // N` updates of N = "
            f"{steps}): this state was migrated from another "
            "`gradient_accumulation_steps`. Wrap the schedule to start at the "
            "step reached, or export a float learning rate."
        )
    options = {name: arguments[name] for name in KERAS_OPTIONS}
    optimizer = keras.optimizers.Adamax(
        learning_rate=rate if callable(rate) else float(rate), **options
    )
    outer = optimizer
    scaling = _dynamic_loss_scale_settings(arguments["dynamic_loss_scale"])
    if scaling:
        outer = keras.optimizers.LossScaleOptimizer(
            optimizer,
            initial_scale=scaling["initial_scale"],
            dynamic_growth_steps=scaling["growth_steps"],
        )
    variables = list(variables)
    outer.build(variables)
    count = int(adamax_state.count)
    optimizer._iterations.assign(count * steps + micro_step)
    for target, values in (
        (optimizer._m, adamax_state.m),
        (optimizer._u, adamax_state.u),
    ):
        for variable, value in zip(target, jax.tree.leaves(values), strict=True):
            variable.assign(np.asarray(value))
    if optimizer.use_ema:
        (ema,) = find(ParameterEMAState)
        leaves = jax.tree.leaves(ema.ema)
        for variable, value in zip(
            optimizer._model_variables_moving_average, leaves, strict=True
        ):
            variable.assign(np.asarray(value))
    if accumulator is not None:
        for variable, value in zip(
            optimizer._accumulated_gradients, accumulator, strict=True
        ):
            variable.assign(np.asarray(value) if micro_step else np.zeros_like(value))
    if scaling:
        (dynamic,) = find(DynamicLossScaleState)
        outer.dynamic_scale.assign(float(dynamic.loss_scale))
        outer.step_counter.assign(int(dynamic.good_steps))
    return outer
