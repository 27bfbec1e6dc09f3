"""Construction-time checks of hyperparameters, with Keras' messages.

Every check applies only to *concrete* values (Python or NumPy numbers and concrete
JAX arrays). A tracer, such as the value ``optax.inject_hyperparams`` passes inside
``jit``, is let through unchecked: it cannot be inspected without leaving the trace.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import jax
import jax.numpy as jnp
import numpy as np


def concrete_scalar(value: Any) -> float | None:
    """Returns ``value`` as a Python float, or ``None`` if it is a tracer."""
    if isinstance(value, jax.core.Tracer):
        return None
    return float(np.asarray(value))


def _check_number(name: str, value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(
        value, numbers.Real | np.ndarray | np.number | jax.Array
    ):
        raise TypeError(f"`{name}` must be a number. Received: {name}={value!r}")
    if np.ndim(value) != 0:
        raise ValueError(
            f"`{name}` must be a scalar. Received: {name} with shape {np.shape(value)}"
        )
    number = concrete_scalar(value)
    if number is not None and not math.isfinite(number):
        raise ValueError(f"`{name}` must be finite. Received: {name}={value}")
    return number


def check_in_unit_interval(name: str, value: Any) -> None:
    """Requires ``0 <= value < 1`` (the moment decay rates)."""
    number = _check_number(name, value)
    if number is not None and not 0.0 <= number < 1.0:
        dtype = np.dtype(getattr(value, "dtype", np.float64))
        rounded = (
            f" ({dtype.name} rounds it there: with `optax.inject_hyperparams`, "
            "which gives hyperparameters the parameters' dtype, pass "
            "`hyperparam_dtype=jnp.float32`)"
            if number == 1.0
            and jnp.issubdtype(dtype, jnp.floating)
            and dtype.itemsize < 4
            else ""
        )
        raise ValueError(
            f"`{name}` must be in the range [0, 1). Received: {name}={value}" + rounded
        )


def check_non_negative(name: str, value: Any) -> None:
    """Requires a finite ``value >= 0``."""
    number = _check_number(name, value)
    if number is not None and number < 0:
        raise ValueError(f"`{name}` must be >= 0. Received: {name}={value}")


def check_positive(name: str, value: Any) -> None:
    """Requires a finite ``value > 0``."""
    number = _check_number(name, value)
    if number is not None and number <= 0:
        raise ValueError(f"`{name}` must be > 0. Received: {name}={value}")


def check_ema_momentum(value: Any) -> None:
    """Keras' check of ``ema_momentum``, which allows both ends of [0, 1]."""
    number = _check_number("ema_momentum", value)
    if number is not None and not 0.0 <= number <= 1.0:
        raise ValueError(
            "`ema_momentum` must be in the range [0, 1]. "
            f"Received: ema_momentum={value}"
        )


INT32_MAX = 2**31 - 1
"""The largest count an int32 counter reaches (the state's counters)."""


def _integer_value(value: Any) -> int | None:
    """Returns ``value`` as an int, ``None`` for a tracer; raises if not integral."""
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, np.ndarray | np.generic | jax.Array) and np.issubdtype(
        value.dtype, np.integer
    ):
        if np.ndim(value) != 0:
            raise TypeError
        return None if isinstance(value, jax.core.Tracer) else int(value)
    raise TypeError


def check_integer_at_least(
    name: str, value: Any, minimum: int, message: str, int32: bool = True
) -> None:
    """Requires a concrete integer ``value >= minimum`` (and, with ``int32``, at
    most ``2**31 - 1``: a count compared with the state's int32 counters);
    ``message`` is Keras' wording.

    An integer argument sets the structure of the computation (how many calls
    make a group, how often to overwrite), so it cannot be traced: the value
    that ``optax.inject_hyperparams`` passes inside ``jit`` is refused with a
    message that says to declare it static.
    """
    try:
        integer = _integer_value(value)
    except TypeError:
        raise TypeError(f"{message} Received: {name}={value!r}") from None
    if integer is None:
        raise TypeError(
            f"`{name}` cannot be a traced value: it sets the structure of the "
            "computation and is checked when the optimizer is built. With "
            "`optax.inject_hyperparams`, declare it static: "
            f"`optax.inject_hyperparams(adamax, static_args=({name!r},))`."
        )
    if integer < minimum:
        raise ValueError(f"{message} Received: {name}={value}")
    if int32 and integer > INT32_MAX:
        raise ValueError(
            f"`{name}` must be at most 2**31 - 1: the counters it is compared "
            f"with are int32. Received: {name}={value}"
        )


def check_only_one_clip(clipnorm: Any, clipvalue: Any, global_clipnorm: Any) -> None:
    """Keras allows at most one of the three clipping options."""
    if sum(c is not None for c in (clipnorm, clipvalue, global_clipnorm)) > 1:
        raise ValueError(
            "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can "
            f"be set. Received: clipnorm={clipnorm}, "
            f"clipvalue={clipvalue}, global_clipnorm={global_clipnorm}"
        )


def check_bool(name: str, value: Any) -> None:
    """Requires a Python or NumPy bool (flags cannot be traced)."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"`{name}` must be a bool. Received: {name}={value!r}")


def check_state_dtype(value: Any) -> None:
    """Requires ``None`` or a floating-point (real or complex) dtype."""
    if value is None:
        return
    try:
        dtype = np.dtype(value)
    except TypeError:
        raise TypeError(
            f"`state_dtype` must be a floating-point dtype or None. "
            f"Received: state_dtype={value!r}"
        ) from None
    if not jax.dtypes.issubdtype(dtype, np.inexact):
        raise ValueError(
            "`state_dtype` must be a floating-point dtype or None. "
            f"Received: state_dtype={dtype}"
        )


# Arguments a user brings from tf.keras or optax, and what they are called here.
_SPELLINGS_ELSEWHERE = {
    "lr": "tf.keras' name of `learning_rate`",
    "decay": (
        "tf.keras' time-based decay of the learning rate: pass a schedule as "
        "`learning_rate`, `keras.optimizers.schedules.InverseTimeDecay(lr, 1, "
        "decay)`; for a decay of the weights, `weight_decay`"
    ),
    "b1": "optax's name of `beta_1`",
    "b2": "optax's name of `beta_2`",
    "eps": "optax's name of `epsilon`",
}

_Parameters = ParamSpec("_Parameters")
_Result = TypeVar("_Result")


def refuse_unknown_keywords(
    function: Callable[_Parameters, _Result],
) -> Callable[_Parameters, _Result]:
    """``function``, whose unknown keyword arguments get a ``TypeError`` naming
    each and the argument probably meant (tf.keras' and optax's spellings, or
    the closest name), before anything runs."""
    names = list(inspect.signature(function).parameters)

    @functools.wraps(function)
    def checked(*args: _Parameters.args, **kwargs: _Parameters.kwargs) -> _Result:
        unknown = [name for name in kwargs if name not in names]
        if unknown:
            raise TypeError(
                f"`{function.__name__}` got unknown keyword argument(s) "
                + "; ".join(_unknown(name, names) for name in unknown)
                + "."
            )
        return function(*args, **kwargs)

    return checked


def _unknown(name: str, names: list[str]) -> str:
    if name in _SPELLINGS_ELSEWHERE:
        return f"`{name}` ({_SPELLINGS_ELSEWHERE[name]})"
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f"`{name}`" + (f" (did you mean `{close[0]}`?)" if close else "")
