"""The learning rate in every form Keras accepts, as an optax building block."""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adamax_optax import _common, _validation

LearningRate = float | int | jax.Array | Callable[..., Any]
"""A number, a schedule ``count -> rate`` (optax or Keras), or ``() -> rate``."""


_ENCLOSING_STEPS: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "gradient_accumulation_steps", default=None
)


@contextlib.contextmanager
def accumulating(steps: int) -> Iterator[None]:
    """While tracing an accumulation wrapper's inner update: schedules inside
    are evaluated every ``steps`` micro-steps (Keras' counter)."""
    token = _ENCLOSING_STEPS.set(steps)
    try:
        yield
    finally:
        _ENCLOSING_STEPS.reset(token)


class ScaleByKerasLearningRateState(NamedTuple):
    """State of :func:`scale_by_keras_learning_rate`.

    Attributes:
      count: number of updates applied so far (int32).
      schedule_step: the step at which the *next* update evaluates a schedule
        (int32): Keras' micro-step index ``k * N + N - 1`` for update ``k`` with
        ``N`` accumulation steps. Each update adds ``N``, so a state migrated
        to another ``N`` (:func:`adamax_optax.migrate_state`) continues its
        schedule without a jump.
      learning_rate: the rate the *next* update will use (float32), kept so that
        it can be read from the state alone.
    """

    count: jax.Array
    schedule_step: jax.Array
    learning_rate: jax.Array


def takes_no_arguments(fn: Callable[..., Any]) -> bool:
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


def as_step_schedule(learning_rate: LearningRate) -> Callable[..., jax.Array]:
    """Normalises ``learning_rate`` into ``(step, dtype=float32) -> rate``.

    ``step`` is the schedule's step (Keras' micro-step index of the update);
    ``dtype`` the dtype of the rate (a constant rate is exact in float64 for
    float64 parameters). A zero-argument callable is called on every update
    (under ``jit``: once, when the step is traced).
    """
    if not callable(learning_rate):
        return lambda step, dtype=_common.COMPUTE_DTYPE: jnp.asarray(
            _common.as_compute_scalar(learning_rate, dtype), dtype
        )
    if takes_no_arguments(learning_rate):
        return lambda step, dtype=_common.COMPUTE_DTYPE: jnp.asarray(
            learning_rate(), dtype
        )

    def schedule(step: jax.Array, dtype: Any = _common.COMPUTE_DTYPE) -> jax.Array:
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
    steps_per_update: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Multiplies updates by ``-learning_rate``, with Keras' schedule semantics.

    ``updates = -lr(k) * updates`` where ``k`` is the 0-based number of updates
    applied so far and ``lr`` is one of:

    * a number (an ``int`` is accepted, unlike Keras);
    * a schedule ``step -> rate``: an optax schedule or a Keras
      ``LearningRateSchedule``; with ``N`` steps per update (gradient
      accumulation) it is evaluated at Keras' micro-step index
      ``k * N + N - 1``;
    * a callable with no arguments, called on each update. Under ``jax.jit`` it
      is evaluated once, when the step is traced, so its value is frozen into
      the compiled step: prefer a schedule or ``optax.inject_hyperparams``.

    Inside :func:`accumulate_gradients` the block takes ``N`` from the wrapper
    (while the wrapper traces its inner update), so a composition evaluates its
    schedule where :func:`adamax` does. The state
    records the rate the next update will use; a fresh state records
    ``lr(steps_per_update - 1)``.

    Args:
      learning_rate: the learning rate in any of the forms above.
      steps_per_update: micro-steps per update (Keras'
        ``gradient_accumulation_steps``) for evaluating schedules; ``None``
        takes it from an enclosing :func:`accumulate_gradients`, else 1. A
        value that disagrees with the enclosing wrapper is an error.

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
    if steps_per_update is not None:
        _validation.check_integer_at_least(
            "steps_per_update", steps_per_update, 1, "`steps_per_update` must be >= 1."
        )

    schedule = as_step_schedule(learning_rate)

    def steps_per_update_here() -> int:
        """``N``: the argument, else the enclosing accumulation's, else 1."""
        enclosing = _ENCLOSING_STEPS.get()
        if enclosing is not None:
            # One accumulation inside another: the innermost counts.
            if steps_per_update not in (None, enclosing):
                raise ValueError(
                    f"`scale_by_keras_learning_rate(steps_per_update="
                    f"{steps_per_update})` is inside `accumulate_gradients` with "
                    f"{enclosing} steps: leave `steps_per_update` unset there, or "
                    "make the two agree."
                )
            return enclosing
        return 1 if steps_per_update is None else steps_per_update

    def init_fn(params: optax.Params) -> ScaleByKerasLearningRateState:
        del params
        step = jnp.asarray(steps_per_update_here() - 1, jnp.int32)
        # A copy: a constant rate passed in by ``optax.inject_hyperparams`` must
        # not be the same buffer as its hyperparameter (donation would fail).
        return ScaleByKerasLearningRateState(
            jnp.zeros([], jnp.int32), step, jnp.array(schedule(step))
        )

    def update_fn(
        updates: optax.Updates,
        state: ScaleByKerasLearningRateState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleByKerasLearningRateState]:
        del params, extra_args
        steps = steps_per_update_here()
        negative_rate = _common.per_dtype(
            lambda dtype: -schedule(state.schedule_step, dtype)
        )

        def scale(u: jax.Array) -> jax.Array:
            dtype = _common.compute_dtype(u.dtype)
            rate = negative_rate(_common.real_dtype(dtype))
            return _common.by_parts(lambda u: rate * u, u.astype(dtype)).astype(u.dtype)

        step = (state.schedule_step + steps).astype(jnp.int32)
        new_state = ScaleByKerasLearningRateState(
            optax.safe_increment(state.count), step, schedule(step)
        )
        return jax.tree.map(scale, updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
