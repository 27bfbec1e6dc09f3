"""Multi-tensor execution: many small leaves of one shape run stacked.

A model of 20 equal layers (kernels (4, 3), biases (3,)) is grouped into
stacks; every option must still agree with real Keras, which runs each leaf on
its own, and the state's readers must see the per-leaf state. The library
stacks a shape from :data:`_grouping.MIN_SHARED` leaves; these tests lower
that to 2, so that 20 layers stand for a deep model's hundreds.
"""

from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import assert_parity, make_problem, run_ours
from keras_oracle import run_keras
from test_keras_parity import CONFIGS as KERAS_CONFIGS
from test_keras_parity import build

import adamax_optax
from adamax_optax import _grouping, adamax, finalize_variable_values, migrate_state

DEFAULT_MIN_SHARED = _grouping.MIN_SHARED
DEFAULT_MAX_MEMBERS = _grouping.MAX_MEMBERS
LAYERS = 20  # two groups a shape at 16 leaves a group: 16 + 4
SHAPES = {
    **{f"layer_{i:02d}/kernel": (4, 3) for i in range(LAYERS)},
    **{f"layer_{i:02d}/bias": (3,) for i in range(LAYERS)},
    "head/kernel": (3, 2),
}


@pytest.fixture(autouse=True)
def stack_from_two_leaves(monkeypatch):
    monkeypatch.setattr(_grouping, "MIN_SHARED", 2)


def problem(seed: int = 0, steps: int = 30):
    return make_problem(seed, steps, shapes=SHAPES)


# Keras' parity configurations, one of each kind of option, on grouped leaves.
CONFIGS = {
    name: KERAS_CONFIGS[name]
    for name in (
        "defaults",
        "weight_decay_excluded",
        "clipnorm",
        "global_clipnorm",
        "clipvalue",
        "ema_overwrite",
        "clip_decay_ema_scale",
        "everything_but_ema_with_accumulation",
    )
}


def test_small_equal_leaves_are_stacked_in_the_state():
    params, _ = problem()
    state = adamax().init(params)
    m = state["adamax"].m
    assert isinstance(m, _grouping.Grouped)
    # kernels 16 + 4, biases 16 + 4, the head alone.
    assert sorted(np.shape(p) for p in m.parts) == sorted(
        [(16, 4, 3), (4, 4, 3), (16, 3), (4, 3), (3, 2)]
    )
    assert len(jax.tree.leaves(state)) == 2 * 5 + 4  # and four scalars, not 2 * 41


def test_moments_are_read_per_leaf():
    params, grads = problem(steps=1)
    tx = adamax()
    _, grouped = tx.update(grads[0], tx.init(params), params)
    m, u = grouped["adamax"].moments()
    assert jax.tree.structure(m) == jax.tree.structure(params)
    # The first step: m = (1 - beta_1) g, u = |g|.
    for name, g in grads[0].items():
        np.testing.assert_allclose(m[name], 0.1 * g, rtol=1e-6)
        np.testing.assert_allclose(u[name], np.abs(g), rtol=1e-6)


def test_a_group_of_mixed_gradient_dtypes_stacks():
    # A float32 gradient of a float16 parameter keeps its dtype until the
    # Adamax step; its group's other gradient is float16 (strict promotion).
    params = {f"b{i}": jnp.ones(8, jnp.float16) for i in range(2)}
    grads = {"b0": jnp.full(8, 2.0, jnp.float32), "b1": jnp.full(8, 2.0, jnp.float16)}
    tx = adamax(0.1)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert isinstance(state["adamax"].m, _grouping.Grouped)
    for name in params:  # the first step: -lr * g / (|g| + eps)
        assert updates[name].dtype == jnp.float16
        np.testing.assert_allclose(
            np.asarray(updates[name], np.float32), -0.1, rtol=1e-3
        )


def test_large_or_unique_leaves_keep_the_state_per_leaf():
    params = {"big": jnp.zeros((256, 256)), "other": jnp.zeros((256, 256))}
    state = adamax().init(params)
    assert state["adamax"].m.keys() == params.keys()


def test_a_shape_is_stacked_only_when_many_leaves_share_it(monkeypatch):
    monkeypatch.setattr(_grouping, "MIN_SHARED", DEFAULT_MIN_SHARED)
    many, few = DEFAULT_MIN_SHARED, DEFAULT_MIN_SHARED - 1
    params = {
        **{f"many_{i:03d}": jnp.zeros((4,)) for i in range(many)},
        **{f"few_{i:03d}": jnp.zeros((3,)) for i in range(few)},
    }
    m = adamax().init(params)["adamax"].m
    stacked = [p.shape for p, s in zip(m.parts, m.stacked(), strict=True) if s]
    alone = [p.shape for p, s in zip(m.parts, m.stacked(), strict=True) if not s]
    assert sum(shape[0] for shape in stacked) == many
    assert all(shape[1:] == (4,) for shape in stacked)
    assert alone == [(3,)] * few


def test_exclusions_never_share_a_stack():
    params, _ = problem()
    pattern = "layer_0[0-4]/bias"
    tx = adamax(weight_decay=0.1, exclude_from_weight_decay=[pattern])
    layout = tx.init(params)["adamax"].m.layout
    excluded_parts = 0
    for members in layout.members:
        flags = {re.search(pattern, layout.names[i]) is not None for i in members}
        assert len(flags) == 1, [layout.names[i] for i in members]
        excluded_parts += flags == {True}
    assert excluded_parts == 1  # the five excluded biases, stacked together


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_grouped_parity_with_keras(config):
    params, grads = problem(seed=1)
    keras_params, keras_ema = run_keras(params, grads, **build(config))
    ours, state = run_ours(adamax(**build(config)), params, grads)
    assert_parity(ours, keras_params)
    if keras_ema is not None:
        assert_parity(finalize_variable_values(ours, state), keras_ema)


def test_defaults_are_bit_identical_grouped_or_not(monkeypatch):
    """Elementwise math stacked is the same math: no reduction reorders."""
    params, grads = problem(seed=2, steps=10)
    grouped, _ = run_ours(adamax(0.05), params, grads)
    monkeypatch.setattr(_grouping, "MAX_MEMBERS", 1)
    alone, state = run_ours(adamax(0.05), params, grads)
    assert not isinstance(state["adamax"].m, _grouping.Grouped)
    for key in SHAPES:
        np.testing.assert_array_equal(grouped[key], alone[key])


def test_a_per_leaf_state_migrates_to_grouped_and_back(monkeypatch):
    """A state saved before grouping (every leaf alone) continues grouped, and
    a grouped state converts back, both as Keras continuing."""
    config = CONFIGS["everything_but_ema_with_accumulation"]
    params, grads = problem(seed=3)
    keras_params, _ = run_keras(params, grads, **build(config))
    monkeypatch.setattr(_grouping, "MAX_MEMBERS", 1)
    per_leaf_tx = adamax(**build(config))
    half, per_leaf_state = run_ours(per_leaf_tx, params, grads[:10])
    monkeypatch.setattr(_grouping, "MAX_MEMBERS", DEFAULT_MAX_MEMBERS)
    tx = adamax(**build(config))
    # As it is, a per-leaf state still runs (leaf by leaf, as it was saved).
    _, as_saved = tx.update(grads[10], per_leaf_state, half)
    assert as_saved["accumulate"].accumulator.keys() == SHAPES.keys()
    state = migrate_state(tx, per_leaf_state, half)
    assert isinstance(state["accumulate"].accumulator, _grouping.Grouped)
    more, state = run_ours(tx, half, grads[10:20], state=state)
    monkeypatch.setattr(_grouping, "MAX_MEMBERS", 1)
    back = migrate_state(per_leaf_tx, state, more)
    assert back["accumulate"].accumulator.keys() == SHAPES.keys()
    final, _ = run_ours(per_leaf_tx, more, grads[20:], state=back)
    assert_parity(final, keras_params)


def test_grouped_state_exports_to_keras():
    params, grads = problem(seed=4, steps=6)
    keras_params, _ = run_keras(params, grads, learning_rate=0.05)
    keys = sorted(params)
    tx = adamax(0.05)
    values = [jnp.asarray(params[k]) for k in keys]
    ours, state = run_ours(tx, values, [[g[k] for k in keys] for g in grads])
    import keras

    variables = [keras.Variable(np.asarray(v)) for v in ours]
    optimizer = adamax_optax.to_keras_optimizer(tx, state, variables)
    keras_m = [np.asarray(v.value) for v in optimizer._m]
    our_m = jax.tree.leaves(_grouping.ungroup(state["adamax"].m))
    for a, b in zip(keras_m, our_m, strict=True):
        np.testing.assert_array_equal(a, b)
    assert_parity(dict(zip(keys, ours, strict=True)), keras_params)


def test_grouped_state_checkpoints_and_resumes(tmp_path):
    params, grads = problem(seed=5, steps=12)
    tx = adamax(0.05, use_ema=True, gradient_accumulation_steps=2)
    straight, _ = run_ours(tx, params, grads)
    half, state = run_ours(tx, params, grads[:5])
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", {"params": half, "opt": state})
    checkpointer.wait_until_finished()
    target = {"params": half, "opt": tx.init(half)}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = checkpointer.restore(tmp_path / "ckpt", abstract)
    assert jax.tree.structure(restored["opt"]) == jax.tree.structure(state)
    resumed, _ = run_ours(tx, restored["params"], grads[5:], state=restored["opt"])
    for key in SHAPES:
        np.testing.assert_array_equal(resumed[key], straight[key])


def test_a_state_restored_without_a_target_migrates_to_other_groups(tmp_path):
    """orbax restores a grouped view without a target as a dict of its parts,
    keyed by the leaves each holds. Migrated into an optimizer that groups
    the same shapes otherwise (stacks of the same sizes, other members; or
    no exclusions at all), each leaf gets its own moments, as the live
    state's migration gives them."""
    params, grads = problem(seed=6, steps=4)
    even = {k: int(k[6:8]) % 2 == 0 if k.startswith("layer") else False for k in SHAPES}
    first = {k: int(k[6:8]) < 10 if k.startswith("layer") else False for k in SHAPES}
    old_tx = adamax(0.05, weight_decay=0.1, exclude_from_weight_decay=even)
    _, state = run_ours(old_tx, params, grads)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "ckpt")
    for new_tx in (
        adamax(0.05, weight_decay=0.1, exclude_from_weight_decay=first),
        adamax(0.05),
    ):
        expected = migrate_state(new_tx, state, params)
        got = migrate_state(new_tx, restored, params)
        assert jax.tree.structure(got) == jax.tree.structure(expected)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(a, b)
    # An earlier build restored a view as the bare list of its parts, which
    # does not say which leaves each holds: refused, not guessed.
    listed = jax.tree.map(
        lambda x: (
            [x[k] for k in sorted(x)] if isinstance(x, dict) and "part0_m0" in x else x
        ),
        restored,
        is_leaf=lambda x: isinstance(x, dict) and "part0_m0" in x,
    )
    with pytest.raises(ValueError, match="does not record which leaves"):
        migrate_state(adamax(0.05, weight_decay=0.1), listed, params)


def test_part_keys_say_which_leaves_each_part_holds():
    for members in [(0,), (5, 6, 7, 9), (1, 3, 5), tuple(range(16)), (2, 3, 7, 8)]:
        key = _grouping.part_key(4, members)
        assert re.fullmatch(r"part4_m[0-9to_]+", key)
        assert _grouping.members_of_key(key) == (4, members)
    assert _grouping.part_key(2, (5, 6, 7, 9)) == "part2_m5to7_9"
    for other in [
        "w",
        "part1",
        "part1_m",
        "part1_m1to",
        "part1_m5to3",
        "part\u00b2_m1",
    ]:
        assert _grouping.members_of_key(other) is None


def test_states_of_leaves_named_like_parts_or_in_a_list_migrate_exactly(tmp_path):
    """Per-leaf fields are never read as restored views: parameters in a
    list, and parameters whose names parse as part keys."""
    lookalike = {"part1_m0": jnp.ones(3), "part0_m1": jnp.ones(3)}
    tx = adamax(0.1)
    state = tx.init(lookalike)
    grads = {"part0_m1": jnp.full(3, 1.0), "part1_m0": jnp.full(3, 2.0)}
    _, state = tx.update(grads, state, lookalike)
    for old in (state, jax.tree.map(np.asarray, state)):
        same = migrate_state(tx, old, lookalike)
        for key in lookalike:
            np.testing.assert_array_equal(
                _grouping.ungroup(same["adamax"].m)[key],
                _grouping.ungroup(state["adamax"].m)[key],
            )
    listed = [jnp.full(3, float(i)) for i in range(6)]
    even = [i % 2 == 0 for i in range(6)]
    old_tx = adamax(0.05, weight_decay=0.1, exclude_from_weight_decay=even)
    _, state = run_ours(old_tx, listed, [[jnp.full(3, 0.5)] * 6] * 2)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "ckpt")
    new_tx = adamax(0.05, weight_decay=0.1)
    expected = migrate_state(new_tx, state, listed)
    for old in (state, restored):
        got = migrate_state(new_tx, old, listed)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_restored_view_is_read_in_its_own_place(tmp_path):
    """Two `adamax` under `optax.multi_transform`, each grouped over its own
    subset: each restored view is read with its own place's layout."""
    params = {f"l{i}": jnp.full(8, 1.0 + i) for i in range(6)}
    labels = {k: "a" if int(k[1]) < 3 else "b" for k in params}
    old_tx = optax.multi_transform({"a": adamax(0.05), "b": adamax(0.01)}, labels)
    decayed = adamax(0.01, weight_decay=0.1, exclude_from_weight_decay=["l3"])
    new_tx = optax.multi_transform({"a": adamax(0.05), "b": decayed}, labels)
    _, state = run_ours(old_tx, params, [{k: jnp.full(8, 0.5) for k in params}] * 2)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "ckpt")
    expected = migrate_state(new_tx, state, params)
    got = migrate_state(new_tx, restored, params)
    leaves = jax.tree.leaves(expected)
    assert any(np.any(np.asarray(x) != 0) for x in leaves)
    for a, b in zip(jax.tree.leaves(got), leaves, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_state_made_with_other_exclusions_is_refused():
    """A stack is decayed as its label says; a state whose stacks were
    labelled by other exclusions would decay the wrong leaves."""
    params, grads = problem(steps=1)
    state = adamax(0.1, weight_decay=0.5).init(params)
    tx = adamax(0.1, weight_decay=0.5, exclude_from_weight_decay=["bias"])
    with pytest.raises(
        ValueError,
        match="leaf 'layer_00/bias' has exclude_from_weight_decay in this "
        "optimizer and no exclusion in the optimizer state",
    ):
        jax.jit(tx.update)(grads[0], state, params)
    migrated = migrate_state(tx, state, params)
    updates, _ = jax.jit(tx.update)(grads[0], migrated, params)
    expected, _ = jax.jit(tx.update)(grads[0], tx.init(params), params)
    for key in SHAPES:
        np.testing.assert_array_equal(updates[key], expected[key])


def test_gradients_named_otherwise_are_refused():
    params, grads = problem(steps=1)
    tx = adamax()
    state = tx.init(params)
    renamed = {k.replace("layer_", "block_"): v for k, v in grads[0].items()}
    with pytest.raises(ValueError, match="the gradients have no leaf 'layer_00/bias'"):
        jax.jit(tx.update)(renamed, state)
    ordered = collections.OrderedDict(sorted(grads[0].items(), reverse=True))
    with pytest.raises(ValueError, match="leaves in another order: leaf 0 is"):
        jax.jit(tx.update)(ordered, state)


def test_a_gradient_of_another_shape_is_named():
    params, grads = problem(steps=1)
    tx = adamax()
    state = tx.init(params)
    wrong = dict(grads[0], **{"layer_07/bias": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match=r"'layer_07/bias' has shape \(4,\)"):
        jax.jit(tx.update)(wrong, state, params)
    missing = {k: v for k, v in grads[0].items() if k != "layer_03/kernel"}
    with pytest.raises(ValueError, match="no leaf 'layer_03/kernel'"):
        tx.update(missing, state, params)


@pytest.mark.parametrize("grouped", [True, False])
def test_a_parameter_of_another_dtype_is_named(grouped):
    # Stacked with others, or alone (a leaf too large to stack).
    shapes = {"a": (8,), "b": (8,)} if grouped else {"a": (8, 2**14)}
    params = {k: jnp.ones(s) for k, s in shapes.items()}
    tx = adamax(0.1)
    state = tx.init(params)
    changed = dict(params, a=params["a"].astype(jnp.bfloat16))
    with pytest.raises(
        ValueError, match=r"parameter 'a' is bfloat16, float32 when the optimizer"
    ):
        jax.jit(tx.update)(params, state, changed)
    # Gradients of another dtype than their parameters are fine (cast to them).
    low = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    updates, _ = jax.jit(tx.update)(low, state, params)
    assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))


def test_zero1_shards_the_stacks_evenly():
    mesh = jax.make_mesh((1,), ("data",))
    params, _ = problem()
    tx = adamax(use_ema=True)
    abstract = jax.eval_shape(tx.init, params)
    shardings = adamax_optax.state_shardings(abstract, mesh, "data")
    m = shardings["adamax"].m
    assert isinstance(m, _grouping.Grouped)
    stacks = [
        s.spec
        for s, p in zip(m.parts, abstract["adamax"].m.parts, strict=True)
        if p.shape[0] == 16
    ]
    assert stacks and all(spec[0] == "data" for spec in stacks)
    with_params = adamax_optax.state_shardings(
        abstract,
        mesh,
        "data",
        optimizer=tx,
        param_shardings=jax.tree.map(
            lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
            params,
        ),
    )
    assert jax.tree.structure(with_params) == jax.tree.structure(shardings)
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    updates, _ = jax.jit(tx.update)(params, state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_clipnorm_clips_each_stacked_leaf_alone():
    """A closed form: each leaf of norm 5 clipped to norm 1 by itself."""
    grads = {f"w{i:02d}": jnp.full((25,), 1.0 if i % 2 else 0.1) for i in range(18)}
    tx = adamax_optax.keras_clipnorm(1.0)
    view = _grouping.group(
        grads, _grouping.layout_of(grads, jax.tree.map(lambda _: (), grads))
    )
    assert isinstance(view, _grouping.Grouped)
    clipped = tx.update(view, tx.init(view))[0].ungroup()
    for i in range(18):
        expected = 0.2 if i % 2 else 0.1
        np.testing.assert_allclose(clipped[f"w{i:02d}"], expected, rtol=1e-6)
