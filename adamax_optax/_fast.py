"""``jit_apply``: the jit-compiled, buffer-donating training-step update.

An optimizer update is memory-bound: without donated buffers XLA allocates fresh
outputs on every step and runs several times slower; with them the parameters and
the state are updated in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

Apply = Callable[[optax.Params, optax.OptState, optax.Updates], tuple[Any, Any]]


def jit_apply(tx: optax.GradientTransformation | optax.MultiSteps) -> Apply:
    r"""A jitted ``apply(params, opt_state, grads) -> (params, opt_state)``.

    Computes ``updates, opt_state = tx.update(grads, opt_state, params)`` and
    ``params = optax.apply_updates(params, updates)`` in one XLA program that
    donates the parameter and state buffers, so both are updated in place. Do not
    use the ``params`` and ``opt_state`` you passed in after the call: their
    buffers now hold the results.

    It is nothing more than that: a training step of your own that calls
    ``tx.update`` and ``optax.apply_updates`` under ``jax.jit`` with
    ``donate_argnums`` for the parameters and the state (a Flax ``TrainState``,
    an ``nnx.Optimizer``) compiles to the same program, gradient accumulation's
    cheap micro-steps included.

    Args:
      tx: any optax transformation, or an ``optax.MultiSteps`` (its
        ``gradient_transformation()`` is used).

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
    if isinstance(tx, optax.MultiSteps):
        tx = tx.gradient_transformation()
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(
            "`jit_apply` needs an optax GradientTransformation or MultiSteps; "
            f"received {type(tx).__name__}."
        )

    def apply(
        params: optax.Params, opt_state: optax.OptState, grads: optax.Updates
    ) -> tuple[optax.Params, optax.OptState]:
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(apply, donate_argnums=(0, 1))
