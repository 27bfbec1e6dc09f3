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


def update_ema(ema, params):
    """The parameter EMA (momentum 0.99) optax users keep beside the optimizer."""
    return optax.incremental_update(params, ema, 0.01)


def with_ema(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` with the EMA of the updated parameters in its state, for steps built
    around ``tx.update`` alone (the training-step benchmark)."""

    def init(params):
        return tx.init(params), jax.tree.map(jnp.array, params)

    def update(grads, state, params):
        inner, ema = state
        updates, inner = tx.update(grads, inner, params)
        return updates, (inner, update_ema(ema, optax.apply_updates(params, updates)))

    return optax.GradientTransformation(init, update)


def step_with_ema(tx: optax.GradientTransformation):
    """``(init, step)``: a donated step that applies ``tx`` and then moves the EMA
    of the new parameters, as an optax user writes it."""

    def init(params):
        return tx.init(params), jax.tree.map(jnp.array, params)

    def step(params, state, grads):
        inner, ema = state
        updates, inner = tx.update(grads, inner, params)
        params = optax.apply_updates(params, updates)
        return params, (inner, update_ema(ema, params))

    return init, jax.jit(step, donate_argnums=(0, 1))
