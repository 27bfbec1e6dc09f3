"""The learning rate in every form Keras accepts, as an optax building block."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adamax_optax import _common, _validation
from adamax_optax._split import split_transformation

LearningRate = float | int | jax.Array | Callable[..., Any]
"""A number, a schedule ``count -> rate`` (optax or Keras), or ``() -> rate``."""


class ScaleByKerasLearningRateState(NamedTuple):
    """State of :func:`scale_by_keras_learning_rate`.

    Attributes:
      count: number of updates applied so far (int32).
      learning_rate: the rate the *next* update will use (float32), kept so that
        it can be read from the state alone.
    """

    count: jax.Array
    learning_rate: jax.Array


def _takes_no_arguments(fn: Callable[..., Any]) -> bool:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    return all(
        p.default is not inspect.Parameter.empty
        or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        for p in signature.parameters.values()
    )


def check_learning_rate(learning_rate: Any) -> None:
    """Accepts a non-negative finite number or any callable."""
    if callable(learning_rate):
        return
    _validation.check_non_negative("learning_rate", learning_rate)


def as_update_schedule(
    learning_rate: LearningRate, steps_per_update: int | jax.Array = 1
) -> Callable[..., jax.Array]:
    """Normalises ``learning_rate`` into ``(count, dtype=float32) -> rate``.

    ``count`` is the 0-based update count; ``dtype`` the dtype of the rate (a
    constant rate is exact in float64 for float64 parameters).

    A schedule is evaluated where Keras evaluates it: at its micro-step counter,
    which for update ``k`` with ``N`` accumulation steps is ``k * N + N - 1``.
    A zero-argument callable is called on every update (under ``jit``: once,
    when the step is traced).
    """
    if not callable(learning_rate):
        return lambda count, dtype=_common.COMPUTE_DTYPE: jnp.asarray(
            _common.as_compute_scalar(learning_rate, dtype), dtype
        )
    if _takes_no_arguments(learning_rate):
        return lambda count, dtype=_common.COMPUTE_DTYPE: jnp.asarray(
            learning_rate(), dtype
        )

    def schedule(count: jax.Array, dtype: Any = _common.COMPUTE_DTYPE) -> jax.Array:
        step = count * steps_per_update + (steps_per_update - 1)
        # Schedules from optax and Keras mix Python floats with the int32 step;
        # they are not written for strict promotion, so they run under the
        # standard rules and their result is cast explicitly.
        with jax.numpy_dtype_promotion("standard"):
            rate = learning_rate(step)
        return jnp.asarray(rate).astype(dtype)

    return schedule


def scale_by_keras_learning_rate(
    learning_rate: LearningRate = 0.001,
    *,
    steps_per_update: int = 1,
) -> optax.GradientTransformationExtraArgs:
    r"""Multiplies updates by ``-learning_rate``, with Keras' schedule semantics.

    ``updates = -lr(k) * updates`` where ``k`` is the 0-based number of updates
    applied so far and ``lr`` is one of:

    * a number (an ``int`` is accepted, unlike Keras);
    * a schedule ``step -> rate``: an optax schedule or a Keras
      ``LearningRateSchedule``; with ``steps_per_update = N`` (gradient
      accumulation) it is evaluated at Keras' micro-step index ``k * N + N - 1``;
    * a callable with no arguments, called on each update. Under ``jax.jit`` it
      is evaluated once, when the step is traced, so its value is frozen into
      the compiled step: prefer a schedule or ``optax.inject_hyperparams``.

    The state records the rate the next update will use.

    Args:
      learning_rate: the learning rate in any of the forms above.
      steps_per_update: micro-steps per update (Keras'
        ``gradient_accumulation_steps``), for evaluating schedules.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from adamax_optax import scale_by_keras_learning_rate
      >>> tx = scale_by_keras_learning_rate(optax.linear_schedule(1.0, 0.0, 4))
      >>> state = tx.init(jnp.zeros(2))
      >>> updates, state = tx.update(jnp.ones(2), state)
      >>> updates, float(state.learning_rate)
      (Array([-1., -1.], dtype=float32), 0.75)
    """
    check_learning_rate(learning_rate)
    _validation.check_integer_at_least(
        "steps_per_update", steps_per_update, 1, "`steps_per_update` must be >= 1."
    )
    schedule = as_update_schedule(learning_rate, steps_per_update)

    def init_fn(params: optax.Params) -> ScaleByKerasLearningRateState:
        del params
        count = jnp.zeros([], jnp.int32)
        # A copy: a constant rate passed in by ``optax.inject_hyperparams`` must
        # not be the same buffer as its hyperparameter (donation would fail).
        return ScaleByKerasLearningRateState(count, jnp.array(schedule(count)))

    def advance(
        updates: optax.Updates,
        state: ScaleByKerasLearningRateState,
        params: optax.Params | None = None,
    ) -> ScaleByKerasLearningRateState:
        del updates, params
        count = optax.safe_increment(state.count)
        return ScaleByKerasLearningRateState(count, schedule(count))

    def emit(
        updates: optax.Updates,
        state: ScaleByKerasLearningRateState,
        new_state: ScaleByKerasLearningRateState,
        params: optax.Params | None = None,
    ) -> optax.Updates:
        del new_state, params
        negative_rate = _common.per_dtype(lambda dtype: -schedule(state.count, dtype))

        def scale(u: jax.Array) -> jax.Array:
            dtype = _common.compute_dtype(u.dtype)
            rate = negative_rate(_common.real_dtype(dtype))
            return _common.by_parts(lambda u: rate * u, u.astype(dtype)).astype(u.dtype)

        return jax.tree.map(scale, updates)

    return split_transformation(init_fn, advance, emit)
