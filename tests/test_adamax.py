"""``scale_by_keras_adamax``: the update rule, against closed forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adamax_optax import ScaleByKerasAdamaxState, scale_by_keras_adamax


def test_first_step_is_sign_times_lr_over_one_plus_eps_ratio():
    """t=1: m = (1-b1) g, u = |g|, so direction = g / (|g| + eps) exactly."""
    g = jnp.array([3.0, -0.5, 1e-3, 0.0])
    tx = scale_by_keras_adamax(epsilon=1e-7)
    direction, state = tx.update(g, tx.init(g))
    expected = np.asarray(g, np.float64) / (np.abs(np.asarray(g, np.float64)) + 1e-7)
    np.testing.assert_allclose(direction, expected, rtol=2e-6)
    np.testing.assert_allclose(state.m, 0.1 * np.asarray(g), rtol=1e-6)
    np.testing.assert_array_equal(state.u, jnp.abs(g))
    assert int(state.count) == 1


def test_constant_gradient_closed_form():
    """Constant g: m_t = (1 - b1^t) g, u_t = |g|, so direction = g / (|g| + eps)."""
    b1, b2, eps = 0.8, 0.95, 1e-6
    g = jnp.array([2.0, -4.0])
    tx = scale_by_keras_adamax(b1, b2, eps)
    state = tx.init(g)
    for t in range(1, 8):
        direction, state = tx.update(g, state)
        np.testing.assert_allclose(state.m, (1 - b1**t) * np.asarray(g), rtol=1e-5)
        np.testing.assert_allclose(state.u, np.abs(g), rtol=1e-6)
        np.testing.assert_allclose(
            direction, np.asarray(g) / (np.abs(g) + eps), rtol=1e-5
        )


def test_infinity_norm_decays_then_takes_the_max():
    tx = scale_by_keras_adamax(beta_2=0.5)
    state = tx.init(jnp.zeros(1))
    _, state = tx.update(jnp.array([8.0]), state)
    _, state = tx.update(jnp.array([1.0]), state)
    assert float(state.u[0]) == 4.0  # max(0.5 * 8, 1)
    _, state = tx.update(jnp.array([-5.0]), state)
    assert float(state.u[0]) == 5.0  # max(0.5 * 4, |-5|)


def test_differs_from_optax_scale_by_adamax():
    """optax keeps eps inside the max, so the two rules part on step 2."""
    ours = scale_by_keras_adamax(0.9, 0.5, 1.0)
    theirs = optax.scale_by_adamax(0.9, 0.5, eps=1.0)
    state_ours, state_theirs = ours.init(jnp.zeros(1)), theirs.init(jnp.zeros(1))
    for g in (jnp.array([2.0]), jnp.array([0.0])):
        d_ours, state_ours = ours.update(g, state_ours)
        with jax.numpy_dtype_promotion("standard"):  # optax is not strict-clean
            d_theirs, state_theirs = theirs.update(g, state_theirs)
    # m = 0.9 * 0.2, bias correction 1 - 0.81, u = max(0.5 * 2, 0) = 1.
    expected = 0.18 / (0.19 * (1.0 + 1.0))
    assert float(d_ours[0]) == pytest.approx(expected, rel=1e-6)
    assert abs(float(d_theirs[0]) - expected) > 0.1 * expected


@pytest.mark.parametrize("state_dtype", [None, jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes(param_dtype, state_dtype):
    params = {"a": jnp.ones((2, 3), param_dtype), "b": jnp.ones((4,), param_dtype)}
    tx = scale_by_keras_adamax(state_dtype=state_dtype)
    state = tx.init(params)
    direction, state = jax.jit(tx.update)(params, state)
    want = state_dtype or param_dtype
    for leaf in jax.tree.leaves((state.m, state.u)):
        assert leaf.dtype == want
    for leaf in jax.tree.leaves(direction):
        assert leaf.dtype == param_dtype
    assert state.count.dtype == jnp.int32
    assert isinstance(state, ScaleByKerasAdamaxState)


def test_count_saturates_instead_of_overflowing():
    tx = scale_by_keras_adamax()
    state = tx.init(jnp.zeros(1))._replace(
        count=jnp.asarray(np.iinfo(np.int32).max, jnp.int32)
    )
    direction, state = tx.update(jnp.ones(1), state)
    assert int(state.count) == np.iinfo(np.int32).max
    assert np.all(np.isfinite(direction))
