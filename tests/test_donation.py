"""A donated training step: buffers updated in place, results those of a plain one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import donated_step, make_problem, run_donated

from adamax_optax import adamax, get_iterations

CONFIGS = {
    "defaults": {},
    "every option": dict(
        learning_rate=optax.linear_schedule(0.01, 0.001, 20),
        weight_decay=0.01,
        global_clipnorm=1.0,
        use_ema=True,
        ema_overwrite_frequency=3,
        loss_scale_factor=8.0,
    ),
    "accumulation 3": dict(gradient_accumulation_steps=3, clipvalue=1.0),
    "accumulation 2, every option": dict(
        gradient_accumulation_steps=2,
        learning_rate=optax.linear_schedule(0.01, 0.001, 20),
        weight_decay=0.01,
        global_clipnorm=1.0,
        use_ema=True,
        ema_overwrite_frequency=2,
        loss_scale_factor=8.0,
        exclude_from_weight_decay=["bias"],
    ),
    "accumulation 4, bf16 state": dict(
        gradient_accumulation_steps=4, state_dtype=jnp.bfloat16, use_ema=True
    ),
}


def plain_run(tx, params, grads):
    update = jax.jit(tx.update)
    state = tx.init(params)
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("name", CONFIGS)
def test_donated_step_equals_update_then_apply(name):
    params, grads = make_problem(steps=13)
    params = {k: jnp.asarray(v) for k, v in params.items()}
    tx = adamax(**CONFIGS[name])
    with jax.numpy_dtype_promotion("standard"):  # optax schedules
        want_params, want_state = plain_run(tx, params, grads)
        got_params, got_state = run_donated(tx, dict(params), grads)
    assert jax.tree.structure(got_state) == jax.tree.structure(want_state)
    for got, want in zip(
        jax.tree.leaves((got_params, got_state)),
        jax.tree.leaves((want_params, want_state)),
        strict=True,
    ):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(
            np.asarray(got, np.float64),
            np.asarray(want, np.float64),
            rtol=1e-6,
            atol=1e-7,
        )
    assert int(get_iterations(got_state)) == int(get_iterations(want_state))


def test_state_moves_between_donated_step_and_update():
    """Mid-group, the donated step's state continues under tx.update and back."""
    params, grads = make_problem(steps=7)
    params = {k: jnp.asarray(v) for k, v in params.items()}
    tx = adamax(0.01, gradient_accumulation_steps=3, use_ema=True)
    want, _ = plain_run(tx, params, grads)
    apply, update = donated_step(tx), jax.jit(tx.update)
    state, current = tx.init(params), dict(params)
    for i, g in enumerate(grads):
        if i % 2:
            current, state = apply(current, state, g)
        else:
            updates, state = update(g, state, current)
            current = optax.apply_updates(current, updates)
    for key in want:
        np.testing.assert_allclose(current[key], want[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("accumulate", [None, 2])
def test_buffers_are_donated(accumulate):
    tx = adamax(0.1, use_ema=True, gradient_accumulation_steps=accumulate)
    params = {"w": jnp.ones(4)}
    state = tx.init(params)
    old_params, old_state = params, state
    apply = donated_step(tx)
    params, state = apply(params, state, {"w": jnp.ones(4)})
    assert old_params["w"].is_deleted()
    # Every array the size of the parameters (moments, accumulator, EMA) was
    # updated in place; XLA may hand back fresh buffers for scalars.
    vectors = [leaf for leaf in jax.tree.leaves(old_state) if leaf.ndim]
    assert vectors and all(leaf.is_deleted() for leaf in vectors)
    params, state = apply(params, state, {"w": jnp.ones(4)})
    assert float(params["w"][0]) < 1.0


def test_mismatched_gradients_are_a_clear_error():
    tx = adamax(gradient_accumulation_steps=2)
    params = {"w": jnp.ones(4)}
    with pytest.raises(ValueError, match=r"accumulate_gradients.*shape"):
        donated_step(tx)(params, tx.init(params), {"w": jnp.ones(3)})


@pytest.mark.parametrize("clip", ["global_clipnorm", "clipnorm"])
def test_bfloat16_clipping_holds_no_float32_gradient(clip):
    """The norm reads the bfloat16 gradients itself; no float32 convert of them
    is shared with the update and materialised. (XLA's CPU backend still keeps
    the rounded bfloat16 clipped gradient, which the m and u kernels share.)"""
    tx = adamax(**{clip: 1.0})
    params = {"w": jnp.ones((256, 1024), jnp.bfloat16)}
    compiled = donated_step(tx).lower(params, tx.init(params), params).compile()
    float32_grads_bytes = 256 * 1024 * 4
    assert compiled.memory_analysis().temp_size_in_bytes < float32_grads_bytes
