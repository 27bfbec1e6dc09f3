"""Non-finite gradients, malformed inputs, and composition with optax wrappers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adamax_optax import adamax, get_iterations, get_loss_scale


def test_thousands_of_steps_with_random_overflows_stay_finite():
    """3000 steps, ~10% of them with NaN or Inf: parameters and state stay finite."""
    tx = adamax(
        0.01,
        weight_decay=0.01,
        global_clipnorm=1.0,
        use_ema=True,
        ema_overwrite_frequency=50,
        gradient_accumulation_steps=2,
        dynamic_loss_scale={"initial_scale": 2.0**10, "growth_steps": 20},
    )
    params = {"w": jnp.linspace(-1.0, 1.0, 16), "b": jnp.zeros(4)}
    state = tx.init(params)

    def all_finite(tree):
        return jnp.all(
            jnp.stack(
                [
                    jnp.all(jnp.isfinite(x))
                    for x in jax.tree.leaves(tree)
                    if jnp.issubdtype(x.dtype, jnp.floating)
                ]
            )
        )

    def step(carry, key):
        params, state, ok, skipped = carry
        k_grad, k_bad, k_kind = jax.random.split(key, 3)
        scale = get_loss_scale(state)
        grads = jax.tree.map(
            lambda p: scale * jax.random.normal(k_grad, p.shape) + scale * p, params
        )
        bad = jax.random.uniform(k_bad) < 0.1
        poison = jnp.where(jax.random.uniform(k_kind) < 0.5, jnp.nan, jnp.inf)
        grads["w"] = grads["w"].at[3].set(jnp.where(bad, poison, grads["w"][3]))
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        ok = ok & all_finite(params) & all_finite(state)
        return (params, state, ok, skipped + bad.astype(jnp.int32)), None

    keys = jax.random.split(jax.random.key(0), 3000)
    init = (params, state, jnp.asarray(True), jnp.asarray(0, jnp.int32))
    (params, state, ok, skipped), _ = jax.jit(lambda c, k: jax.lax.scan(step, c, k))(
        init, keys
    )
    assert bool(ok)
    assert 200 < int(skipped) < 400
    # Only finite steps count; each group needs 2 of them.
    assert int(get_iterations(state)) == (3000 - int(skipped)) // 2
    assert float(get_loss_scale(state)) >= 1.0


@pytest.mark.parametrize("jit", [False, True])
def test_gradient_tree_that_does_not_match_the_parameters(jit):
    tx = adamax()
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(
        ValueError,
        match=r"gradients do not match the optimizer state: the gradients have no "
        r"leaf 'b' \(the optimizer state: 2 leaves, the gradients: 1\)",
    ):
        update({"w": jnp.ones(3)}, state, params)
    with pytest.raises(ValueError, match=r"leaf 'b' has shape \(3,\) in the gradients"):
        update({"w": jnp.ones(3), "b": jnp.ones(3)}, state, params)


def test_accumulation_checks_the_tree_before_accumulating():
    tx = adamax(gradient_accumulation_steps=2)
    state = tx.init({"w": jnp.ones(3)})
    with pytest.raises(ValueError, match="accumulate_gradients"):
        tx.update({"v": jnp.ones(3)}, state)


def test_integer_parameters_are_rejected_at_init():
    with pytest.raises(TypeError, match="leaf 'step' has dtype int32"):
        adamax().init({"w": jnp.ones(2), "step": jnp.zeros((), jnp.int32)})


@pytest.mark.parametrize("leaf", ["relu", object()])
def test_a_leaf_that_is_not_a_number_is_named_at_init(leaf):
    # numpy alone would say "data type 'relu' not understood".
    with pytest.raises(TypeError, match=r"leaf 'activation' is .* not an array"):
        adamax().init({"w": jnp.ones(2), "activation": leaf})


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
@pytest.mark.parametrize("with_params", [False, True], ids=["alone", "with params"])
def test_integer_gradients_are_rejected(dtype, with_params):
    # With the parameters too: the cast to their dtype must not hide it.
    tx = adamax(weight_decay=0.1)
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    grads = {"w": jnp.ones(2, dtype)}
    with pytest.raises(TypeError, match=r"gradient 'w' has dtype .*floating point"):
        tx.update(grads, state, params if with_params else None)


def test_composes_with_apply_if_finite():
    tx = optax.apply_if_finite(adamax(0.1), max_consecutive_errors=2)
    params = jnp.ones(2)
    state = tx.init(params)
    with jax.numpy_dtype_promotion("standard"):  # optax's wrapper is not strict-clean
        updates, state = tx.update(jnp.array([jnp.nan, 1.0]), state, params)
        assert np.all(np.asarray(updates) == 0)
        assert int(state.notfinite_count) == 1
        updates, state = tx.update(jnp.array([1.0, 1.0]), state, params)
    np.testing.assert_allclose(updates, [-0.1, -0.1], rtol=1e-5)
    assert int(get_iterations(state)) == 1
