"""Weighted and partial accumulation groups: ``update(..., weight=w, flush=f)``.

References: the weighted mean computed by hand, the NumPy reference with its
weights and flushes, and the unweighted run itself for ``weight=1``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import EVERY_OPTION, assert_parity, make_problem
from reference import ReferenceAdamax

import adamax_optax as ao
from adamax_optax import accumulate_gradients, adamax


def run(tx, params, calls, jit=True):
    """Feeds ``(grads, extra arguments)`` pairs; returns params and state."""
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for grads, extra in calls:
        updates, state = update(grads, state, params, **extra)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("gating", ["loop", "cond", "where"])
def test_a_group_is_the_weighted_mean_by_hand(gating):
    rng = np.random.default_rng(1)
    grads = [rng.normal(size=5).astype(np.float32) for _ in range(4)]
    weights = rng.uniform(0.5, 400.0, size=4).astype(np.float32)
    tx = accumulate_gradients(optax.sgd(1.0), 4, gating=gating)
    state = tx.init(jnp.zeros(5))
    for g, w in zip(grads, weights, strict=True):
        updates, state = jax.jit(tx.update)(jnp.asarray(g), state, weight=w)
    weighted = sum(np.float64(w) * g for g, w in zip(grads, weights, strict=True))
    by_hand = -weighted / weights.sum(dtype=np.float64)
    np.testing.assert_allclose(updates, by_hand, rtol=1e-6)
    assert float(state.weight_sum) == pytest.approx(weights.sum(), rel=1e-6)


def weighted_calls(grads, n, seed=2):
    rng = np.random.default_rng(seed)
    weights = rng.integers(1, 512, size=len(grads)).astype(np.float32)
    return [(g, {"weight": w}) for g, w in zip(grads, weights, strict=True)]


@pytest.mark.parametrize("gating", ["loop", "cond", "where"])
def test_weighted_adamax_matches_the_numpy_reference(gating):
    params, grads = make_problem(steps=24)
    schedule = optax.linear_schedule(0.01, 0.001, 24)
    calls = weighted_calls(grads, 4)
    with jax.numpy_dtype_promotion("standard"):
        tx = adamax(schedule, **EVERY_OPTION, gating=gating)
        got, _ = run(tx, params, calls)
    reference = ReferenceAdamax(params, schedule, **EVERY_OPTION)
    for g, extra in calls:
        reference.step(g, **extra)
    assert_parity(got, reference.params)


def test_weight_one_is_the_unweighted_run_bit_for_bit():
    params, grads = make_problem(steps=12)
    tx = adamax(**EVERY_OPTION)
    plain = run(tx, params, [(g, {}) for g in grads])
    ones = run(tx, params, [(g, {"weight": 1.0}) for g in grads])
    chex.assert_trees_all_equal(ones, plain)


def test_a_flushed_partial_group_is_the_mean_of_its_calls():
    """Groups of 4, 2 (flushed), 4, 1 (flushed), 4; the schedule still moves
    once per update, at Keras' index k * N + N - 1."""
    params, grads = make_problem(steps=15)
    sizes = [4, 2, 4, 1, 4]
    calls, i = [], 0
    for size in sizes:
        for j in range(size):
            calls.append((grads[i], {"flush": j == size - 1 and size < 4}))
            i += 1
    schedule = optax.linear_schedule(0.01, 0.0, 40)
    with jax.numpy_dtype_promotion("standard"):
        got, state = run(adamax(schedule, weight_decay=0.01, **ACC4), params, calls)
    reference = ReferenceAdamax(params, schedule, weight_decay=0.01, **ACC4)
    for g, extra in calls:
        reference.step(g, **extra)
    assert_parity(got, reference.params)
    assert int(ao.get_iterations(state)) == len(sizes)
    assert float(ao.get_learning_rate(state)) == pytest.approx(
        float(schedule(len(sizes) * 4 + 3))
    )


ACC4 = dict(gradient_accumulation_steps=4)


def test_flush_of_one_call_by_hand():
    """A group of 2 flushed: plain SGD sees the mean of the two."""
    tx = accumulate_gradients(optax.sgd(1.0), 8)
    state = tx.init(jnp.zeros(2))
    _, state = tx.update(jnp.array([1.0, 2.0]), state)
    updates, state = tx.update(jnp.array([3.0, -4.0]), state, flush=True)
    np.testing.assert_allclose(updates, [-2.0, 1.0])
    assert int(state.micro_step) == 0
    updates, state = tx.update(jnp.array([5.0, 5.0]), state)  # a new group
    np.testing.assert_array_equal(updates, [0.0, 0.0])
    assert int(state.micro_step) == 1


def test_a_group_of_zero_weight_applies_nothing():
    """Its update is dropped: zero updates, the inner state as it was, and the
    next group starts afresh."""
    tx = adamax(0.1, use_ema=True, gradient_accumulation_steps=2)
    params = jnp.ones(2)
    state = tx.init(params)
    _, state = tx.update(jnp.ones(2), state, params, weight=0.0)
    updates, after = tx.update(jnp.ones(2), state, params, weight=0.0)
    np.testing.assert_array_equal(updates, [0.0, 0.0])
    chex.assert_trees_all_equal(
        after["accumulate"].inner_state, state["accumulate"].inner_state
    )
    assert int(after["accumulate"].micro_step) == 0
    assert int(ao.get_iterations(after)) == 0
    _, after = tx.update(jnp.ones(2), after, params, weight=2.0)
    updates, after = tx.update(jnp.ones(2), after, params, weight=0.0)
    np.testing.assert_allclose(updates, [-0.1, -0.1], rtol=1e-6)  # mean is g


def test_weight_is_traced_once():
    tx = adamax(**ACC4)
    params = jnp.ones(3)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, grads, weight, flush):
        return tx.update(grads, state, params, weight=weight, flush=flush)[1]

    state = tx.init(params)
    for w, f in ((1.0, False), (3.0, True), (0.5, False)):
        state = step(state, params, jnp.float32(w), jnp.bool_(f))
    assert int(state["accumulate"].micro_step) == 1


def test_arguments_pass_through_every_wrapper():
    """optax.chain, adamax_optax.chain, inject_hyperparams and nnx.Optimizer
    forward ``weight`` and ``flush``: all give adamax's own result."""
    from flax import nnx

    params, grads = make_problem(steps=6)
    calls = [
        (g, {"weight": float(i + 1), "flush": i == 4}) for i, g in enumerate(grads)
    ]
    want, _ = run(adamax(0.01, **ACC4), params, calls)
    wrapped = {
        "optax.chain": optax.chain(adamax(0.01, **ACC4)),
        "adamax_optax.chain": ao.chain(optax.identity(), adamax(0.01, **ACC4)),
        "inject_hyperparams": optax.inject_hyperparams(
            adamax, static_args=("gradient_accumulation_steps",)
        )(learning_rate=0.01, **ACC4),
    }
    for name, tx in wrapped.items():
        got, _ = run(tx, params, calls)
        chex.assert_trees_all_close(got, want, rtol=1e-6, custom_message=name)

    class Model(nnx.Module):
        def __init__(self):
            for key, value in params.items():
                setattr(self, key.replace("/", "_"), nnx.Param(jnp.asarray(value)))

    model = Model()
    optimizer = nnx.Optimizer(model, adamax(0.01, **ACC4), wrt=nnx.Param)
    for g, extra in calls:

        def loss(model, g=g):  # its gradient is g
            return sum(
                jnp.sum(getattr(model, k.replace("/", "_"))[...] * v)
                for k, v in g.items()
            )

        optimizer.update(model, nnx.grad(loss)(model), **extra)
    for key, value in want.items():
        np.testing.assert_allclose(
            getattr(model, key.replace("/", "_"))[...], value, rtol=1e-6
        )


def test_train_state_pattern_with_weights():
    """Flax's TrainState.apply_gradients forwards no extra arguments: call
    tx.update yourself and replace the fields (the documented pattern)."""
    from flax.training import train_state

    params, grads = make_problem(steps=4)
    params = jax.tree.map(jnp.asarray, params)
    tx = adamax(0.01, gradient_accumulation_steps=2)
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
    for i, g in enumerate(grads):
        updates, opt_state = state.tx.update(
            g, state.opt_state, state.params, weight=i + 1.0
        )
        state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
        )
    want, _ = run(tx, params, [(g, {"weight": i + 1.0}) for i, g in enumerate(grads)])
    chex.assert_trees_all_close(state.params, want, rtol=1e-6)


def test_group_arguments_without_accumulation_are_refused():
    tx = adamax()
    params = jnp.ones(2)
    with pytest.raises(TypeError, match=r"`weight`.*gradient_accumulation_steps=None"):
        tx.update(params, tx.init(params), params, weight=2.0)
    with pytest.raises(TypeError, match="`flush`"):
        jax.jit(tx.update)(params, tx.init(params), params, flush=True)


def test_invalid_group_arguments_are_named():
    tx = adamax(**ACC4)
    params = jnp.ones(2)
    with pytest.raises(ValueError, match="weight=-1"):
        tx.update(params, tx.init(params), params, weight=-1.0)
    with pytest.raises(TypeError, match="flush='yes'"):
        tx.update(params, tx.init(params), params, flush="yes")
    with pytest.raises(ValueError, match=r"`weight` must be a scalar.*\(2,\)"):
        jax.jit(tx.update)(params, tx.init(params), params, weight=jnp.ones(2))
