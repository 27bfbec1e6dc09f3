"""Dynamic loss scaling: the functional twin of Keras' ``LossScaleOptimizer``."""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adamax_optax import _common, _gate, _runner, _validation


class DynamicLossScaleState(NamedTuple):
    """State of :func:`dynamic_loss_scale`.

    Attributes:
      loss_scale: the factor to multiply the next loss by (float32).
      good_steps: consecutive finite steps since the scale last changed (int32).
      skipped_steps: calls skipped for a non-finite gradient so far (int32);
        :func:`adamax_optax.get_skipped_steps` reads it.
      last_skipped: whether the last call was skipped (bool);
        :func:`adamax_optax.has_updated` reads it.
      inner_state: the wrapped transformation's state; a non-finite step leaves
        it bit-identical.
    """

    loss_scale: jax.Array
    good_steps: jax.Array
    skipped_steps: jax.Array
    last_skipped: jax.Array
    inner_state: optax.OptState


def check_dynamic_loss_scale_settings(
    initial_scale: Any,
    growth_steps: Any,
    factor: Any,
    min_loss_scale: Any,
    max_loss_scale: Any = None,
) -> None:
    """Validates the settings, naming the one that is wrong."""
    _validation.check_positive("initial_scale", initial_scale)
    _validation.check_integer_at_least(
        "growth_steps", growth_steps, 1, "`growth_steps` must be an integer >= 1."
    )
    _validation.check_positive("factor", factor)
    _validation.check_positive("min_loss_scale", min_loss_scale)
    growth = _validation.concrete_scalar(factor)
    if growth is not None and growth <= 1:
        raise ValueError(f"`factor` must be > 1. Received: factor={factor}")
    start = _validation.concrete_scalar(initial_scale)
    floor = _validation.concrete_scalar(min_loss_scale)
    if start is not None and floor is not None and start < floor:
        raise ValueError(
            "`initial_scale` must be >= `min_loss_scale`. Received: "
            f"initial_scale={initial_scale}, min_loss_scale={min_loss_scale}"
        )
    if max_loss_scale is None:
        return
    _validation.check_positive("max_loss_scale", max_loss_scale)
    cap = _validation.concrete_scalar(max_loss_scale)
    if cap is not None and start is not None and cap < start:
        raise ValueError(
            "`max_loss_scale` must be >= `initial_scale`. Received: "
            f"max_loss_scale={max_loss_scale}, initial_scale={initial_scale}"
        )


def dynamic_loss_scale(
    inner: optax.GradientTransformation,
    *,
    initial_scale: float = 2.0**15,
    growth_steps: int = 2000,
    factor: float = 2.0,
    min_loss_scale: float = 1.0,
    max_loss_scale: float | None = None,
    gating: _gate.Gating | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Wraps ``inner`` with dynamic loss scaling, as Keras' ``LossScaleOptimizer``.

    Multiply the loss by ``get_loss_scale(state)`` before differentiating and
    pass the *scaled* gradients to ``update``. Then, with ``s`` the current scale:

    * all gradients finite: ``inner`` runs on ``g / s``; after ``growth_steps``
      finite steps in a row the scale becomes ``min(s * factor,
      max_loss_scale)`` (unless that would overflow);
    * any gradient non-finite: the step is skipped entirely (zero updates; the
      inner state, accumulator, moments and EMA stay bit-identical), counted in
      ``skipped_steps`` (:func:`adamax_optax.get_skipped_steps`), and the scale
      becomes ``max(s / factor, min_loss_scale)``.

    Keras has neither a floor (``min_loss_scale``) nor a cap
    (``max_loss_scale``); jmp has a floor only. ``initial_scale``,
    ``growth_steps`` and ``factor`` default to Keras' values, and there is no
    cap, as in Keras; the floor of 1 is this library's (Keras halves without
    bound). The scale is float32 and the counters int32 whatever the parameters'
    dtype.
    A skipped step copies nothing: ``inner`` advances behind a gate that is
    closed on a skipped step, and its updates are emitted after it from its new
    state, selected to zero (see :func:`accumulate_gradients`).

    Args:
      inner: the transformation to protect.
      initial_scale: the first loss scale, > 0.
      growth_steps: finite steps in a row before growing, >= 1.
      factor: growth and back-off factor, > 1.
      min_loss_scale: the scale never goes below this, > 0.
      max_loss_scale: the scale never grows above this, >= ``initial_scale``;
        ``None`` (the default, Keras' behaviour) for no cap.
      gating: how the gate is compiled (see :func:`accumulate_gradients`).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from adamax_optax import dynamic_loss_scale, get_loss_scale
      >>> tx = dynamic_loss_scale(optax.sgd(0.1), initial_scale=1024.0)
      >>> state = tx.init(jnp.zeros(2))
      >>> updates, state = tx.update(jnp.array([jnp.inf, 1.0]), state)
      >>> updates, float(get_loss_scale(state))
      (Array([0., 0.], dtype=float32), 512.0)
      >>> updates, state = tx.update(jnp.array([512.0, -512.0]), state)
      >>> updates
      Array([-0.1,  0.1], dtype=float32)
    """
    check_dynamic_loss_scale_settings(
        initial_scale, growth_steps, factor, min_loss_scale, max_loss_scale
    )
    gating = _runner.nested_gating(gating, inner)  # the check's gating too

    def init(params: optax.Params) -> DynamicLossScaleState:
        del params
        return DynamicLossScaleState(
            loss_scale=jnp.asarray(initial_scale, _common.COMPUTE_DTYPE),
            good_steps=jnp.zeros([], jnp.int32),
            skipped_steps=jnp.zeros([], jnp.int32),
            last_skipped=jnp.asarray(False),
            inner_state=None,
        )

    def next_scale(
        finite: jax.Array, state: DynamicLossScaleState
    ) -> tuple[jax.Array, jax.Array]:
        scale = state.loss_scale
        f = _common.as_compute_scalar(factor)
        grown = scale * f
        if max_loss_scale is not None:
            grown = jnp.minimum(grown, _common.as_compute_scalar(max_loss_scale))
        grow = (state.good_steps + 1 >= growth_steps) & jnp.isfinite(grown)
        finite_scale = jnp.where(grow, grown, scale)
        finite_good_steps = jnp.where(grow, 0, state.good_steps + 1)
        backed_off = jnp.maximum(scale / f, _common.as_compute_scalar(min_loss_scale))
        loss_scale = jnp.where(finite, finite_scale, backed_off).astype(scale.dtype)
        good_steps = jnp.where(finite, finite_good_steps, 0).astype(jnp.int32)
        return loss_scale, good_steps

    def decide(
        raw_updates: optax.Updates,
        leaf_map: _gate.LeafMap | None,
        state: DynamicLossScaleState,
        params: optax.Params | None,
        extra_args: dict[str, Any],
    ) -> _runner.GatedCall:
        updates = _gate.mapped(raw_updates, leaf_map)
        finite = _gate.all_finite(updates, gating)
        # Applied behind the check of ``updates``: what it computes is kept for
        # finite gradients only (``"where"`` computes it always, then selects).
        unscale = _gate.division_by(state.loss_scale, finite_input=True)
        loss_scale, good_steps = next_scale(finite, state)
        skipped = state.skipped_steps + jnp.where(finite, 0, 1).astype(jnp.int32)
        new_state = state._replace(
            loss_scale=loss_scale,
            good_steps=good_steps,
            skipped_steps=skipped,
            last_skipped=~finite,
        )
        return _runner.GatedCall(finite, new_state, updates, unscale)

    def emitted(updates, state, new_state, extra_args):
        return _gate.mapped(updates, _gate.division_by(state.loss_scale))

    return _runner.gated(
        inner,
        gating,
        init=init,
        decide=decide,
        emitted=emitted,
        ran=lambda new_state: ~new_state.last_skipped,
    )


DYNAMIC_LOSS_SCALE_DEFAULTS: dict[str, Any] = {
    name: parameter.default
    for name, parameter in inspect.signature(dynamic_loss_scale).parameters.items()
    if name not in ("inner", "gating")
}
"""The settings of :func:`dynamic_loss_scale` (``adamax(dynamic_loss_scale={...})``
takes the same), with their defaults: Keras' where Keras has them."""
