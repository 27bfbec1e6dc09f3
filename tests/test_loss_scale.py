"""Static loss-scale unscaling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from adamax_optax import adamax, unscale_gradients


def test_unscale_divides_every_leaf():
    tx = unscale_gradients(4.0)
    out, _ = tx.update({"a": jnp.array([8.0]), "b": jnp.array([-2.0])}, tx.init(None))
    assert float(out["a"][0]) == 2.0 and float(out["b"][0]) == -0.5


def test_scaled_loss_gives_the_unscaled_trajectory():
    """Scaling the loss by 2**10 and unscaling must give the same parameters."""
    loss = lambda w: jnp.sum((w - 3.0) ** 2)  # noqa: E731
    results = []
    for factor in (None, 1024.0):
        tx = adamax(0.1, loss_scale_factor=factor)
        w = jnp.array([0.0, 1.0])
        state = tx.init(w)
        for _ in range(20):
            g = jax.grad(lambda w, f=factor or 1.0: loss(w) * f)(w)
            updates, state = tx.update(g, state, w)
            w = w + updates
        results.append(w)
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6)
