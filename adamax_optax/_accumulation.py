"""Gradient accumulation: Keras' ``gradient_accumulation_steps``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import DTypeLike

from adamax_optax import _common, _validation
from adamax_optax._split import (
    ALWAYS,
    Gate,
    SplitUpdate,
    loop_variant,
    split_of,
    trip_count,
)


class AccumulateGradientsState(NamedTuple):
    """State of :func:`accumulate_gradients`.

    Attributes:
      mini_step: micro-steps already taken in the current group (int32, in
        ``0 .. N - 1``).
      accumulator: the sum of the group's gradients so far, in the state dtype.
        The group's first micro-step overwrites it instead of adding to it, so it
        is never reset: after an update it still holds the finished group's sum,
        which nothing reads again. This saves a full write of the accumulator on
        every update (the cost model: ``docs/semantics.md``).
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

    def add(a: jax.Array, g: jax.Array) -> jax.Array:
        g = _common.sharded_like(g, a)
        dtype = _common.compute_dtype(a.dtype, g.dtype)
        g_wide = g.astype(dtype)
        return jnp.where(first, g_wide, a.astype(dtype) + g_wide).astype(a.dtype)

    return jax.tree.map(add, accumulator, grads)


def advance_mini_step(mini_step: jax.Array, steps: int) -> tuple[jax.Array, jax.Array]:
    """Whether this call ends the group, and the ``mini_step`` after it."""
    is_update = mini_step == steps - 1
    return is_update, jnp.where(is_update, 0, mini_step + 1).astype(jnp.int32)


def group_mean(
    group_sum: optax.Updates, grads: optax.Updates, steps: int
) -> optax.Updates:
    """``group_sum / steps`` in the compute dtype, cast to the gradients' dtype
    (as Keras)."""

    def mean(s: jax.Array, g: jax.Array) -> jax.Array:
        dtype = _common.compute_dtype(s.dtype, g.dtype)
        divisor = _common.as_compute_scalar(steps, _common.real_dtype(dtype))
        mean = _common.divide_by_real(s.astype(dtype), divisor).astype(g.dtype)
        return _common.sharded_like(mean, g)

    return jax.tree.map(mean, group_sum, grads)


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

    Cost: a micro-step adds ``g`` into the accumulator inside a ``fori_loop`` of
    0 or 1 trips and returns ``where(False, ..., 0)``, which XLA fuses into the
    caller's ``optax.apply_updates``; the inner state is neither copied nor
    recomputed. The update step advances the inner state in a second such loop
    and computes the updates from the new state outside it (the two phases of
    every transformation of this package). In a jitted step that donates the
    parameters and the state this holds for any caller of ``update``: a Flax
    ``TrainState``, an ``nnx.Optimizer``, ``optax.chain``. An ``inner`` not built
    from this package's blocks has its updates recomputed from its old state
    outside the loop, which keeps a copy of that state.

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
    inner_split = split_of(inner)
    steps = gradient_accumulation_steps

    def init_fn(params: optax.Params) -> AccumulateGradientsState:
        _common.check_float_params(params, "accumulate_gradients")
        return AccumulateGradientsState(
            mini_step=jnp.zeros([], jnp.int32),
            accumulator=_common.zeros_like_in(params, state_dtype),
            inner_state=inner.init(params),
        )

    def advance(
        updates: optax.Updates,
        state: AccumulateGradientsState,
        params: optax.Params | None,
        gate: Gate,
        **extra_args: Any,
    ) -> AccumulateGradientsState:
        _common.check_updates_match(updates, state.accumulator, "accumulate_gradients")
        is_update, mini_step = advance_mini_step(state.mini_step, steps)
        runs = jnp.asarray(True) if gate.run is None else gate.run
        if gate.run is not None:
            mini_step = jnp.where(runs, mini_step, state.mini_step)

        def micro_step(trip: jax.Array, accumulator: Any) -> Any:
            accumulator, grads = loop_variant(trip, (accumulator, updates))
            return add_to_group_sum(accumulator, gate.divide(grads), state.mini_step)

        accumulator = jax.lax.fori_loop(
            0, trip_count(runs & ~is_update), micro_step, state.accumulator
        )

        def update_step(trip: jax.Array, carry: tuple[Any, Any]) -> tuple[Any, Any]:
            # The group's sum is written into the accumulator (in place) and
            # the inner transformation reads it from there: XLA's CPU backend
            # does not repeat a division or a conversion in several kernels, so
            # a mean formed on the fly from the accumulator and ``g`` would be
            # computed once into a gradient-sized temporary.
            inner_state, group = carry
            inner_state, group, grads, current = loop_variant(
                trip, (inner_state, group, updates, params)
            )
            grads = gate.divide(grads)
            group = add_to_group_sum(group, grads, state.mini_step)
            inner_state = inner_split.advance(
                group_mean(group, grads, steps),
                inner_state,
                current,
                ALWAYS,
                **extra_args,
            )
            return inner_state, group

        inner_state, accumulator = jax.lax.fori_loop(
            0,
            trip_count(runs & is_update),
            update_step,
            (state.inner_state, accumulator),
        )
        return AccumulateGradientsState(mini_step, accumulator, inner_state)

    def emit(
        updates: optax.Updates,
        state: AccumulateGradientsState,
        new_state: AccumulateGradientsState,
        params: optax.Params | None,
        gate: Gate,
        **extra_args: Any,
    ) -> optax.Updates:
        updated = Gate(run=state.mini_step == steps - 1).also(run=gate.run)
        mean = group_mean(new_state.accumulator, updates, steps)
        emitted = inner_split.emit(
            mean, state.inner_state, new_state.inner_state, params, ALWAYS, **extra_args
        )
        return updated.select(emitted)

    return optax.GradientTransformationExtraArgs(init_fn, SplitUpdate(advance, emit))
