"""Static loss scaling: Keras' ``loss_scale_factor``."""

from __future__ import annotations

import jax
import optax
from jax.typing import ArrayLike

from adamax_optax import _common, _validation


def unscale_gradients(loss_scale_factor: ArrayLike) -> optax.GradientTransformation:
    r"""Divides gradients by a fixed loss scale (Keras' ``loss_scale_factor``).

    Multiply the loss by ``loss_scale_factor`` before differentiating; this block
    undoes it: ``g = g / loss_scale_factor``. It runs on every call, before
    gradient accumulation, as Keras does.

    Args:
      loss_scale_factor: the factor the loss was multiplied by, > 0.

    Returns:
      A stateless ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adamax_optax import unscale_gradients
      >>> tx = unscale_gradients(1024.0)
      >>> updates, _ = tx.update(jnp.array([2048.0, 512.0]), tx.init(None))
      >>> updates
      Array([2. , 0.5], dtype=float32)
    """
    _validation.check_positive("loss_scale_factor", loss_scale_factor)

    def update_fn(
        updates: optax.Updates,
        state: optax.EmptyState,
        params: optax.Params | None = None,
    ) -> tuple[optax.Updates, optax.EmptyState]:
        del params
        scale = _common.as_compute_scalar(loss_scale_factor)
        updates = jax.tree.map(
            lambda g: (g.astype(_common.COMPUTE_DTYPE) / scale).astype(g.dtype),
            updates,
        )
        return updates, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
