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


def _first_step_float16(params, grads, lr=0.1, eps=1e-7):
    """NumPy, from the docs: the first Adamax step of float16 parameters from
    float32 gradients already unscaled and clipped (in float32), cast to
    float16 at the step, computed in float32, the moments stored in float16."""
    g = np.asarray(grads, np.float32).astype(np.float16).astype(np.float32)
    m = (0.1 * g).astype(np.float16).astype(np.float32)
    u = np.abs(g).astype(np.float16).astype(np.float32)
    update = (-lr * m / (np.float32(0.1) * (u + np.float32(eps)))).astype(np.float16)
    return np.asarray(params, np.float16) + update


@pytest.mark.parametrize(
    "options, scale, grads",
    [
        (dict(loss_scale_factor=1024.0), 1024.0, [100.0, 1.0]),
        (dict(dynamic_loss_scale={"initial_scale": 1024.0}), 1024.0, [100.0, 1.0]),
        (dict(clipnorm=1.0), 1.0, [1e5, 1.0]),
        (dict(global_clipnorm=1.0), 1.0, [1e5, 1.0]),
        (dict(skip_nonfinite=True, global_clipnorm=1.0), 1.0, [1e5, 1.0]),
    ],
    ids=["loss_scale_factor", "dynamic", "clipnorm", "global_clipnorm", "skip"],
)
def test_wide_gradients_are_unscaled_and_clipped_before_the_cast(options, scale, grads):
    """A float32 gradient above float16's range (65504) for a float16
    parameter is divided by the loss scale or clipped in float32, and cast at
    the Adamax step, as Keras casts it: a cast on entry made it infinite."""
    params = jnp.array([1.0, 2.0], jnp.float16)
    grads = np.asarray(grads, np.float32)
    tx = adamax(0.1, **options)
    scaled = jnp.asarray(grads * np.float32(scale))
    updates, state = jax.jit(tx.update)(scaled, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert new.dtype == jnp.float16
    if scale == 1.0:  # clipped to norm 1
        grads = grads / np.linalg.norm(grads)
    np.testing.assert_array_equal(np.asarray(new), _first_step_float16(params, grads))
    if "dynamic_loss_scale" in options:  # a finite step: applied, not skipped
        assert float(get_loss_scale(state)) == 1024.0


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
