"""Run in a subprocess with 8 host devices (see test_sharding.py).

Trains the same problem on one device and on a 4x2 mesh with sharded parameters,
and checks: the state takes the parameters' sharding, global clipping uses the
true global norm, and the results agree within float32 rounding. Then every
option again, eagerly and under ``jit``, with ``Auto`` and ``Explicit`` mesh axes
and the state sharded like the parameters or unlike them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from adamax_optax import _grouping, adamax, finalize_variable_values
from adamax_optax._grouping import Grouped

# The library stacks a shape shared by `_grouping.MIN_SHARED` leaves or more;
# from 2 in this script's run, so that "bias" and "gain" stand for a deep
# model's hundreds. Set when it runs, not at import: pytest imports it to
# collect doctests, and a module-level setting would reach every later test.
STACK_FROM = 2


def assert_trees_close(ours, reference, label) -> None:
    """Every leaf within the parity tolerance ``1e-6 * (1 + max|ref|)`` (the
    tests' ``conftest.tolerance``; these scripts run without the test config)."""
    for got, ref in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        got, ref = np.asarray(got), np.asarray(ref)
        error = np.max(np.abs(got - ref))
        assert error <= 1e-6 * (1 + np.max(np.abs(ref))), (label, error)


def parts_by_leaf(view: Grouped) -> dict[str, Any]:
    """A grouped view's parts, each named by its leaves (``"bias+gain"``)."""
    assert isinstance(view, Grouped), view
    names = view.layout.names
    return {
        "+".join(names[i] for i in indices): part
        for indices, part in zip(view.layout.members, view.parts, strict=True)
    }


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    # "bias" and "gain" share a shape and a sharding: their state is stacked.
    specs = {
        "kernel": P("data", "model"),
        "bias": P("model"),
        "gain": P("model"),
        "scale": P(),
    }
    rng = np.random.default_rng(0)
    params = {
        "kernel": rng.normal(size=(16, 8)).astype(np.float32),
        "bias": rng.normal(size=(8,)).astype(np.float32),
        "gain": rng.normal(size=(8,)).astype(np.float32),
        "scale": rng.normal(size=(3,)).astype(np.float32),
    }
    grads = [
        {
            k: (10 * rng.normal(size=v.shape)).astype(np.float32)
            for k, v in params.items()
        }
        for _ in range(12)
    ]
    tx = adamax(
        0.05,
        weight_decay=0.01,
        global_clipnorm=1.0,
        use_ema=True,
        gradient_accumulation_steps=2,
        dynamic_loss_scale={"initial_scale": 4.0},
    )

    def on_mesh(tree):
        return {
            k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()
        }

    def on_one_device(tree):
        return {k: jnp.asarray(v) for k, v in tree.items()}

    def train(params, grads, shard):
        put = on_mesh if shard else on_one_device
        params = put(params)
        state = tx.init(params)

        @jax.jit
        def step(params, state, g):
            updates, state = tx.update(g, state, params)
            return optax.apply_updates(params, updates), state

        for g in grads:
            params, state = step(params, state, put(g))
        return params, state

    single, single_state = train(params, grads, shard=False)
    sharded, sharded_state = train(params, grads, shard=True)

    # The state takes the parameters' sharding (a stack: its members', after
    # the stacking axis).
    inner = sharded_state.inner_state["accumulate"].inner_state
    expected = {
        "kernel": P("data", "model"),
        "bias+gain": P(None, "model"),
        "scale": P(),
    }
    for view in (
        inner["adamax"].m,
        inner["adamax"].u,
        inner["ema"].ema,
        sharded_state.inner_state["accumulate"].accumulator,
    ):
        parts = parts_by_leaf(view)
        assert parts.keys() == expected.keys(), parts.keys()
        for key, spec in expected.items():
            assert parts[key].sharding.is_equivalent_to(
                NamedSharding(mesh, spec), parts[key].ndim
            ), (key, parts[key].sharding)
    for key, spec in specs.items():
        assert sharded[key].sharding.is_equivalent_to(
            NamedSharding(mesh, spec), sharded[key].ndim
        )

    # Global clipping used the true global norm: the clipped gradient's norm is 1.
    clip = adamax(1.0, beta_1=0.0, epsilon=0.0, global_clipnorm=1.0)
    p0 = on_mesh(params)
    clipped = jax.jit(clip.update)(on_mesh(grads[0]), clip.init(p0), p0)
    clipped = clipped[1]["adamax"].m
    norm = np.sqrt(sum(float(jnp.sum(jnp.square(v))) for v in jax.tree.leaves(clipped)))
    assert abs(norm - 1.0) < 1e-5, norm

    assert_trees_close(sharded, single, "params")
    assert_trees_close(
        finalize_variable_values(sharded, sharded_state),
        finalize_variable_values(single, single_state),
        "EMA",
    )
    print("SHARDED OK")


EXPLICIT_CONFIGS = {
    "every option": dict(
        weight_decay=0.01,
        global_clipnorm=1.0,
        use_ema=True,
        ema_overwrite_frequency=2,
        gradient_accumulation_steps=2,
        dynamic_loss_scale={"initial_scale": 4.0},
    ),
    "clipnorm": dict(clipnorm=1.0),
    "clipvalue, static loss scale": dict(clipvalue=1.0, loss_scale_factor=4.0),
}


def other_layout(mesh: Mesh, x: jax.Array) -> NamedSharding:
    """A state sharding unlike the parameters' (``data`` / ``model``)."""
    specs = {2: P("model", "data"), 1: P("data")}
    return NamedSharding(mesh, specs.get(x.ndim, P()))


def explicit_axes_and_unlike_state() -> None:
    """Every option, eagerly and under ``jit``, with ``Auto`` and ``Explicit``
    axes, the state sharded like the parameters or unlike them: equal to the
    single-device run, and the state keeps its sharding."""
    rng = np.random.default_rng(1)
    shapes = {"kernel": (16, 8), "bias": (8,), "gain": (8,)}  # bias, gain stacked
    specs = {"kernel": P("data", "model"), "bias": P("model"), "gain": P("model")}
    params = {k: rng.normal(size=v).astype(np.float32) for k, v in shapes.items()}
    grads = [
        {k: (5 * rng.normal(size=v)).astype(np.float32) for k, v in shapes.items()}
        for _ in range(4)
    ]
    for name, options in EXPLICIT_CONFIGS.items():
        tx = adamax(0.05, **options)

        def run(put, state_layout, update, tx=tx, name=name):
            p = put(params)
            state = tx.init(p)
            if state_layout is not None:
                state = jax.tree.map(
                    lambda x: jax.device_put(x, state_layout(x)) if x.ndim else x,
                    state,
                )
            layout = [x.sharding for x in jax.tree.leaves(state)]
            for g in grads:
                updates, state = update(put(g), state, p)
                p = optax.apply_updates(p, updates)
            kept = [x.sharding for x in jax.tree.leaves(state)]
            # Under Auto axes XLA picks the result's layout (a step pins it with
            # out_shardings); Explicit axes make it part of the type.
            mesh = getattr(layout[0], "mesh", None)
            explicit = AxisType.Explicit in getattr(mesh, "axis_types", ())
            leaves = jax.tree.leaves(state)
            for before, after, x in zip(layout, kept, leaves, strict=True):
                if explicit:
                    assert after.is_equivalent_to(before, x.ndim), (name, after)
            return p, finalize_variable_values(p, state)

        reference = run(
            lambda t: {k: jnp.asarray(v) for k, v in t.items()},
            None,
            jax.jit(tx.update),
        )
        for axis_type in (AxisType.Auto, AxisType.Explicit):
            mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)

            def put(tree, mesh=mesh):
                return {
                    k: jax.device_put(v, NamedSharding(mesh, specs[k]))
                    for k, v in tree.items()
                }

            with jax.set_mesh(mesh):
                for state_layout in (None, lambda x, mesh=mesh: other_layout(mesh, x)):
                    for update in (tx.update, jax.jit(tx.update)):
                        result = run(put, state_layout, update)
                        label = (name, axis_type, state_layout is None)
                        assert_trees_close(result, reference, label)
    print("EXPLICIT OK")


if __name__ == "__main__":
    _grouping.MIN_SHARED = STACK_FROM
    main()
    explicit_axes_and_unlike_state()
