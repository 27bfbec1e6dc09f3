"""Gradient accumulation: Keras' ``gradient_accumulation_steps``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import DTypeLike

from adamax_optax import _common, _gate, _runner, _validation
from adamax_optax._learning_rate import accumulating


class AccumulateGradientsState(NamedTuple):
    """State of :func:`accumulate_gradients`.

    Attributes:
      micro_step: micro-steps already taken in the current group (int32, in
        ``0 .. N - 1``).
      weight_sum: the sum of the group's weights so far (float32; each call
        weighs 1 unless it passes ``weight``); after an update it still holds
        the finished group's total.
      accumulator: the weighted sum of the group's gradients so far, in the
        state dtype; on the group's last call it becomes the group's weighted
        mean, which the update reads. The group's first micro-step overwrites it
        instead of adding to it, so it is never reset: after an update it still
        holds the finished group's mean, which nothing reads again. This saves a
        full write of the accumulator on every update (the cost model: the
        performance page of the docs).
      inner_state: the state of the wrapped transformation; it only moves on the
        last micro-step of each group.
    """

    micro_step: jax.Array
    weight_sum: jax.Array
    accumulator: optax.Updates
    inner_state: optax.OptState


class GroupStep(NamedTuple):
    """One call's place in its group: whether it starts the group, ends it, and
    (ending it) applies an update, which a group of zero weight does not."""

    first: jax.Array
    last: jax.Array
    weight_sum: jax.Array

    @property
    def is_update(self) -> jax.Array:
        return self.last & (self.weight_sum > 0)


def group_step(
    state: AccumulateGradientsState,
    steps: int,
    weight: jax.Array,
    flush: jax.Array,
) -> GroupStep:
    """Where a call with ``weight`` (and ``flush``) falls in the current group."""
    first = state.micro_step == 0
    weight_sum = jnp.where(first, weight, state.weight_sum + weight)
    # ``>=``: a group migrated from a larger N ends on its next call.
    return GroupStep(first, (state.micro_step >= steps - 1) | flush, weight_sum)


def add_to_group(
    accumulator: optax.Updates,
    grads: optax.Updates,
    weight: jax.Array,
    step: GroupStep,
) -> optax.Updates:
    """The accumulator after ``weight * grads``, in its dtype: the group's
    weighted running sum, and on the group's last call the weighted mean (the
    sum over ``step.weight_sum``; zeros for a group of zero weight).

    On the group's first call the sum is ``weight * grads`` itself: what the
    accumulator held before belongs to the previous group. Writing the mean in
    place lets the inner transformation read it as a buffer: XLA's CPU backend
    materialises a division it would have to share between a reduction (a
    global norm) and elementwise kernels.
    """
    divisor = jnp.where(step.weight_sum > 0, step.weight_sum, 1.0)

    def add(a: jax.Array, g: jax.Array) -> jax.Array:
        g = _common.sharded_like(g, a)
        dtype = _common.compute_dtype(a.dtype, g.dtype)
        real = _common.real_dtype(dtype)
        g_weighted = _common.by_parts(
            lambda g: weight.astype(real) * g, g.astype(dtype)
        )
        total = jnp.where(step.first, g_weighted, a.astype(dtype) + g_weighted)
        mean = _common.divide_by_real(total, divisor.astype(real))
        return jnp.where(step.last, mean, total).astype(a.dtype)

    return jax.tree.map(add, accumulator, grads)


def as_gradients(accumulator: optax.Updates, grads: optax.Updates) -> optax.Updates:
    """The accumulator in the gradients' dtypes and shardings (as Keras casts)."""
    return jax.tree.map(
        lambda a, g: _common.sharded_like(a.astype(g.dtype), g), accumulator, grads
    )


def group_arguments(extra_args: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
    """``weight`` (float32, 1 when absent) and ``flush`` (bool, ``False`` when
    absent) taken out of ``extra_args``; a concrete weight must be finite and
    >= 0, a flush a bool."""
    weight = extra_args.pop("weight", None)
    flush = extra_args.pop("flush", None)
    if weight is None:
        weight = 1.0
    elif not isinstance(weight, jax.core.Tracer):
        _validation.check_non_negative("weight", weight)
    elif jnp.ndim(weight) != 0:
        raise ValueError(
            "`weight` must be a scalar (one weight per call). Received: weight "
            f"with shape {jnp.shape(weight)}"
        )
    if flush is None:
        flush = False
    elif not isinstance(flush, jax.core.Tracer) and not (
        isinstance(flush, bool | np.bool_)
        or (np.ndim(flush) == 0 and np.asarray(flush).dtype == np.bool_)
    ):
        raise TypeError(f"`flush` must be a bool. Received: flush={flush!r}")
    return jnp.asarray(weight, jnp.float32), jnp.asarray(flush, jnp.bool_)


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
    gating: _gate.Gating | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Applies ``inner`` once every ``N`` calls, to the mean of their gradients.

    With ``N = gradient_accumulation_steps``, calls ``1 .. N - 1`` of each group
    only add the gradient to the accumulator and return zero updates; nothing in
    ``inner``'s state moves, so its counters (bias correction, schedules, EMA)
    count real updates. Call ``N`` runs ``inner`` on ``(acc + g) / N``; the next
    group's first call overwrites the accumulator rather than adding to it. This
    is Keras' ``gradient_accumulation_steps``; unlike ``optax.MultiSteps`` the
    inner update is not computed on micro-steps.

    Cost: every call adds ``g`` into the accumulator in place (the last call of
    a group writes the mean there); ``inner`` advances
    behind a gate (``gating``) that is open on the group's last call only, and
    its updates are emitted after the gate from its new state, selected to zero
    on a micro-step (XLA fuses that into the caller's ``optax.apply_updates``).
    So a micro-step reads the gradient, the accumulator and the parameters and
    writes the last two, whoever calls ``update`` (a Flax ``TrainState``, an
    ``nnx.Optimizer``, ``optax.chain``) in a jitted step that donates the
    parameters and the state. This holds when ``inner`` is made of this
    package's blocks and stateless optax transformations, composed with
    :func:`adamax_optax.chain` or :func:`adamax_optax.named_chain`. Any other
    stateful ``inner`` (``optax.adam``, an ``optax.chain`` of blocks) gives the
    same numbers, but its updates are recomputed from its old state after the
    gate, which keeps a copy of that state on an update step.

    **Weighted and partial groups.** ``update(grads, state, params, weight=w,
    flush=f)`` takes two optional arguments, traced or not:

    * ``weight``, a scalar >= 0 (the micro-batch's token or example count, for
      instance): the group's gradient is ``sum(w_i * g_i) / sum(w_i)``, where
      each ``g_i`` is the gradient of the micro-batch's *mean* loss, so that the
      group's gradient is the gradient of the mean loss over all its tokens.
      Without ``weight`` every call weighs 1: Keras' mean, exactly. The
      accumulator holds the weighted *sum* in the state dtype until the
      group's last call: with float16 state, pass weights near 1 (the count
      over its expected value) or use ``state_dtype=jnp.float32``. A group
      whose weights sum to 0 carries no gradient: its last call applies no
      update (zero updates, nothing in ``inner`` moves) and the next call
      starts a new group.
    * ``flush``, a bool: this call ends the group (the last, partial group of
      an epoch). The update uses what the group holds, this call included, and
      the next call starts a new group of up to ``N``.

    Schedules still count updates: update ``k`` evaluates them at ``k * N + N -
    1`` whatever the groups' sizes. Both arguments pass through ``optax.chain``,
    :func:`adamax_optax.chain`, ``optax.inject_hyperparams`` (whose own count
    of an injected schedule moves on every call, micro-steps included) and
    ``nnx.Optimizer.update``; Flax's ``TrainState.apply_gradients`` forwards no
    extra arguments, so call ``tx.update(grads, state.opt_state, state.params,
    weight=w)`` and ``state.replace(...)`` the fields yourself. Under
    :func:`adamax_optax.skip_nonfinite`, a skipped call's ``flush`` is dropped
    with it (the group stays open).

    A schedule of :func:`scale_by_keras_learning_rate` inside ``inner`` is
    evaluated at Keras' micro-step index, ``k * N + N - 1`` for update ``k``,
    as in :func:`adamax`: the block reads ``N`` from this wrapper while the
    wrapper traces ``inner``. optax's own schedules (``optax.scale_by_schedule``)
    count updates, as in ``optax.MultiSteps``.

    Args:
      inner: the transformation to apply once per group (or at a flush).
      gradient_accumulation_steps: ``N``, an integer >= 2.
      state_dtype: dtype of the accumulator; ``None`` keeps each parameter's dtype.
      gating: how the gate is compiled: ``"loop"``, ``"cond"``, ``"where"``
        (which computes ``inner`` on every call and selects), or ``None`` for
        the backend's default (see the performance page of the docs). All give
        the same results.

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

      Weighted by token counts, the last group of an epoch flushed early:

      >>> tx = accumulate_gradients(optax.sgd(1.0), 4)
      >>> state = tx.init(jnp.zeros(1))
      >>> _, state = tx.update(jnp.array([1.0]), state, weight=300)
      >>> updates, state = tx.update(jnp.array([5.0]), state, weight=100, flush=True)
      >>> updates  # -(300 * 1 + 100 * 5) / 400
      Array([-2.], dtype=float32)
    """
    check_gradient_accumulation_steps(gradient_accumulation_steps)
    _validation.check_state_dtype(state_dtype)
    steps = gradient_accumulation_steps

    def init(params: optax.Params) -> AccumulateGradientsState:
        _common.check_float_params(params, "accumulate_gradients")
        return AccumulateGradientsState(
            micro_step=jnp.zeros([], jnp.int32),
            weight_sum=jnp.zeros([], jnp.float32),
            accumulator=_common.zeros_like_in(params, state_dtype),
            inner_state=None,
        )

    def decide(
        raw_updates: optax.Updates,
        leaf_map: _gate.LeafMap | None,
        state: AccumulateGradientsState,
        params: optax.Params | None,
        extra_args: dict[str, Any],
    ) -> _runner.GatedCall:
        updates = _gate.mapped(raw_updates, leaf_map)
        _common.check_updates_match(updates, state.accumulator, "accumulate_gradients")
        weight, flush = group_arguments(extra_args)
        step = group_step(state, steps, weight, flush)
        accumulator = add_to_group(state.accumulator, updates, weight, step)
        new_state = state._replace(
            micro_step=jnp.where(step.last, 0, state.micro_step + 1).astype(jnp.int32),
            weight_sum=step.weight_sum,
            accumulator=accumulator,
        )
        # The group's mean, read in the gradients' dtypes inside the gate.
        return _runner.GatedCall(
            step.is_update,
            new_state,
            accumulator,
            inside=lambda mean: as_gradients(mean, updates),
        )

    def emitted(updates, state, new_state, extra_args):
        group_arguments(extra_args)  # checked here too, for an emit alone
        return as_gradients(new_state.accumulator, updates)

    def ran(new_state: AccumulateGradientsState) -> jax.Array:
        # An update ends its group (the micro-step returns to 0) with weight.
        return (new_state.micro_step == 0) & (new_state.weight_sum > 0)

    return _runner.gated(
        inner,
        gating,
        init=init,
        decide=decide,
        emitted=emitted,
        ran=ran,
        context=lambda: accumulating(steps),  # a schedule's first step is N - 1
    )
