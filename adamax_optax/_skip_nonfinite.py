"""Skipping bad steps: a call with a non-finite (or too large) gradient does nothing."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from adamax_optax import _common, _gate, _runner, _validation
from adamax_optax._clipping import global_norm


class SkipNonfiniteState(NamedTuple):
    """State of :func:`skip_nonfinite`.

    Attributes:
      skipped_steps: calls skipped so far (int32);
        :func:`adamax_optax.get_skipped_steps` reads it.
      last_skipped: whether the last call was skipped (bool);
        :func:`adamax_optax.has_updated` reads it.
      inner_state: the wrapped transformation's state; a skipped call leaves it
        bit-identical.
    """

    skipped_steps: jax.Array
    last_skipped: jax.Array
    inner_state: optax.OptState


def is_good_step(
    raw_updates: optax.Updates,
    leaf_map: _gate.LeafMap | None,
    skip_norm_above: ArrayLike | None,
    extra_args: dict[str, Any],
    gating: _gate.Gating | None,
) -> jax.Array:
    """``True`` when the call may run: every element of the gradients
    (``raw_updates`` mapped by ``leaf_map``) and the accumulation ``weight``
    (if given) finite, and the global norm at most ``skip_norm_above`` (if
    set).

    With a concrete threshold whose square is finite in every leaf's compute
    dtype, the norm's check alone (one read): a NaN or an infinity makes the
    sum of squares NaN or infinite, and so does an overflow, which only a norm
    above the threshold can cause; either way the norm is not at most the
    threshold. Otherwise the finiteness check as well.
    """
    good = jnp.asarray(True)
    if skip_norm_above is not None:
        scale = _norm_scale(skip_norm_above, raw_updates)
        norm = global_norm(raw_updates, leaf_map, scale)
        threshold = _common.as_compute_scalar(skip_norm_above, norm.dtype)
        good = norm <= threshold * norm.dtype.type(scale)
    if not norm_check_proves_finite(skip_norm_above, raw_updates):
        good = good & _gate.all_finite(raw_updates, gating, leaf_map)
    weight = extra_args.get("weight")
    if weight is not None:
        good = good & jnp.isfinite(jnp.asarray(weight, jnp.float32))
    return good


def _narrowest_range(raw_updates: optax.Updates) -> Any:
    """The ``finfo`` of the narrowest compute dtype among the leaves (each
    squares in its own), or ``None`` without leaves."""
    leaves = jax.tree.leaves(raw_updates)  # a leaf map keeps their dtypes
    infos = [
        jnp.finfo(_common.real_dtype(_common.compute_dtype(g.dtype))) for g in leaves
    ]
    return min(infos, key=lambda info: float(info.max)) if infos else None


def _norm_scale(skip_norm_above: ArrayLike, raw_updates: optax.Updates) -> float:
    """1, or for a concrete threshold whose square overflows the compute dtype
    (above about 1.8e19 in float32) a power of two that the norm is taken of
    ``scale * g`` with, so that finite gradients near the threshold do not
    overflow their squares (a sum that still overflows is of a norm above any
    threshold of the dtype)."""
    if _validation.concrete_scalar(skip_norm_above) is None or (
        norm_check_proves_finite(skip_norm_above, raw_updates)
    ):
        return 1.0
    return 2.0 ** -(_narrowest_range(raw_updates).maxexp // 2 + 6)


def norm_check_proves_finite(
    skip_norm_above: ArrayLike | None, raw_updates: optax.Updates
) -> bool:
    """Whether ``global_norm(g) <= skip_norm_above`` implies every element of
    ``g`` finite: the threshold is concrete and its square below the largest
    finite number of each leaf's compute dtype."""
    threshold = None
    if skip_norm_above is not None:
        threshold = _validation.concrete_scalar(skip_norm_above)
    if threshold is None:
        return False
    narrowest = _narrowest_range(raw_updates)
    return narrowest is None or threshold * threshold < float(narrowest.max)


def skip_nonfinite(
    inner: optax.GradientTransformation,
    *,
    skip_norm_above: ArrayLike | None = None,
    gating: _gate.Gating | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Skips a call whose gradient holds a NaN or an infinity: it changes nothing.

    A call is *good* when every element of every gradient leaf is finite (and
    the accumulation ``weight``, when one is passed), and, with
    ``skip_norm_above``, the global norm ``sqrt(sum |g| ** 2)`` is at most that.
    A good call is ``inner.update``; any other call:

    * returns zero updates, so the parameters stay as they are;
    * leaves ``inner``'s state bit-identical: moments, EMA, the schedule's and
      the bias correction's counts, an accumulator and its micro-step (under
      accumulation the bad micro-step is dropped, and the group waits for its
      ``N`` good ones; a ``flush=True`` on a skipped call is dropped with it);
    * adds one to ``skipped_steps`` (:func:`adamax_optax.get_skipped_steps`).

    Without it, a single NaN element makes Adamax's ``u`` NaN for good (and,
    under ``global_clipnorm``, every leaf's update). Like optax's
    ``apply_if_finite`` (a ``lax.cond``), a skipped call computes nothing;
    unlike it, it never applies a bad update after a run of them
    (``max_consecutive_errors``), drops a bad accumulation micro-step alone,
    and advances ``inner`` behind the same gate as
    :func:`adamax_optax.accumulate_gradients`, so it copies nothing. The check is one
    read of the gradient: ``isfinite(sum(g))`` per leaf, and only when a sum is
    not finite the exact ``isfinite(sum(g - g))``, which never overflows. It is
    not folded into a global norm, whose ``g ** 2`` overflows float32 above
    about 1.8e19 and would skip large finite gradients; but with a concrete
    ``skip_norm_above`` below that, the norm's check is the one read, as a norm
    at most the threshold proves every element finite (a threshold above it
    is compared with the norm of ``g`` scaled by a power of two). Under accumulation
    ``skip_norm_above`` applies to each call's gradient, not the group's mean.

    With :func:`adamax_optax.dynamic_loss_scale` around it, it sees the
    unscaled gradients, and :func:`adamax_optax.get_skipped_steps` adds both
    counts (a call skipped by the loss scale never reaches this wrapper). The
    loss scale's division (or that of :func:`adamax_optax.unscale_gradients`
    before it in :func:`adamax_optax.chain`) is computed inside this wrapper's
    check and gate, never into a buffer; and as the loss scale has checked the
    gradients already, the finiteness check reads nothing more there with
    ``gating="loop"`` or ``"cond"`` (with a scale below 1, which can overflow a
    finite gradient, the exact check runs).

    Args:
      inner: the transformation to protect.
      skip_norm_above: also skip a call whose global gradient norm exceeds
        this, > 0; ``None`` (the default) checks finiteness only.
      gating: how the gate is compiled (see
        :func:`adamax_optax.accumulate_gradients`).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`SkipNonfiniteState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from adamax_optax import get_skipped_steps, skip_nonfinite
      >>> tx = skip_nonfinite(optax.sgd(0.1, momentum=0.9))
      >>> state = tx.init(jnp.zeros(2))
      >>> updates, state = tx.update(jnp.array([jnp.nan, 1.0]), state)
      >>> updates, int(get_skipped_steps(state))
      (Array([0., 0.], dtype=float32), 1)
      >>> updates, state = tx.update(jnp.array([1.0, 1.0]), state)
      >>> updates  # the momentum never saw the NaN
      Array([-0.1, -0.1], dtype=float32)
    """
    if skip_norm_above is not None:
        _validation.check_positive("skip_norm_above", skip_norm_above)
    gating = _runner.nested_gating(gating, inner)  # the checks' gating too

    def init(params: optax.Params) -> SkipNonfiniteState:
        del params
        return SkipNonfiniteState(
            jnp.zeros([], jnp.int32), jnp.asarray(False), inner_state=None
        )

    def decide(
        raw_updates: optax.Updates,
        leaf_map: _gate.LeafMap | None,
        state: SkipNonfiniteState,
        params: optax.Params | None,
        extra_args: dict[str, Any],
    ) -> _runner.GatedCall:
        # A pending ``leaf_map`` (a loss scale's division) is applied in the
        # check's reductions and inside the gate, never into a buffer.
        good = is_good_step(raw_updates, leaf_map, skip_norm_above, extra_args, gating)
        skipped = state.skipped_steps + jnp.where(good, 0, 1).astype(jnp.int32)
        new_state = state._replace(skipped_steps=skipped, last_skipped=~good)
        return _runner.GatedCall(good, new_state, raw_updates, leaf_map)

    return _runner.gated(
        inner,
        gating,
        init=init,
        decide=decide,
        emitted=lambda updates, state, new_state, extra_args: updates,
        ran=lambda new_state: ~new_state.last_skipped,
    )
