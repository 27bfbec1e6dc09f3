"""Keras' clipping formulas, against closed forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from adamax_optax import keras_clipnorm, keras_clipvalue, keras_global_clipnorm


def apply(tx, grads):
    return tx.update(grads, tx.init(grads))[0]


def test_clipnorm_scales_each_leaf_on_its_own():
    grads = {"big": jnp.array([6.0, 8.0]), "small": jnp.array([0.3, 0.4])}
    out = apply(keras_clipnorm(1.0), grads)
    np.testing.assert_allclose(out["big"], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(out["small"], [0.3, 0.4], rtol=1e-6)  # norm 0.5 < 1


def test_clipnorm_keeps_a_zero_leaf_zero_without_nan():
    out = apply(keras_clipnorm(1.0), {"z": jnp.zeros((3, 2))})
    np.testing.assert_array_equal(out["z"], np.zeros((3, 2)))


def test_global_clipnorm_uses_the_norm_of_all_leaves():
    grads = {"a": jnp.array([3.0]), "b": jnp.array([0.0, 4.0])}  # global norm 5
    out = apply(keras_global_clipnorm(2.5), grads)
    np.testing.assert_allclose(out["a"], [1.5], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [0.0, 2.0], rtol=1e-6)
    unchanged = apply(keras_global_clipnorm(10.0), grads)
    np.testing.assert_allclose(unchanged["a"], [3.0], rtol=1e-6)


def test_global_clipnorm_of_zero_gradients_stays_zero():
    out = apply(keras_global_clipnorm(1.0), {"a": jnp.zeros(2)})
    np.testing.assert_array_equal(out["a"], [0.0, 0.0])


def test_global_clipnorm_non_finite_norm_gives_nan_everywhere():
    grads = {"a": jnp.array([jnp.inf, 1.0]), "b": jnp.array([2.0])}
    out = apply(keras_global_clipnorm(1.0), grads)
    assert np.all(np.isnan(out["a"])) and np.all(np.isnan(out["b"]))


def test_clipvalue_is_elementwise():
    out = apply(keras_clipvalue(1.0), jnp.array([-3.0, -0.5, 0.5, 7.0]))
    np.testing.assert_array_equal(out, [-1.0, -0.5, 0.5, 1.0])


def test_clipping_keeps_low_precision_dtypes():
    grads = {"a": jnp.array([30.0, 40.0], jnp.bfloat16)}
    for tx in (keras_clipnorm(1.0), keras_global_clipnorm(1.0), keras_clipvalue(1.0)):
        assert apply(tx, grads)["a"].dtype == jnp.bfloat16


def test_norm_clipping_under_vmap_and_grad():
    """The norms read the gradients through an optimization barrier; the
    transforms still batch (an ensemble of optimizers) and differentiate
    (meta-learning), against the closed form ``g * c / |g|``."""
    c = 2.0
    batch = jnp.array([[3.0, 4.0], [0.6, 0.8]])  # norms 5 (clipped) and 1 (kept)
    for tx in (keras_clipnorm(c), keras_global_clipnorm(c)):
        out = jax.vmap(lambda g, tx=tx: apply(tx, g))(batch)
        np.testing.assert_allclose(out, [[1.2, 1.6], [0.6, 0.8]], rtol=1e-6)

        g = np.array([3.0, 4.0])
        grad = jax.grad(lambda g, tx=tx: jnp.sum(apply(tx, g)))(jnp.asarray(g))
        norm = np.linalg.norm(g)  # d/dg_i of sum(g) c / |g|
        want = c / norm - g.sum() * c * g / norm**3
        np.testing.assert_allclose(grad, want, rtol=1e-5)
