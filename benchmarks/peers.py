"""The peers the benchmarks compare with: the optax setups (and the options they
share with ours), Keras 3's ``Adamax`` and ``torch.optim.Adamax``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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


def keras_step(params: dict[str, jax.Array]) -> tuple[Callable[..., Any], Any] | None:
    """Keras 3 ``Adamax.stateless_apply`` under ``jax.jit``, donated; None without."""
    import os

    os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        import keras
    except ImportError:
        return None
    if keras.backend.backend() != "jax":
        return None
    names = sorted(params)
    optimizer = keras.optimizers.Adamax()
    variables = [keras.Variable(params[k]) for k in names]
    optimizer.build(variables)
    opt_vars = [v.value for v in optimizer.variables]

    def apply(trainable, opt_vars, grads):
        return optimizer.stateless_apply(opt_vars, grads, trainable)

    step = jax.jit(apply, donate_argnums=(0, 1))

    def run(params, state, grads):
        trainable, opt = step(
            [params[k] for k in names], state, [grads[k] for k in names]
        )
        return dict(zip(names, trainable, strict=True)), opt

    del variables
    return run, opt_vars


def torch_time(total: int, leaves: int, repeats: int) -> dict[str, float] | None:
    """``torch.optim.Adamax`` step medians (foreach off and on); None without torch.

    On the GPU that JAX uses when torch sees one (CUDA), else on the CPU.
    """
    try:
        import torch
    except ImportError:
        return None
    on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    synchronize = torch.cuda.synchronize if on_gpu else (lambda: None)
    out = {}
    for foreach in (False, True):
        weights = [
            torch.nn.Parameter(torch.ones(total // leaves, device=device))
            for _ in range(leaves)
        ]
        for w in weights:
            w.grad = torch.full_like(w, 0.5)
        optimizer = torch.optim.Adamax(weights, lr=1e-3, foreach=foreach)
        optimizer.step()
        times = []
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            optimizer.step()
            synchronize()
            times.append(time.perf_counter() - start)
        out[f"torch.optim.Adamax (foreach={foreach})"] = float(np.median(times))
        del optimizer, weights
        if on_gpu:
            torch.cuda.empty_cache()
    return out
