"""Properties over random configurations (hypothesis)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from adamax_optax import adamax


@st.composite
def configurations(draw):
    """Any valid combination of adamax options."""
    config = {"learning_rate": draw(st.floats(1e-4, 0.5))}
    if draw(st.booleans()):
        config["weight_decay"] = draw(st.floats(0.0, 0.5))
    clip = draw(st.sampled_from([None, "clipnorm", "clipvalue", "global_clipnorm"]))
    if clip:
        config[clip] = draw(st.floats(0.05, 5.0))
    if draw(st.booleans()):
        config["use_ema"] = True
        config["ema_momentum"] = draw(st.floats(0.0, 1.0))
        config["ema_overwrite_frequency"] = draw(st.sampled_from([None, 1, 3]))
    if draw(st.booleans()):
        config["loss_scale_factor"] = draw(st.sampled_from([2.0, 1024.0]))
    if draw(st.booleans()):
        config["gradient_accumulation_steps"] = draw(st.integers(2, 4))
    return config


shapes = st.lists(
    st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple),
    min_size=1,
    max_size=3,
)


def gradient_sequences(shape, steps):
    finite = st.floats(-1e3, 1e3, width=32)
    return st.lists(
        arrays(np.float32, shape, elements=finite), min_size=steps, max_size=steps
    )


@given(
    beta_1=st.floats(0.0, 0.95),
    gap=st.floats(0.01, 1.0),
    lr=st.floats(1e-4, 1.0),
    grads=gradient_sequences((5,), 8),
)
def test_every_step_is_within_the_adamax_bound(beta_1, gap, lr, grads):
    """The update rule bounds the step:
    |step_t| <= lr (1-b1)/(1-b1/b2) (1-(b1/b2)^t) / (1-b1^t)."""
    beta_2 = beta_1 + gap * (0.9999 - beta_1)
    tx = adamax(lr, beta_1, beta_2)
    params = jnp.zeros(5)
    state = tx.init(params)
    ratio = beta_1 / beta_2
    for t, g in enumerate(grads, start=1):
        updates, state = tx.update(jnp.asarray(g), state, params)
        bound = lr * (1 - beta_1) / (1 - ratio) * (1 - ratio**t) / (1 - beta_1**t)
        assert float(jnp.max(jnp.abs(updates))) <= bound * (1 + 1e-5) + 1e-12


@given(
    config=configurations(),
    leaf_shapes=shapes,
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
    state_dtype=st.sampled_from([None, jnp.float32]),
)
def test_shapes_and_dtypes_are_kept(config, leaf_shapes, dtype, state_dtype):
    # Shapes and dtypes are what tracing gives (``test_no_recompilation...``
    # checks that eager values are what ``jit`` computes): nothing is compiled.
    params = [jax.ShapeDtypeStruct(s, dtype) for s in leaf_shapes]
    tx = adamax(**config, state_dtype=state_dtype)
    state = jax.eval_shape(tx.init, params)
    updates, new_state = jax.eval_shape(tx.update, params, state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    for u, p in zip(updates, params, strict=True):
        assert u.shape == p.shape and u.dtype == p.dtype
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    for old, new in zip(
        jax.tree.leaves(state), jax.tree.leaves(new_state), strict=True
    ):
        assert old.shape == new.shape and old.dtype == new.dtype
    for leaf in jax.tree.leaves(state):
        if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim:
            assert leaf.dtype == (state_dtype or dtype)


@given(config=configurations(), seed=st.integers(0, 2**16))
def test_no_recompilation_and_jit_agrees_with_eager(config, seed):
    rng = np.random.default_rng(seed)
    params = {"a": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.zeros(2)}
    grads = [
        jax.tree.map(
            lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params
        )
        for _ in range(5)
    ]
    tx = adamax(**config)
    chex.clear_trace_counter()  # chex counts by function; each example is new

    @jax.jit
    @chex.assert_max_traces(n=1)
    def jitted(g, state, params):
        return tx.update(g, state, params)

    p_jit, s_jit = params, tx.init(params)
    p_eager, s_eager = params, tx.init(params)
    for g in grads:
        u, s_jit = jitted(g, s_jit, p_jit)
        p_jit = optax.apply_updates(p_jit, u)
        u, s_eager = tx.update(g, s_eager, p_eager)
        p_eager = optax.apply_updates(p_eager, u)
    for key in params:
        np.testing.assert_allclose(p_jit[key], p_eager[key], rtol=1e-5, atol=1e-6)
