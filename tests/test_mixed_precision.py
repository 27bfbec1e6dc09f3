"""Low and high precision: bfloat16 / float16 parameters with float32 state under
strict dtype promotion, and float64 parameters computing in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_problem
from reference import ReferenceAdamax

from adamax_optax import adamax, finalize_variable_values, get_loss_scale

ALL_OPTIONS = {
    "weight_decay": 1e-3,
    "global_clipnorm": 1.0,
    "use_ema": True,
    "ema_momentum": 0.9,
    "gradient_accumulation_steps": 2,
    "exclude_from_weight_decay": ["b"],
}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("state_dtype", [None, jnp.float32])
def test_low_precision_training_keeps_dtypes_and_learns(dtype, state_dtype):
    target = jnp.linspace(-1.0, 1.0, 8).astype(dtype)
    params = {"w": jnp.zeros(8, dtype), "b": jnp.zeros(1, dtype)}
    tx = adamax(0.05, **ALL_OPTIONS, state_dtype=state_dtype)

    def loss_fn(p):
        diff = (p["w"] + p["b"][0] - target).astype(jnp.float32)
        return jnp.mean(diff**2)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    start = float(loss_fn(params))
    for _ in range(200):
        params, state = step(params, state)
    assert float(loss_fn(params)) < 0.05 * start
    assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(params))
    for leaf in jax.tree.leaves(state):
        if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim:
            assert leaf.dtype == (state_dtype or dtype)
    assert finalize_variable_values(params, state)["w"].dtype == dtype


def test_float32_state_remembers_steps_too_small_for_bfloat16():
    """A bf16 moment cannot hold 1 + 1e-3; a float32 one can."""
    grads = jnp.full(4, 1.0 + 1e-3, jnp.float32)
    kept = {}
    for state_dtype in (None, jnp.float32):
        params = jnp.zeros(4, jnp.bfloat16)
        tx = adamax(0.01, state_dtype=state_dtype)
        state = tx.init(params)
        for _ in range(30):
            _, state = tx.update(grads.astype(jnp.bfloat16), state, params)
        kept[state_dtype] = state["adamax"].m.astype(jnp.float32)
    exact = 1.0 - 0.9**30  # m for a constant gradient 1 (bf16 rounds 1.001 to 1)
    assert np.allclose(kept[jnp.float32], exact, rtol=1e-6)
    assert not np.allclose(kept[None], exact, rtol=1e-4)


def test_float16_overflow_is_absorbed_by_dynamic_loss_scaling():
    """fp16 gradients of a 2**15-scaled loss overflow; the scale backs off."""
    params = jnp.full(4, 3.0, jnp.float16)
    tx = adamax(0.1, dynamic_loss_scale=True, state_dtype=jnp.float32)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        scale = get_loss_scale(state).astype(jnp.float16)
        grads = jax.grad(lambda p: jnp.sum(p.astype(jnp.float16) ** 2) * scale)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(12):
        params, state = step(params, state)
    assert float(get_loss_scale(state)) < 2.0**15
    assert bool(jnp.all(jnp.isfinite(params))) and params.dtype == jnp.float16
    assert float(jnp.max(params)) < 3.0  # after backing off, it learns


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(weight_decay=0.01, global_clipnorm=1.0, use_ema=True),
        dict(gradient_accumulation_steps=4),
    ],
    ids=["defaults", "clip+decay+EMA", "accumulation"],
)
def test_float64_parameters_compute_in_float64(options):
    """50 steps in float64 stay within float64 rounding of the NumPy reference;
    computing in float32 would leave them about 1e-8 away."""
    params, grads = make_problem(steps=50)
    with jax.enable_x64(True):
        tx = adamax(0.01, **options)
        ours = {k: jnp.asarray(v, jnp.float64) for k, v in params.items()}
        state = tx.init(ours)
        update = jax.jit(tx.update)
        for g in grads:
            g64 = {k: jnp.asarray(v, jnp.float64) for k, v in g.items()}
            updates, state = update(g64, state, ours)
            ours = optax.apply_updates(ours, updates)
        assert all(v.dtype == jnp.float64 for v in jax.tree.leaves(state) if v.ndim)
    reference = ReferenceAdamax(params, learning_rate=0.01, **options)
    for g in grads:
        reference.step({k: np.asarray(v, np.float64) for k, v in g.items()})
    for key in params:
        error = np.max(np.abs(np.asarray(ours[key]) - reference.params[key]))
        assert error < 1e-12, (key, error)
