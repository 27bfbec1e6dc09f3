"""Static loss scaling: Keras' ``loss_scale_factor``."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from adamax_optax import _common, _gate, _runner, _validation


class UnscaleGradientsState(NamedTuple):
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

    In front of gradient accumulation the division is fused into the
    accumulator's sum, rather than written into a gradient-sized temporary; in
    front of :func:`skip_nonfinite`, into its check and behind its gate (in
    :func:`chain` or :func:`named_chain`).

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

    def init_fn(params: optax.Params) -> UnscaleGradientsState:
        del params
        scale = jnp.asarray(loss_scale_factor).astype(_common.COMPUTE_DTYPE)
        return UnscaleGradientsState(loss_scale=scale)

    return _runner.leafwise(init_fn, _gate.division_by(loss_scale_factor))
