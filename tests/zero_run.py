"""Run in a subprocess with 8 host devices (see test_sharding.py): ZeRO stage 1.

The state is split over the data axis by ``state_shardings`` while the
parameters are replicated (data parallelism) or sharded on another axis (FSDP
plus ZeRO). Checked for every option, with Auto and Explicit axes: each device
holds 1/k of the state, the results equal the unsharded run within float32
rounding, the state keeps its sharding through the step, and the accessors and
``finalize_variable_values`` read it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from sharded_run import (
    EXPLICIT_CONFIGS,
    STACK_FROM,
    assert_trees_close,
    parts_by_leaf,
)

from adamax_optax import (
    _grouping,
    adamax,
    finalize_variable_values,
    get_iterations,
    get_learning_rate,
    get_loss_scale,
    migrate_state,
    state_shardings,
)

# "bias" and "gain" share a shape: the optimizer keeps their state stacked
# (from `STACK_FROM` leaves a shape, set when this script runs, as in
# sharded_run.py).
SHAPES = {"kernel": (64, 32), "bias": (32,), "gain": (32,), "odd": (7,)}
OPTIONS = EXPLICIT_CONFIGS["every option"]


# 8-bit moments: the blocks of 256 along the last axis stay whole on a shard.
QUANTIZED_SHAPES = {"kernel": (64, 1024), "wide": (8, 4096), "bias": (32,)}


def problem(shapes=SHAPES):
    rng = np.random.default_rng(3)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [
        {k: (5 * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}
        for _ in range(6)
    ]
    grads[3]["bias"][0] = np.inf  # one skipped step for the dynamic loss scale
    return params, grads


def step_fn(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def unsharded(tx, params, grads):
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(p)
    step = jax.jit(step_fn(tx))
    for g in grads:
        p, state = step(p, state, g)
    return p, finalize_variable_values(p, state)


def assert_quantized_close(ours, reference, label) -> None:
    """8-bit codes are a discontinuous function of floats that another
    compilation rounds in another last bit: a code may flip. Most elements
    agree exactly; none is off by more than a code's worth of a few steps."""
    for got, ref in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        got, ref = np.asarray(got), np.asarray(ref)
        assert np.mean(np.abs(got - ref) > 1e-6 * (1 + np.abs(ref))) < 0.01, label
        assert np.max(np.abs(got - ref)) < 0.02, label


def zero(tx, params, grads, mesh, param_specs, expected, close=assert_trees_close):
    param_sh = {k: NamedSharding(mesh, param_specs[k]) for k in params}
    p = {k: jax.device_put(v, param_sh[k]) for k, v in params.items()}
    # Under Auto axes jax.eval_shape drops the parameters' shardings: name them.
    shardings = state_shardings(
        jax.eval_shape(tx.init, p),
        mesh,
        "data",
        optimizer=tx,
        param_shardings=param_sh,
    )
    if AxisType.Explicit in mesh.axis_types:  # there the structs carry them
        alone = state_shardings(jax.eval_shape(tx.init, p), mesh, "data")
        same = jax.tree.map(lambda a, b: a.spec == b.spec, alone, shardings)
        assert all(jax.tree.leaves(same))
    state = jax.jit(tx.init, out_shardings=shardings)(p)

    # Each device holds 1/k of every splittable leaf: the state per device is
    # about 1/8 of the whole (scalars and the 7-element leaf are replicated).
    total = sum(x.size for x in jax.tree.leaves(state))
    local = sum(x.addressable_shards[0].data.size for x in jax.tree.leaves(state))
    assert local <= total / 8 + 200, (local, total)

    step = jax.jit(
        step_fn(tx),
        in_shardings=(param_sh, shardings, param_sh),
        out_shardings=(param_sh, shardings),
        donate_argnums=(0, 1),
    )
    for g in grads:
        p, state = step(
            p, state, {k: jax.device_put(v, param_sh[k]) for k, v in g.items()}
        )
    for leaf, sharding in zip(
        jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True
    ):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), leaf.sharding
    assert int(get_iterations(state)) == 2  # 6 calls, N = 2, one skipped group
    assert float(get_learning_rate(state)) > 0 and float(get_loss_scale(state)) > 0
    final = finalize_variable_values(p, state)
    close((p, final), expected, mesh.axis_names)
    return shardings


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    params, grads = problem()
    tx = adamax(0.05, **OPTIONS)
    expected = unsharded(tx, params, grads)
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        # Data parallelism: parameters replicated, the state split 8 ways.
        mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
        with jax.set_mesh(mesh):
            specs = {k: P() for k in SHAPES}
            shardings = zero(tx, params, grads, mesh, specs, expected)
        m = parts_by_leaf(shardings.inner_state["accumulate"].inner_state["adamax"].m)
        assert m["kernel"].spec == P("data", None)
        assert m["bias+gain"].spec == P(None, "data")  # each member split 8 ways
        assert all(entry is None for entry in m["odd"].spec)  # 7 does not split
        # FSDP plus ZeRO: the kernel sharded on "model", its state on both.
        mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)
        with jax.set_mesh(mesh):
            specs = {"kernel": P(None, "model"), "bias": P(), "gain": P(), "odd": P()}
            shardings = zero(tx, params, grads, mesh, specs, expected)
        m = parts_by_leaf(shardings.inner_state["accumulate"].inner_state["adamax"].m)
        assert m["kernel"].spec == P("data", "model"), m["kernel"].spec
        assert m["bias+gain"].spec == P(None, "data"), m["bias+gain"].spec
    quantized_zero()
    quantized_tensor_parallel()
    quantized_blocks_across_shards()
    migrated_to_another_tensor_parallel_degree()
    stochastic_rounding_key_whole()
    print("ZERO OK")


def stochastic_rounding_key_whole() -> None:
    """The rounding key (``uint32[2]``) is never split, even over a data axis
    of 2, which divides it: a key's data split across devices is refused by
    ``jax.random`` under Explicit axes."""
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.normal(size=(16, 64)), jnp.bfloat16)}
    grads = [{"w": jnp.asarray(rng.normal(size=(16, 64)), jnp.float32)}] * 3
    tx = adamax(0.05, stochastic_rounding=True, rounding_seed=3)
    expected = unsharded(tx, params, grads)
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
        param_shardings = {"w": NamedSharding(mesh, P(None, "model"))}
        with jax.set_mesh(mesh):
            abstract = jax.eval_shape(tx.init, params)
            for shardings in (
                state_shardings(abstract, mesh, "data"),
                state_shardings(
                    abstract,
                    mesh,
                    "data",
                    optimizer=tx,
                    param_shardings=param_shardings,
                ),
            ):
                assert shardings["stochastic_rounding"].key.spec == P()
                state = jax.jit(tx.init, out_shardings=shardings)(params)
                step = jax.jit(step_fn(tx), out_shardings=(None, shardings))
                p = params
                for g in grads:
                    p, state = step(p, state, g)
                np.testing.assert_array_equal(
                    np.asarray(p["w"], np.float32),
                    np.asarray(expected[0]["w"], np.float32),
                )


def quantized_zero() -> None:
    params, grads = problem(QUANTIZED_SHAPES)
    tx = adamax(0.05, quantized_state=True, **OPTIONS)
    expected = unsharded(tx, params, grads)
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
        with jax.set_mesh(mesh):
            specs = {k: P() for k in QUANTIZED_SHAPES}
            shardings = zero(
                tx, params, grads, mesh, specs, expected, assert_quantized_close
            )
        m = shardings.inner_state["accumulate"].inner_state["adamax"].m
        for name, blocks in (("kernel", (64, 4)), ("wide", (8, 16))):
            codes, scale = m[name].codes.spec, m[name].scale.spec
            assert codes == scale, (name, codes, scale)  # split alike
            # Each shard holds whole blocks of 256 (wide: 2 of its 16 each).
            split = [i for i, entry in enumerate(codes) if entry == "data"]
            assert split and blocks[split[0]] % 8 == 0, (name, codes)


def quantized_tensor_parallel() -> None:
    """A parameter whose last axis is split 4 ways on "model" (64 of its 256
    columns a shard, fewer than a block of 256). Under Explicit axes `init`
    sees the split and takes blocks of 64, which no shard cuts; under Auto
    axes it cannot, the blocks stay 256 long and their scales whole along the
    split. Both run as the unsharded optimizer with those blocks does."""
    shapes = {"narrow": (64, 256), "bias": (32,)}
    params, grads = problem(shapes)
    tx = adamax(0.05, quantized_state=True, **OPTIONS)
    specs = {"narrow": P(None, "model"), "bias": P()}
    for axis_type, block, scale_spec in (
        (AxisType.Auto, 256, P("data", None)),
        (AxisType.Explicit, 64, P("data", "model")),
    ):
        reference = adamax(
            0.05, quantized_state=True, quantized_block_size=block, **OPTIONS
        )
        expected = unsharded(reference, params, grads)
        mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
        with jax.set_mesh(mesh):
            shardings = zero(
                tx, params, grads, mesh, specs, expected, assert_quantized_close
            )
        m = shardings.inner_state["accumulate"].inner_state["adamax"].m["narrow"]
        assert m.codes.spec == P("data", "model"), m.codes.spec
        assert m.scale.spec == scale_spec, (axis_type, m.scale.spec)


def quantized_blocks_across_shards() -> None:
    """Under Auto axes a last axis of 9 blocks of 256 split 2 ways on "model"
    has blocks that straddle its shards already: the data axis goes on the
    rows, which it splits into whole blocks, not on that axis (where 9 // 2
    blocks a shard looked divisible by 4)."""
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    tx = adamax(0.05, quantized_state=True)
    param_shardings = {"w": NamedSharding(mesh, P(None, "model"))}
    params = {
        "w": jax.ShapeDtypeStruct((64, 2304), np.float32, sharding=param_shardings["w"])
    }
    state = jax.eval_shape(tx.init, params)
    assert state["adamax"].m["w"].block == 256
    m = state_shardings(
        state, mesh, "data", optimizer=tx, param_shardings=param_shardings
    )["adamax"].m["w"]
    assert m.codes.spec == P("data", "model"), m.codes.spec
    assert m.scale.spec[0] == "data" and "data" not in str(m.scale.spec[1:]), m.scale


def migrated_to_another_tensor_parallel_degree() -> None:
    """A state made with the last axis split 2 ways (blocks of 192 under
    Explicit axes), migrated for 8 ways, from its own mesh (as orbax restores
    it) and from the host: the new state is placed as `init` places it on the
    new mesh (blocks of 144), where the next update runs."""
    w = np.random.default_rng(0).normal(size=(64, 2304)).astype(np.float32)
    tx = adamax(0.05, quantized_state=True)
    old_mesh, new_mesh = (
        jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
        for shape in ((4, 2), (1, 8))
    )
    with jax.set_mesh(old_mesh):
        params = {"w": jax.device_put(w, NamedSharding(old_mesh, P(None, "model")))}
        _, old = jax.jit(tx.update)(params, tx.init(params), params)
    assert old["adamax"].m["w"].block == 192
    with jax.set_mesh(new_mesh):
        params = {"w": jax.device_put(w, NamedSharding(new_mesh, P(None, "model")))}
        fresh = tx.init(params)
        for saved in (old, jax.tree.map(np.asarray, old)):
            state = migrate_state(tx, saved, params)
            assert state["adamax"].m["w"].block == 144
            placed = jax.tree.map(lambda a, b: a.sharding == b.sharding, state, fresh)
            assert all(jax.tree.leaves(placed)), placed
            jax.jit(tx.update)(params, state, params)
    # On the parameters' own mesh, outside `set_mesh`, into another optimizer:
    # what `init` leaves uncommitted (the counters) stays so.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    params = {"w": jax.device_put(w[:16, :64], NamedSharding(mesh, P(None, "data")))}
    _, state = jax.jit(tx.update)(params, tx.init(params), params)
    bigger = adamax(0.05, quantized_state=True, use_ema=True)
    jax.jit(bigger.update)(params, migrate_state(bigger, state, params), params)


if __name__ == "__main__":
    _grouping.MIN_SHARED = STACK_FROM
    main()
