"""The optax setups the benchmarks compare with, and the options they share."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

FULL_OPTIONS = dict(global_clipnorm=1.0, weight_decay=1e-3, use_ema=True)
"""``adamax(**FULL_OPTIONS)``: clipping, decay and EMA, the optax chain's twin."""


def optax_chain() -> optax.GradientTransformation:
    """optax's nearest equivalent of clip + Adamax + decay (its own Adamax rule)."""
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.scale_by_adamax(),
        optax.add_decayed_weights(1e-3),
        optax.scale(-1e-3),
    )


def with_ema(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` and a parameter EMA (momentum 0.99) of the updated parameters, which
    optax does not have: kept beside ``tx``'s state."""

    def init(params):
        return tx.init(params), jax.tree.map(jnp.array, params)

    def update(grads, state, params):
        inner, ema = state
        updates, inner = tx.update(grads, inner, params)
        new = optax.apply_updates(params, updates)
        ema = optax.incremental_update(new, ema, 0.01)
        return updates, (inner, ema)

    return optax.GradientTransformation(init, update)
