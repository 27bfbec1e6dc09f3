"""Parameter EMA and ``finalize_variable_values``, against closed forms."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adamax_optax import (
    ParameterEMAState,
    adamax,
    finalize_variable_values,
    parameter_ema,
)


def walk(tx, steps, params=None):
    """sgd(1) with gradient -1: parameters go 1, 2, 3, ... one per update."""
    params = jnp.zeros(1) if params is None else params
    state = tx.init(params)
    history = []
    for _ in range(steps):
        updates, state = tx.update(-jnp.ones(1), state, params)
        params = optax.apply_updates(params, updates)
        history.append(float(params[0]))
    return params, state, history


def test_ema_closed_form():
    momentum = 0.5
    _, state, _ = walk(optax.chain(optax.sgd(1.0), parameter_ema(momentum)), 3)
    ema = 1.0  # first update: ema = w
    for w in (2.0, 3.0):
        ema = momentum * ema + (1 - momentum) * w
    assert float(state[1].ema[0]) == pytest.approx(ema)
    assert int(state[1].count) == 3


def test_overwrite_every_f_updates():
    tx = optax.chain(optax.sgd(1.0), parameter_ema(0.5, ema_overwrite_frequency=2))
    _, _, history = walk(tx, 4)
    # 1; then w=2 -> ema=1.5 -> overwrite; 2.5; w=3.5 -> ema = .5*2 + .5*3.5 = 2.75
    assert history == pytest.approx([1.0, 1.5, 2.5, 2.75])


def test_momentum_zero_tracks_the_parameters_and_one_freezes_the_first():
    params, state, _ = walk(optax.chain(optax.sgd(1.0), parameter_ema(0.0)), 3)
    assert float(finalize_variable_values(params, state)[0]) == 3.0
    params, state, _ = walk(optax.chain(optax.sgd(1.0), parameter_ema(1.0)), 3)
    assert float(finalize_variable_values(params, state)[0]) == 1.0


def test_finalize_without_ema_returns_params_unchanged():
    params = {"w": jnp.arange(3.0)}
    state = adamax().init(params)
    assert finalize_variable_values(params, state) is params


def test_finalize_finds_the_ema_inside_nested_states():
    params = {"w": jnp.arange(3.0)}
    wrapped = optax.inject_hyperparams(adamax)(learning_rate=0.1, use_ema=True)
    state = wrapped.init(params)
    nested = {"outer": (state, optax.EmptyState())}
    out = finalize_variable_values(params, nested)
    np.testing.assert_array_equal(out["w"], params["w"])


def test_finalize_rejects_two_emas():
    params = jnp.zeros(2)
    tx = optax.chain(parameter_ema(), parameter_ema())
    with pytest.raises(ValueError, match="2 parameter EMAs"):
        finalize_variable_values(params, tx.init(params))


def test_ema_in_float32_for_bf16_params():
    params = jnp.ones(4, jnp.bfloat16)
    tx = parameter_ema(state_dtype=jnp.float32)
    state = tx.init(params)
    assert isinstance(state, ParameterEMAState) and state.ema.dtype == jnp.float32
    updates, state = tx.update(jnp.zeros(4, jnp.bfloat16), state, params)
    assert updates.dtype == jnp.bfloat16
    assert finalize_variable_values(params, state).dtype == jnp.bfloat16


def test_ema_state_never_shares_the_parameters_buffer():
    """A step donating params and state must not donate one buffer twice."""
    tx = adamax(0.1, use_ema=True)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    ema = state["ema"].ema["w"]
    assert ema.unsafe_buffer_pointer() != params["w"].unsafe_buffer_pointer()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state):
        updates, state = tx.update({"w": jnp.ones(3)}, state, params)
        return optax.apply_updates(params, updates), state

    params, state = step(params, state)  # raised "donate the same buffer twice"
    assert float(params["w"][0]) < 1.0


def test_ema_warmup_caps_the_momentum_in_closed_form():
    """SGD with lr 1 and gradient -1 puts the weight at k after update k. The
    average with warmup, written out: ema_1 = 1, and for k >= 2 with c = k - 1
    updates before it, m = min(0.99, (1 + c) / (10 + c)) = k / (9 + k)."""
    tx = optax.chain(optax.sgd(1.0), parameter_ema(0.99, ema_warmup=True))
    params = jnp.zeros(1)
    state = tx.init(params)
    expected = 0.0
    for k in range(1, 201):
        updates, state = tx.update(-jnp.ones(1), state, params)
        params = optax.apply_updates(params, updates)
        momentum = 0.0 if k == 1 else min(0.99, k / (9 + k))
        expected = momentum * expected + (1 - momentum) * k
        if k in (1, 2, 9, 50, 200):
            np.testing.assert_allclose(
                finalize_variable_values(params, state), [expected], rtol=1e-5
            )
    # Without warmup the start dominates a short run: the plain average lags more.
    plain = optax.chain(optax.sgd(1.0), parameter_ema(0.99))
    params, plain_state = jnp.zeros(1), plain.init(jnp.zeros(1))
    for _ in range(200):
        updates, plain_state = plain.update(-jnp.ones(1), plain_state, params)
        params = optax.apply_updates(params, updates)
    assert finalize_variable_values(params, plain_state)[0] < expected - 50


def test_ema_warmup_is_off_by_default_and_reaches_the_optimizer():
    on = adamax(0.1, use_ema=True, ema_warmup=True)
    off = adamax(0.1, use_ema=True)
    params = jnp.array([1.0])
    results = {}
    for name, tx in (("on", on), ("off", off)):
        p, state = params, tx.init(params)
        for _ in range(3):
            updates, state = tx.update(jnp.array([1.0]), state, p)
            p = optax.apply_updates(p, updates)
        results[name] = float(finalize_variable_values(p, state)[0])
    w1, w2, w3 = 0.9, 0.8, 0.7  # lr * sign(g) steps, up to epsilon
    ema_on = w1
    ema_on = (2 / 11) * ema_on + (9 / 11) * w2
    ema_on = (3 / 12) * ema_on + (9 / 12) * w3
    ema_off = w1
    ema_off = 0.99 * ema_off + 0.01 * w2
    ema_off = 0.99 * ema_off + 0.01 * w3
    np.testing.assert_allclose(results["on"], ema_on, rtol=1e-5)
    np.testing.assert_allclose(results["off"], ema_off, rtol=1e-5)


def test_exclude_from_ema_against_the_reference():
    """Excluded leaves keep no average (no bytes in the state), are never
    overwritten, and come back as they are from finalize_variable_values."""
    from conftest import assert_parity, make_problem, run_ours
    from reference import ReferenceAdamax

    from adamax_optax import finalize_variable_values

    params, grads = make_problem(steps=20)
    options = dict(use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=4)
    tx = adamax(0.01, exclude_from_ema=["bias", "^out"], **options)
    ours, state = run_ours(tx, params, grads)
    reference = ReferenceAdamax(
        params, 0.01, exclude_from_ema=["bias", "^out"], **options
    )
    for g in grads:
        reference.step(g)
    assert_parity(ours, reference.params)
    assert_parity(finalize_variable_values(ours, state), reference.final())
    ema_bytes = sum(x.nbytes for x in jax.tree.leaves(state["ema"].ema))
    assert ema_bytes == params["dense/kernel"].nbytes  # the one leaf kept
    full = adamax(0.01, **options).init(params)["ema"].ema
    assert sum(x.nbytes for x in jax.tree.leaves(full)) == sum(
        v.nbytes for v in params.values()
    )


def test_exclude_from_ema_forms_and_errors():
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    for exclude in (["b"], {"a": False, "b": True}, lambda p: {"a": False, "b": True}):
        state = parameter_ema(0.5, exclude_from_ema=exclude).init(params)
        assert isinstance(state.ema["b"], optax.MaskedNode)
        assert state.ema["a"].shape == (2,)
    with pytest.raises(ValueError, match="`exclude_from_ema` holds an invalid"):
        parameter_ema(0.5, exclude_from_ema=["("])
    with pytest.warns(UserWarning, match="`exclude_from_ema` pattern 'z' matches no"):
        parameter_ema(0.5, exclude_from_ema=["z"]).init(params)
    with pytest.warns(UserWarning, match="no effect without `use_ema=True`"):
        adamax(exclude_from_ema=["b"])


@pytest.mark.parametrize(
    "exclude",
    [["b"], {"a": False, "b": True}, lambda p: {"a": False, "b": True}],
    ids=["patterns", "mask", "callable"],
)
def test_excluded_leaves_get_no_sharding_and_init_under_it(exclude):
    """``state_shardings(..., optimizer=tx)`` (optax's ``map_params``) and a
    jitted ``init`` with those shardings, an excluded leaf staying a
    MaskedNode."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from adamax_optax import state_shardings

    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    params = {"a": jnp.ones((4, 2)), "b": jnp.ones(3)}
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), params)
    tx = adamax(use_ema=True, exclude_from_ema=exclude)
    abstract = jax.eval_shape(tx.init, params)
    shardings = state_shardings(
        abstract, mesh, "data", optimizer=tx, param_shardings=replicated
    )
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    assert isinstance(state["ema"].ema["b"], optax.MaskedNode)
    assert state["ema"].ema["a"].shape == (4, 2)
