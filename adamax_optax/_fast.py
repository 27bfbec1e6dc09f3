"""``jit_apply``: the jit-compiled, buffer-donating training-step update.

An optimizer update is memory-bound (SPEC section 6). Without donated buffers XLA
allocates fresh outputs every step and runs several times slower; with them the
parameters and the state are updated in place.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from adamax_optax import _common
from adamax_optax._accumulation import (
    AccumulateGradientsState,
    add_to_group_sum,
    advance_mini_step,
    group_mean,
)

Apply = Callable[[optax.Params, optax.OptState, optax.Updates], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class AccumulationPlan:
    """How :func:`adamax` chained its accumulation, for the fast micro-step.

    Attributes:
      inner: the update chain applied once per group (clip, Adamax, decay, rate, EMA).
      steps: ``gradient_accumulation_steps``.
      loss_scale: the static unscaling transform in front, if any.
    """

    inner: optax.GradientTransformationExtraArgs
    steps: int
    loss_scale: optax.GradientTransformation | None

    def apply(
        self, params: optax.Params, opt_state: Any, grads: optax.Updates
    ) -> tuple[optax.Params, Any]:
        """One call: a micro-step or the group's update, without ``lax.cond``.

        Each branch is a ``fori_loop`` of 0 or 1 trips: a while loop updates the
        buffers it carries in place and leaves them untouched when it does not
        run, where a ``lax.cond`` copies every buffer its identity branch passes
        through. A micro-step runs the first loop, which adds the gradients into
        the accumulator (read g and the accumulator, write it: 3 words). The
        group's last call runs the second, which writes the group's sum into the
        accumulator and updates the parameters and the inner state from it, so
        that a backend with multi-output fusion (GPU, TPU) reads g and the
        accumulator once (9 words for the defaults). Each loop body starts with
        an ``optimization_barrier`` that ties g to the loop counter: otherwise
        XLA hoists out of the loop whatever is computed from g alone (the
        loss-scale division, a low-precision convert), so that it runs on every
        call into fresh full-size buffers (see benchmarks/RESULTS.md).
        """
        state = opt_state.copy()
        accumulation: AccumulateGradientsState = state["accumulate"]
        _common.check_updates_match(grads, accumulation.accumulator, "jit_apply")
        is_update, mini_step = advance_mini_step(accumulation.mini_step, self.steps)

        loss_scale_state = state.get("loss_scale")
        if self.loss_scale is not None:
            # Only the new state: the unscaled gradients are computed in each
            # loop body (fused there), not materialised here.
            _, state["loss_scale"] = self.loss_scale.update(
                grads, loss_scale_state, params
            )

        def unscale(grads: optax.Updates) -> optax.Updates:
            """``g / loss_scale``, for use inside a loop body."""
            if self.loss_scale is None:
                return grads
            return self.loss_scale.update(grads, loss_scale_state, params)[0]

        def group_sum(trip: jax.Array, accumulator: Any) -> tuple[Any, Any]:
            """The group's sum, and g, made loop-variant (not hoisted)."""
            _, accumulator, loop_variant_grads = jax.lax.optimization_barrier(
                (trip, accumulator, grads)
            )
            loop_variant_grads = unscale(loop_variant_grads)
            summed = add_to_group_sum(
                accumulator, loop_variant_grads, accumulation.mini_step
            )
            return summed, loop_variant_grads

        def micro_step(trip: jax.Array, accumulator: Any) -> Any:
            return group_sum(trip, accumulator)[0]

        def update_step(trip: jax.Array, carry: tuple[Any, Any, Any]) -> Any:
            params, inner_state, accumulator = carry
            accumulator, loop_variant_grads = group_sum(trip, accumulator)
            mean = group_mean(accumulator, loop_variant_grads, self.steps)
            updates, inner_state = self.inner.update(mean, inner_state, params)
            return optax.apply_updates(params, updates), inner_state, accumulator

        trips = is_update.astype(jnp.int32)
        accumulator = jax.lax.fori_loop(
            0, 1 - trips, micro_step, accumulation.accumulator
        )
        params, inner_state, accumulator = jax.lax.fori_loop(
            0, trips, update_step, (params, accumulation.inner_state, accumulator)
        )
        state["accumulate"] = AccumulateGradientsState(
            mini_step, accumulator, inner_state
        )
        return params, state


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""The accumulation plan of each optimizer :func:`adamax` built with one."""


def register_accumulation_plan(
    optimizer: optax.GradientTransformation, plan: AccumulationPlan
) -> None:
    """Lets :func:`jit_apply` take the fast micro-step for ``optimizer``."""
    _PLANS[optimizer.init] = plan


def jit_apply(tx: optax.GradientTransformation) -> Apply:
    r"""A jitted ``apply(params, opt_state, grads) -> (params, opt_state)``.

    Computes ``updates, opt_state = tx.update(grads, opt_state, params)`` and
    ``params = optax.apply_updates(params, updates)`` in one XLA program that
    donates the parameter and state buffers, so both are updated in place. Do not
    use the ``params`` and ``opt_state`` you passed in after the call: their buffers
    now hold the results.

    For an :func:`adamax` optimizer with ``gradient_accumulation_steps`` (and no
    dynamic loss scaling) the micro-steps take a fast path: they read the
    gradients and update the accumulator, and leave the parameters and the inner
    state untouched. The results equal ``tx.update`` followed by
    ``optax.apply_updates``; the state stays interchangeable with ``tx.update``.

    Args:
      tx: any optax transformation.

    Returns:
      The jitted, donating ``apply``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adamax_optax import adamax, jit_apply
      >>> tx = adamax(0.1)
      >>> apply = jit_apply(tx)
      >>> params = {"w": jnp.array([1.0, -1.0])}
      >>> opt_state = tx.init(params)
      >>> params, opt_state = apply(params, opt_state, {"w": jnp.array([2.0, -3.0])})
      >>> params["w"].round(6)  # one Adamax step of size lr against the sign of g
      Array([ 0.9, -0.9], dtype=float32)
    """
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(
            "`jit_apply` needs an optax GradientTransformation; "
            f"received {type(tx).__name__}."
        )
    plan = _PLANS.get(tx.init)

    def apply(
        params: optax.Params, opt_state: optax.OptState, grads: optax.Updates
    ) -> tuple[optax.Params, optax.OptState]:
        if plan is not None:
            return plan.apply(params, opt_state, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(apply, donate_argnums=(0, 1))
