"""``migrate_state``: a state carried to another configuration, by role.

The 0.1 layouts are written out here from the 0.1.0 sources (its accumulation,
dynamic loss scale and learning-rate states had no weight sum, no skip counter
and no schedule step).
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


class ScaleByKerasLearningRateState01(NamedTuple):
    count: Any
    learning_rate: Any


class DynamicLossScaleState01(NamedTuple):
    loss_scale: Any
    good_steps: Any
    inner_state: Any


def as_0_1(state):
    """``state`` in the 0.1 layout: the fields added since dropped."""

    def convert(node):
        if isinstance(node, ao.AccumulateGradientsState):
            return AccumulateGradientsState01(
                node.micro_step, node.accumulator, convert(node.inner_state)
            )
        if isinstance(node, ao.DynamicLossScaleState):
            return DynamicLossScaleState01(
                node.loss_scale, node.good_steps, convert(node.inner_state)
            )
        if isinstance(node, ao.ScaleByKerasLearningRateState):
            return ScaleByKerasLearningRateState01(node.count, node.learning_rate)
        if isinstance(node, dict):
            return type(node)((k, convert(v)) for k, v in node.items())
        return node

    return convert(state)


class AccumulateGradientsState02(NamedTuple):
    mini_step: Any
    weight_sum: Any
    accumulator: Any
    inner_state: Any


class DynamicLossScaleState02(NamedTuple):
    loss_scale: Any
    good_steps: Any
    skipped_steps: Any
    inner_state: Any


class SkipNonfiniteState02(NamedTuple):
    skipped_steps: Any
    inner_state: Any


def as_0_2(state):
    """``state`` in the 0.2.0 layout: ``mini_step`` for ``micro_step``, no
    ``last_skipped``."""

    def convert(node):
        if isinstance(node, ao.AccumulateGradientsState):
            return AccumulateGradientsState02(
                node.micro_step,
                node.weight_sum,
                node.accumulator,
                convert(node.inner_state),
            )
        if isinstance(node, ao.DynamicLossScaleState):
            return DynamicLossScaleState02(
                node.loss_scale,
                node.good_steps,
                node.skipped_steps,
                convert(node.inner_state),
            )
        if isinstance(node, ao.SkipNonfiniteState):
            return SkipNonfiniteState02(node.skipped_steps, convert(node.inner_state))
        if isinstance(node, dict):
            return type(node)((k, convert(v)) for k, v in node.items())
        return node

    return convert(state)


def params_and_grads(steps=12):
    params, grads = make_problem(steps=steps)
    return {k: jnp.asarray(v) for k, v in params.items()}, grads


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
        run_ours(tx, mid_params, grads[6:], state=converted),
        run_ours(tx, mid_params, grads[6:], state=state),
    )


def test_a_0_2_state_converts_and_training_goes_on_bit_for_bit():
    tx = adamax(**OPTIONS, skip_nonfinite=True)
    params, grads = params_and_grads()
    mid_params, state = run_ours(tx, params, grads[:6])
    converted = migrate_state(tx, as_0_2(state), mid_params)
    chex.assert_trees_all_equal(converted, state)
    chex.assert_trees_all_equal(
        run_ours(tx, mid_params, grads[6:], state=converted),
        run_ours(tx, mid_params, grads[6:], state=state),
    )


def test_a_state_restored_by_orbax_without_a_target_converts(tmp_path):
    import orbax.checkpoint as ocp

    tx = adamax(**OPTIONS)
    params, grads = params_and_grads()
    mid_params, state = run_ours(tx, params, grads[:5])
    checkpointer = ocp.StandardCheckpointer()
    for name, saved in (
        ("now", state),
        ("0.1", as_0_1(state)),
        ("0.2", as_0_2(state)),
    ):
        path = os.fspath(tmp_path / name)
        checkpointer.save(path, saved)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(path)  # plain dicts
        chex.assert_trees_all_equal(migrate_state(tx, restored, mid_params), state)


@pytest.mark.parametrize("kind", [list, dict])
def test_an_ema_exclusion_restored_without_a_target_converts(tmp_path, kind):
    # orbax restores an excluded EMA leaf (a MaskedNode) as None.
    import orbax.checkpoint as ocp

    params = (
        kind(a=jnp.ones(3), b=jnp.ones(7))
        if kind is dict
        else [
            jnp.ones(3),
            jnp.ones(7),
        ]
    )
    excluded = lambda p: jax.tree.map(lambda x: x.shape == (7,), p)  # noqa: E731
    tx = adamax(0.01, use_ema=True, exclude_from_ema=excluded)
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    checkpointer = ocp.StandardCheckpointer()
    path = os.fspath(tmp_path / "state")
    checkpointer.save(path, state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(path)
    assert None in jax.tree.leaves(restored["ema"]["ema"], is_leaf=lambda x: x is None)
    chex.assert_trees_all_equal(migrate_state(tx, restored, params), state)


@pytest.mark.parametrize("options", [{}, dict(use_ema=True), dict(weight_decay=0.1)])
def test_parameters_with_none_leaves_migrate(options):
    params = {"w": jnp.ones(3), "frozen": None}
    tx = adamax(0.1, **options)
    _, state = tx.update(params, tx.init(params), params)
    chex.assert_trees_all_equal(migrate_state(tx, state, params), state)
    bigger = adamax(0.1, use_ema=True, gradient_accumulation_steps=2)
    migrated = migrate_state(bigger, state, params)
    assert int(ao.get_iterations(migrated)) == 1


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
    assert int(migrated["accumulate"].micro_step) == 0
    new_params, new_state = run_ours(after, mid_params, grads[5:9], state=migrated)
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
    assert int(state.micro_step) == 0


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


def states_of(tree, kind):
    """Every ``kind`` node in ``tree``, outermost first."""
    found = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kind))
    return [x for x in found if isinstance(x, kind)]


ROLE_TYPES = (
    ao.ScaleByKerasAdamaxState,
    ao.ScaleByKerasLearningRateState,
    ao.ParameterEMAState,
    ao.AccumulateGradientsState,
    ao.DynamicLossScaleState,
    ao.SkipNonfiniteState,
)
SCHEDULE = optax.linear_schedule(0.01, 0.001, 200)
DEFAULTS: dict = {}
CHANGES = {
    "+EMA": dict(use_ema=True, ema_overwrite_frequency=5),
    "+accumulation": dict(gradient_accumulation_steps=4),
    "+dynamic loss scale": dict(dynamic_loss_scale={"initial_scale": 1.0}),
    "+clipping": dict(global_clipnorm=1.0),
    "state_dtype bfloat16": dict(state_dtype=jnp.bfloat16),
    "+skip_nonfinite": dict(skip_nonfinite=True),
    "+EMA without the bias": dict(use_ema=True, exclude_from_ema=["bias"]),
}
PAIRS = [(DEFAULTS, change, f"defaults -> {n}") for n, change in CHANGES.items()]
PAIRS += [(change, DEFAULTS, f"{n} -> defaults") for n, change in CHANGES.items()]
PAIRS += [
    (
        dict(gradient_accumulation_steps=4),
        dict(gradient_accumulation_steps=8),
        "N 4->8",
    ),
    (CHANGES["+EMA"], CHANGES["+accumulation"], "+EMA -> +accumulation"),
    (CHANGES["+EMA"], CHANGES["+EMA without the bias"], "+EMA -> EMA without bias"),
]


def own_fields(state):
    """A state's fields but what it wraps."""
    return {k: v for k, v in state._asdict().items() if k != "inner_state"}


def shared_fields_equal(old, new, kind):
    """Each field of ``kind`` both states hold: equal bit for bit, cast to the
    new dtype; an excluded EMA leaf has nothing to compare."""
    (o,), (n,) = states_of(old, kind), states_of(new, kind)
    for name in kind._fields:
        if name == "inner_state" or name not in o._fields:
            continue
        masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
        old_leaves = jax.tree.leaves(getattr(o, name), is_leaf=masked)
        new_leaves = jax.tree.leaves(getattr(n, name), is_leaf=masked)
        assert len(old_leaves) == len(new_leaves), name
        for a, b in zip(old_leaves, new_leaves, strict=True):
            if masked(a) or masked(b):
                continue
            np.testing.assert_array_equal(
                np.asarray(jnp.asarray(a).astype(b.dtype)), np.asarray(b), name
            )


@pytest.mark.parametrize(("first", "second", "name"), PAIRS, ids=[p[2] for p in PAIRS])
def test_train_migrate_and_go_on(first, second, name):
    params, grads = params_and_grads(steps=20)
    with jax.numpy_dtype_promotion("standard"):
        before = adamax(SCHEDULE, **first)
        mid_params, state = run_ours(before, params, grads[:6])
        after = adamax(SCHEDULE, **second)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the dropped parts: tested below
            migrated = migrate_state(after, state, mid_params)
        fresh = after.init(mid_params)
        assert jax.tree.structure(migrated) == jax.tree.structure(fresh)
        for kind in ROLE_TYPES:
            if states_of(migrated, kind) and states_of(state, kind):
                shared_fields_equal(state, migrated, kind)
            elif states_of(migrated, kind):  # new: as a fresh `init`
                chex.assert_trees_all_equal(
                    *(own_fields(states_of(s, kind)[0]) for s in (migrated, fresh))
                )
        # The schedule continues: the next update uses the rate it would have.
        assert float(ao.get_learning_rate(migrated)) == float(
            ao.get_learning_rate(state)
        )
        assert int(ao.get_iterations(migrated)) == int(ao.get_iterations(state))
        new_params, new_state = run_ours(after, mid_params, grads[6:], state=migrated)
    chex.assert_tree_all_finite(new_params)
    assert int(ao.get_iterations(new_state)) > int(ao.get_iterations(state))


def test_the_schedule_goes_on_at_the_new_pace():
    """N 4 -> 8 after 3 updates: the next update uses the step the old run had
    reached (15), then each update moves it by 8."""
    schedule = optax.linear_schedule(1.0, 0.0, 100)
    params = jnp.zeros(2)
    with jax.numpy_dtype_promotion("standard"):
        tx4 = adamax(schedule, gradient_accumulation_steps=4)
        state = tx4.init(params)
        for _ in range(12):
            _, state = jax.jit(tx4.update)(jnp.ones(2), state, params)
        tx8 = adamax(schedule, gradient_accumulation_steps=8)
        state = migrate_state(tx8, state, params)
        assert float(ao.get_learning_rate(state)) == pytest.approx(schedule(15))
        for _ in range(8):
            _, state = jax.jit(tx8.update)(jnp.ones(2), state, params)
    assert float(ao.get_learning_rate(state)) == pytest.approx(float(schedule(23)))


def test_a_state_of_another_configuration_is_refused_by_name():
    params = {"w": jnp.ones(3)}
    state = adamax().init(params)
    tx = adamax(weight_decay=0.01, use_ema=True)
    for update in (tx.update, jax.jit(tx.update)):
        with pytest.raises(
            ValueError, match=r"lacks \['ema', 'weight_decay'\].*migrate_state"
        ):
            update(params, state, params)
    with pytest.raises(ValueError, match=r"holds \['accumulate'\].*migrate_state"):
        adamax().update(params, adamax(gradient_accumulation_steps=2).init(params))


def test_abstract_states_migrate_to_abstract_states():
    """An orbax restore target: old structure in, new structure out, nothing
    allocated; the result is what eval_shape of the new init gives."""
    params = {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32)}
    old = jax.eval_shape(adamax(gradient_accumulation_steps=2).init, params)
    new_tx = adamax(use_ema=True, state_dtype=jnp.bfloat16)
    with pytest.warns(UserWarning, match="dropped: accumulate"):
        migrated = migrate_state(new_tx, old, params)
    want = jax.eval_shape(new_tx.init, params)
    assert jax.tree.structure(migrated) == jax.tree.structure(want)
    leaves = zip(jax.tree.leaves(migrated), jax.tree.leaves(want), strict=True)
    for got, expected in leaves:
        assert isinstance(got, jax.ShapeDtypeStruct)
        assert (got.shape, got.dtype) == (expected.shape, expected.dtype)


def test_a_new_learning_rate_is_recorded_at_once():
    params = {"w": jnp.ones(3)}
    tx = adamax(0.01)
    _, state = tx.update(params, tx.init(params), params)
    faster = migrate_state(adamax(0.05), state, params)
    assert float(ao.get_learning_rate(faster)) == pytest.approx(0.05)
    assert int(ao.get_iterations(faster)) == 1


def test_leaves_named_otherwise_are_matched_by_position_with_a_warning():
    tx = adamax()
    _, state = tx.update([jnp.ones(3)], tx.init([jnp.zeros(3)]), [jnp.zeros(3)])
    with pytest.warns(UserWarning, match="matched by position"):
        migrated = migrate_state(tx, state, {"w": jnp.zeros(3)})
    np.testing.assert_array_equal(migrated["adamax"].u["w"], state["adamax"].u[0])
