"""Static loss scaling: Keras' ``loss_scale_factor``."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from adamax_optax import _common, _validation
from adamax_optax._split import Gate, split_transformation


class StaticLossScaleState(NamedTuple):
    """State of :func:`unscale_gradients`.

    Attributes:
      loss_scale: the factor to multiply the loss by (float32), so that
        :func:`get_loss_scale` reads it like a dynamic one.
    """

    loss_scale: jax.Array


def unscale_gradients(
    loss_scale_factor: ArrayLike,
) -> optax.GradientTransformationExtraArgs:
    r"""Divides gradients by a fixed loss scale (Keras' ``loss_scale_factor``).

    Multiply the loss by ``loss_scale_factor`` before differentiating; this block
    undoes it: ``g = g / loss_scale_factor``. It runs on every call, before
    gradient accumulation, as Keras does.

    In front of gradient accumulation inside :func:`adamax` the division happens
    inside the accumulation's loops, fused with the sum, rather than into a
    gradient-sized temporary.

    Args:
      loss_scale_factor: the factor the loss was multiplied by, > 0.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state records the factor.

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

    def advance(updates, state, params=None):
        del updates, state, params
        return current_state()

    def emit(updates, state, new_state, params=None):
        del state, params
        return Gate(divisor=new_state.loss_scale).divide(updates)

    return split_transformation(
        init_fn, advance, emit, divisor=lambda state: current_state().loss_scale
    )
