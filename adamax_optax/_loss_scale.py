"""Static loss scaling: Keras' ``loss_scale_factor``."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from adamax_optax import _common, _validation


class StaticLossScaleState(NamedTuple):
    """State of :func:`unscale_gradients`.

    Attributes:
      loss_scale: the factor to multiply the loss by (float32), so that
        :func:`get_loss_scale` reads it like a dynamic one.
    """

    loss_scale: jax.Array


def divide_by_scale(grads: optax.Updates, scale: ArrayLike) -> optax.Updates:
    """``g / scale`` for every leaf, computed in float32, kept in ``g``'s dtype."""
    return jax.tree.map(
        lambda g: (g.astype(_common.COMPUTE_DTYPE) / scale).astype(g.dtype), grads
    )


def unscale_gradients(loss_scale_factor: ArrayLike) -> optax.GradientTransformation:
    r"""Divides gradients by a fixed loss scale (Keras' ``loss_scale_factor``).

    Multiply the loss by ``loss_scale_factor`` before differentiating; this block
    undoes it: ``g = g / loss_scale_factor``. It runs on every call, before
    gradient accumulation, as Keras does.

    Args:
      loss_scale_factor: the factor the loss was multiplied by, > 0.

    Returns:
      An ``optax.GradientTransformation`` whose state records the factor.

    Example:
      >>> import jax.numpy as jnp
      >>> from adamax_optax import unscale_gradients
      >>> tx = unscale_gradients(1024.0)
      >>> updates, _ = tx.update(jnp.array([2048.0, 512.0]), tx.init(None))
      >>> updates
      Array([2. , 0.5], dtype=float32)
    """
    _validation.check_positive("loss_scale_factor", loss_scale_factor)

    def current_state() -> StaticLossScaleState:
        scale = jnp.asarray(loss_scale_factor).astype(_common.COMPUTE_DTYPE)
        return StaticLossScaleState(loss_scale=scale)

    def init_fn(params: optax.Params) -> StaticLossScaleState:
        del params
        return current_state()

    def update_fn(
        updates: optax.Updates,
        state: StaticLossScaleState,
        params: optax.Params | None = None,
    ) -> tuple[optax.Updates, StaticLossScaleState]:
        del params, state
        scale = _common.as_compute_scalar(loss_scale_factor)
        return divide_by_scale(updates, scale), current_state()

    return optax.GradientTransformation(init_fn, update_fn)
