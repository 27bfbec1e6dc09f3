"""``migrate_state``: a state carried to another configuration, by role.

The 0.1 layouts are written out here from the 0.1.0 sources (its accumulation
and dynamic loss scale states had no weight sum and no skip counter).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_problem, run_ours

import adamax_optax as ao
from adamax_optax import adamax, migrate_state


class AccumulateGradientsState01(NamedTuple):
    mini_step: Any
    accumulator: Any
    inner_state: Any


class DynamicLossScaleState01(NamedTuple):
    loss_scale: Any
    good_steps: Any
    inner_state: Any


def as_0_1(state):
    """``state`` in the 0.1 layout: the fields added since dropped."""

    def convert(node):
        if isinstance(node, ao.AccumulateGradientsState):
            return AccumulateGradientsState01(
                node.mini_step, node.accumulator, convert(node.inner_state)
            )
        if isinstance(node, ao.DynamicLossScaleState):
            return DynamicLossScaleState01(
                node.loss_scale, node.good_steps, convert(node.inner_state)
            )
        if isinstance(node, dict):
            return type(node)((k, convert(v)) for k, v in node.items())
        return node

    return convert(state)


def params_and_grads(steps=12):
    params, grads = make_problem(steps=steps)
    return {k: jnp.asarray(v) for k, v in params.items()}, grads


def continue_run(tx, params, state, grads):
    for g in grads:
        updates, state = jax.jit(tx.update)(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


OPTIONS = dict(
    gradient_accumulation_steps=4,
    use_ema=True,
    weight_decay=0.01,
    dynamic_loss_scale={"initial_scale": 1.0},
)


def test_a_0_1_state_converts_and_training_goes_on_bit_for_bit():
    tx = adamax(**OPTIONS)
    params, grads = params_and_grads()
    mid_params, state = run_ours(tx, params, grads[:6])  # mid-group: 2 of 4
    old = as_0_1(state)
    converted = migrate_state(tx, old, mid_params)
    chex.assert_trees_all_equal(converted, state)  # weight sum = 2 micro-steps
    chex.assert_trees_all_equal(
        continue_run(tx, mid_params, converted, grads[6:]),
        continue_run(tx, mid_params, state, grads[6:]),
    )


def test_a_state_restored_by_orbax_without_a_target_converts(tmp_path):
    import orbax.checkpoint as ocp

    tx = adamax(**OPTIONS)
    params, grads = params_and_grads()
    mid_params, state = run_ours(tx, params, grads[:5])
    checkpointer = ocp.StandardCheckpointer()
    for name, saved in (("now", state), ("0.1", as_0_1(state))):
        path = os.fspath(tmp_path / name)
        checkpointer.save(path, saved)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(path)  # plain dicts
        chex.assert_trees_all_equal(migrate_state(tx, restored, mid_params), state)


def test_adding_an_option_keeps_what_is_shared():
    params, grads = params_and_grads()
    before = adamax(0.01)
    mid_params, state = run_ours(before, params, grads[:5])
    after = adamax(0.01, use_ema=True, gradient_accumulation_steps=4)
    migrated = migrate_state(after, state, mid_params)
    inner = migrated["accumulate"].inner_state
    chex.assert_trees_all_equal(inner["adamax"], state["adamax"])
    chex.assert_trees_all_equal(inner["learning_rate"], state["learning_rate"])
    fresh = after.init(mid_params)["accumulate"]
    chex.assert_trees_all_equal(inner["ema"], fresh.inner_state["ema"])
    assert int(migrated["accumulate"].mini_step) == 0
    new_params, new_state = continue_run(after, mid_params, migrated, grads[5:9])
    assert int(ao.get_iterations(new_state)) == 6
    chex.assert_tree_all_finite(new_params)


def test_dropping_an_option_warns_naming_it():
    params, grads = params_and_grads()
    tx = adamax(use_ema=True, dynamic_loss_scale=True)
    mid_params, state = run_ours(tx, params, grads[:3])
    with pytest.warns(UserWarning, match="dropped: dynamic_loss_scale, ema"):
        migrated = migrate_state(adamax(), state, mid_params)
    chex.assert_trees_all_equal(migrated["adamax"], state.inner_state["adamax"])


def test_a_group_in_progress_ends_at_the_new_size():
    """6 calls into a group of 8, continued with N=4: the next call ends it,
    and the update is the mean of its 7 calls."""
    tx = ao.accumulate_gradients(optax.sgd(1.0), 8)
    state = tx.init(jnp.zeros(1))
    for g in range(6):
        _, state = tx.update(jnp.array([float(g)]), state)
    smaller = ao.accumulate_gradients(optax.sgd(1.0), 4)
    state = migrate_state(smaller, state, jnp.zeros(1))
    updates, state = smaller.update(jnp.array([6.0]), state)
    np.testing.assert_allclose(updates, [-3.0])  # -mean(0 .. 6)
    assert int(state.mini_step) == 0


def test_a_new_state_dtype_casts():
    params, grads = params_and_grads()
    tx = adamax(gradient_accumulation_steps=2)
    mid_params, state = run_ours(tx, params, grads[:3])
    low = adamax(gradient_accumulation_steps=2, state_dtype=jnp.bfloat16)
    migrated = migrate_state(low, state, mid_params)
    want = jax.tree.map(
        lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 and x.ndim else x,
        state["accumulate"].inner_state["adamax"],
    )
    chex.assert_trees_all_equal(migrated["accumulate"].inner_state["adamax"], want)


def test_leaves_unlike_the_parameters_are_refused():
    tx = adamax()
    state = tx.init({"w": jnp.zeros(3)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"adamax\.m.*shape \(3,\).*\(4,\)"):
            migrate_state(tx, state, {"w": jnp.zeros(4)})
