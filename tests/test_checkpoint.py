"""The whole state saves and restores with orbax-checkpoint; resuming is exact."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from conftest import make_problem

from adamax_optax import adamax, get_iterations, get_loss_scale


def make_optimizer():
    return adamax(
        optax.exponential_decay(0.05, 5, 0.7),
        weight_decay=0.01,
        clipnorm=1.0,
        use_ema=True,
        ema_overwrite_frequency=3,
        gradient_accumulation_steps=3,
        dynamic_loss_scale={"initial_scale": 8.0, "growth_steps": 4},
        state_dtype=jnp.float32,
    )


def train(tx, params, state, grads):
    step = jax.jit(tx.update)
    for g in grads:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_resume_mid_group_is_bit_identical(tmp_path):
    params, grads = make_problem(seed=3, steps=25)
    grads[6]["dense/bias"] = np.full_like(grads[6]["dense/bias"], np.inf)  # a skip
    params = {k: jnp.asarray(v, jnp.bfloat16) for k, v in params.items()}
    grads = [{k: jnp.asarray(v, jnp.bfloat16) for k, v in g.items()} for g in grads]
    tx = make_optimizer()

    straight_params, straight_state = train(tx, params, tx.init(params), grads)

    # Stop after 14 calls (one skipped): in the middle of an accumulation group.
    half_params, half_state = train(tx, params, tx.init(params), grads[:14])
    assert int(half_state.inner_state["accumulate"].micro_step) != 0
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", {"params": half_params, "opt": half_state})
    checkpointer.wait_until_finished()

    # A new process would rebuild the optimizer and restore into its structure.
    fresh = make_optimizer()
    target = {"params": params, "opt": fresh.init(params)}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = checkpointer.restore(tmp_path / "ckpt", abstract)
    assert jax.tree.structure(restored["opt"]) == jax.tree.structure(half_state)
    resumed_params, resumed_state = train(
        fresh, restored["params"], restored["opt"], grads[14:]
    )

    for a, b in zip(
        jax.tree.leaves((straight_params, straight_state)),
        jax.tree.leaves((resumed_params, resumed_state)),
        strict=True,
    ):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(get_iterations(resumed_state)) == int(get_iterations(straight_state))
    assert float(get_loss_scale(resumed_state)) == float(get_loss_scale(straight_state))
