"""Gradient accumulation: Keras' ``gradient_accumulation_steps``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import DTypeLike

from adamax_optax import _common, _validation


class AccumulateGradientsState(NamedTuple):
    """State of :func:`accumulate_gradients`.

    Attributes:
      mini_step: micro-steps already taken in the current group (int32, in
        ``0 .. N - 1``).
      accumulator: the sum of the group's gradients so far, in the state dtype.
        The group's first micro-step overwrites it instead of adding to it, so it
        is never reset: after an update it still holds the finished group's sum,
        which nothing reads again. This saves a full write of the accumulator on
        every update (SPEC section 6).
      inner_state: the state of the wrapped transformation; it only moves on the
        last micro-step of each group.
    """

    mini_step: jax.Array
    accumulator: optax.Updates
    inner_state: optax.OptState


def add_to_group_sum(
    accumulator: optax.Updates, grads: optax.Updates, mini_step: jax.Array
) -> optax.Updates:
    """The group's running sum after ``grads``, in the accumulator's dtype.

    On the group's first micro-step (``mini_step == 0``) the sum is ``grads``
    itself: what the accumulator held before belongs to the previous group.
    """
    first = mini_step == 0
    return jax.tree.map(
        lambda a, g: jnp.where(
            first,
            g.astype(_common.COMPUTE_DTYPE),
            a.astype(_common.COMPUTE_DTYPE) + g.astype(_common.COMPUTE_DTYPE),
        ).astype(a.dtype),
        accumulator,
        grads,
    )


def advance_mini_step(mini_step: jax.Array, steps: int) -> tuple[jax.Array, jax.Array]:
    """Whether this call ends the group, and the ``mini_step`` after it."""
    is_update = mini_step == steps - 1
    return is_update, jnp.where(is_update, 0, mini_step + 1).astype(jnp.int32)


def group_mean(
    group_sum: optax.Updates, grads: optax.Updates, steps: int
) -> optax.Updates:
    """``group_sum / steps`` in float32, cast to the gradients' dtype (as Keras)."""
    count = _common.as_compute_scalar(steps)
    return jax.tree.map(
        lambda s, g: (s.astype(_common.COMPUTE_DTYPE) / count).astype(g.dtype),
        group_sum,
        grads,
    )


def check_gradient_accumulation_steps(value: Any) -> None:
    """An integer >= 2, with Keras' message."""
    _validation.check_integer_at_least(
        "gradient_accumulation_steps",
        value,
        2,
        "`gradient_accumulation_steps` must be an integer >= 2.",
    )


def accumulate_gradients(
    inner: optax.GradientTransformation,
    gradient_accumulation_steps: int,
    *,
    state_dtype: DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Applies ``inner`` once every ``N`` calls, to the mean of their gradients.

    With ``N = gradient_accumulation_steps``, calls ``1 .. N - 1`` of each group
    only add the gradient to the accumulator and return zero updates; nothing in
    ``inner``'s state moves, so its counters (bias correction, schedules, EMA)
    count real updates. Call ``N`` runs ``inner`` on ``(acc + g) / N``; the next
    group's first call overwrites the accumulator rather than adding to it. This
    is Keras' ``gradient_accumulation_steps``; unlike ``optax.MultiSteps`` the
    inner update is not computed on micro-steps.

    Args:
      inner: the transformation to apply once per group.
      gradient_accumulation_steps: ``N``, an integer >= 2.
      state_dtype: dtype of the accumulator; ``None`` keeps each parameter's dtype.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from adamax_optax import accumulate_gradients
      >>> tx = accumulate_gradients(optax.sgd(1.0), 2)
      >>> state = tx.init(jnp.zeros(1))
      >>> first, state = tx.update(jnp.array([1.0]), state)
      >>> second, state = tx.update(jnp.array([3.0]), state)
      >>> first, second
      (Array([0.], dtype=float32), Array([-2.], dtype=float32))
    """
    check_gradient_accumulation_steps(gradient_accumulation_steps)
    _validation.check_state_dtype(state_dtype)
    inner = optax.with_extra_args_support(inner)
    steps = gradient_accumulation_steps

    def init_fn(params: optax.Params) -> AccumulateGradientsState:
        _common.check_float_params(params, "accumulate_gradients")
        return AccumulateGradientsState(
            mini_step=jnp.zeros([], jnp.int32),
            accumulator=_common.zeros_like_in(params, state_dtype),
            inner_state=inner.init(params),
        )

    def update_fn(
        updates: optax.Updates,
        state: AccumulateGradientsState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, AccumulateGradientsState]:
        _common.check_updates_match(updates, state.accumulator, "accumulate_gradients")
        group_sum = add_to_group_sum(state.accumulator, updates, state.mini_step)

        def apply_inner() -> tuple[optax.Updates, optax.OptState]:
            mean = group_mean(group_sum, updates, steps)
            return inner.update(mean, state.inner_state, params, **extra_args)

        def accumulate() -> tuple[optax.Updates, optax.OptState]:
            return jax.tree.map(jnp.zeros_like, updates), state.inner_state

        is_update, mini_step = advance_mini_step(state.mini_step, steps)
        new_updates, inner_state = jax.lax.cond(is_update, apply_inner, accumulate)
        return new_updates, AccumulateGradientsState(mini_step, group_sum, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
