"""Skipping bad steps: a NaN or an infinity changes nothing, and is counted.

References: the same optimizer fed only the good steps, the NumPy reference with
its skip rule, and closed forms.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import EVERY_OPTION, assert_parity, make_problem, run_ours
from reference import ReferenceAdamax

import adamax_optax as ao
from adamax_optax import adamax, get_iterations, get_skipped_steps

BAD_CALLS = (3, 9, 10, 17)  # chosen calls made non-finite


def poisoned(grads, bad_calls=BAD_CALLS):
    """``grads`` with a NaN, an infinity or a minus infinity at the bad calls."""
    out = []
    for i, g in enumerate(grads):
        if i in bad_calls:
            g = dict(g)
            poison = (np.nan, np.inf, -np.inf)[i % 3]
            g["dense/bias"] = g["dense/bias"].copy()
            g["dense/bias"][i % 3] = poison
        out.append(g)
    return out


def good_only(grads, bad_calls=BAD_CALLS):
    return [g for i, g in enumerate(grads) if i not in bad_calls]


OPTION_SETS = {
    "defaults": {},
    "every option": EVERY_OPTION,
    "every option, loss_scale_factor": dict(**EVERY_OPTION, loss_scale_factor=4.0),
}


@pytest.mark.parametrize("name", OPTION_SETS)
def test_bad_steps_leave_what_the_good_steps_alone_give(name):
    options = OPTION_SETS[name]
    params, grads = make_problem(steps=24)
    schedule = optax.linear_schedule(0.01, 0.001, 24)
    with jax.numpy_dtype_promotion("standard"):
        want, want_state = run_ours(
            adamax(schedule, **options), params, good_only(grads)
        )
        got, state = run_ours(
            adamax(schedule, skip_nonfinite=True, **options), params, poisoned(grads)
        )
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
    assert int(get_skipped_steps(state)) == len(BAD_CALLS)
    assert int(get_iterations(state)) == int(get_iterations(want_state))
    # Every shared piece of state (moments, counts, EMA, accumulator) agrees.
    inner = state["skip_nonfinite"].inner_state
    chex.assert_trees_all_close(
        list(inner.values()), list(want_state.values())[-len(inner) :], rtol=1e-6
    )


@pytest.mark.parametrize("name", OPTION_SETS)
def test_skip_matches_the_numpy_reference(name):
    options = OPTION_SETS[name]
    params, grads = make_problem(steps=24)
    grads = poisoned(grads)
    got, state = run_ours(adamax(0.01, skip_nonfinite=True, **options), params, grads)
    reference = ReferenceAdamax(params, 0.01, skip_nonfinite=True, **options)
    for g in grads:
        reference.step(g)
    assert_parity(got, reference.params)
    assert int(get_skipped_steps(state)) == reference.skipped == len(BAD_CALLS)


@pytest.mark.parametrize("gating", ["loop", "cond", "where"])
def test_a_skipped_call_changes_nothing(gating):
    """Zero updates; every state leaf bit-identical but the counter, even in the
    middle of an accumulation group."""
    params, grads = make_problem(steps=6)
    tx = adamax(skip_nonfinite=True, gating=gating, **EVERY_OPTION)
    params = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads[:5]:  # one update and one micro-step into the next group
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    updates, after = update(poisoned(grads, (5,))[5], state, params)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, updates))
    before_inner = state["skip_nonfinite"].inner_state
    chex.assert_trees_all_equal(after["skip_nonfinite"].inner_state, before_inner)
    assert int(get_skipped_steps(after)) == 1


def test_under_dynamic_loss_scaling_both_skips_are_counted():
    """The loss scale skips a non-finite scaled gradient (and backs off); the
    norm threshold skips a large finite one; the rest is the good steps."""
    params, grads = make_problem(steps=16)
    grads = poisoned(grads, (4, 11))
    big = 7
    grads[big] = {k: 100.0 * v for k, v in grads[big].items()}
    threshold = 50.0
    options = dict(gradient_accumulation_steps=2, weight_decay=0.01)

    def run(tx, grads):
        p = {k: jnp.asarray(v) for k, v in params.items()}
        state = tx.init(p)
        for g in grads:  # scaled gradients, as a user passes them
            scale = ao.get_loss_scale(state)
            scaled = {k: v * scale for k, v in g.items()}
            updates, state = jax.jit(tx.update)(scaled, state, p)
            p = optax.apply_updates(p, updates)
        return p, state

    got, state = run(
        adamax(
            skip_nonfinite=True,
            skip_norm_above=threshold,
            dynamic_loss_scale={"initial_scale": 2.0**8},
            **options,
        ),
        grads,
    )
    want, _ = run(
        adamax(dynamic_loss_scale={"initial_scale": 2.0**8}, **options),
        good_only(grads, (4, 11, big)),
    )
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
    assert int(get_skipped_steps(state)) == 3
    assert int(state.inner_state["skip_nonfinite"].skipped_steps) == 1  # the norm
    assert int(state.skipped_steps) == 2  # the loss scale's


def test_large_finite_gradients_are_not_skipped():
    """1e20 squares to infinity in float32: the finiteness check never squares,
    so the step runs; Adamax's first step is then ``-lr * sign(g)``."""
    tx = adamax(0.1, skip_nonfinite=True)
    params = jnp.zeros(3)
    grads = jnp.array([1e20, -3e25, 2e30])
    updates, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates, [-0.1, 0.1, -0.1], rtol=1e-6)
    assert int(get_skipped_steps(state)) == 0


@pytest.mark.parametrize("gating", ["loop", "cond", "where"])
def test_a_sum_that_overflows_is_still_finite(gating):
    """3e38 + 3e38 overflows float32: the fast check's sum is infinite, and
    the exact check behind it finds every element finite."""
    tx = adamax(0.1, skip_nonfinite=True, gating=gating)
    params = jnp.zeros(3)
    grads = jnp.array([3e38, 3e38, -1.0])
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_allclose(updates, [-0.1, -0.1, 0.1], rtol=1e-6)
    assert int(get_skipped_steps(state)) == 0
    _, state = jax.jit(tx.update)(grads.at[2].set(np.nan), state, params)
    assert int(get_skipped_steps(state)) == 1


def test_norm_threshold_skips_only_above_it():
    tx = adamax(0.1, skip_nonfinite=True, skip_norm_above=5.0)
    params = jnp.zeros(2)
    state = tx.init(params)
    updates, state = tx.update(jnp.array([3.0, 4.0]), state, params)  # norm 5
    np.testing.assert_allclose(updates, [-0.1, -0.1], rtol=1e-6)
    updates, state = tx.update(jnp.array([3.0, 4.001]), state, params)
    np.testing.assert_array_equal(updates, [0.0, 0.0])
    assert int(get_skipped_steps(state)) == 1
    assert int(get_iterations(state)) == 1


@pytest.mark.parametrize("gating", ["loop", "cond", "where"])
@pytest.mark.parametrize("threshold", [5.0, 1e30])
def test_a_norm_threshold_skips_non_finite_gradients(gating, threshold):
    """Below about 1.8e19 the norm's check is the only one (a NaN or an
    infinity makes the norm NaN or infinite); above, the finiteness check runs
    beside it."""
    tx = adamax(0.1, skip_nonfinite=True, skip_norm_above=threshold, gating=gating)
    params = jnp.zeros(3)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for skipped, poison in enumerate((np.nan, np.inf, -np.inf), start=1):
        updates, state = update(jnp.array([1.0, poison, 2.0]), state, params)
        np.testing.assert_array_equal(updates, [0.0, 0.0, 0.0])
        assert int(get_skipped_steps(state)) == skipped
    assert int(get_iterations(state)) == 0
    updates, state = update(jnp.array([1.0, -2.0, 2.0]), state, params)  # norm 3
    np.testing.assert_allclose(updates, [-0.1, 0.1, -0.1], rtol=1e-6)
    assert int(get_skipped_steps(state)) == 3


@pytest.mark.parametrize("gating", ["loop", "cond", "where"])
def test_the_check_sees_the_unscaled_gradients(gating):
    """A scaled gradient that overflows once divided by a factor below 1 is
    skipped; the norm threshold applies to the unscaled gradients."""
    params = jnp.zeros(2)
    tx = adamax(0.1, skip_nonfinite=True, loss_scale_factor=0.5, gating=gating)
    update = jax.jit(tx.update)
    updates, state = update(jnp.array([3e38, 1.0]), tx.init(params), params)
    np.testing.assert_array_equal(updates, [0.0, 0.0])  # 6e38 is not a float32
    assert int(get_skipped_steps(state)) == 1
    updates, state = update(jnp.array([1e38, -1.0]), state, params)
    np.testing.assert_allclose(updates, [-0.1, 0.1], rtol=1e-6)

    tx = adamax(
        0.1,
        skip_nonfinite=True,
        skip_norm_above=5.0,
        loss_scale_factor=4.0,
        gating=gating,
    )
    update = jax.jit(tx.update)
    updates, state = update(jnp.array([12.0, 16.0]), tx.init(params), params)
    np.testing.assert_allclose(updates, [-0.1, -0.1], rtol=1e-6)  # norm 5
    updates, state = update(jnp.array([12.0, 16.004]), state, params)
    np.testing.assert_array_equal(updates, [0.0, 0.0])
    assert int(get_skipped_steps(state)) == 1


@pytest.mark.parametrize("gating", ["loop", "cond", "where"])
def test_a_loss_scale_below_one_that_overflows_a_gradient_is_skipped(gating):
    """The loss scale finds 3e38 finite; divided by its scale of 0.5 it is not
    a float32, so the skip (which sees the unscaled gradient) drops the call."""
    tx = adamax(
        0.1,
        skip_nonfinite=True,
        dynamic_loss_scale={"initial_scale": 0.5, "min_loss_scale": 0.25},
        gating=gating,
    )
    params = jnp.zeros(2)
    update = jax.jit(tx.update)
    updates, state = update(jnp.array([3e38, 1.0]), tx.init(params), params)
    np.testing.assert_array_equal(updates, [0.0, 0.0])
    assert int(state.inner_state["skip_nonfinite"].skipped_steps) == 1
    assert int(state.skipped_steps) == 0
    updates, state = update(jnp.array([1e38, -1.0]), state, params)
    np.testing.assert_allclose(updates, [-0.1, 0.1], rtol=1e-6)


@pytest.mark.parametrize("gating", ["loop", "cond", "where"])
@pytest.mark.parametrize(
    "scale, grads",
    [(1.0, [3e38, 3e38, -1.0]), (0.5, [1e38, 1e38, -0.5])],
    ids=["the loss scale's exact check", "the skip's exact check"],
)
def test_a_sum_that_overflows_under_loss_scaling_is_still_finite(gating, scale, grads):
    """Scale 1: the scaled sum overflows, and the loss scale's exact check
    finds every element finite (the skip reads nothing more). Scale 0.5: the
    unscaled sum overflows, and the skip's exact check (a division by less
    than 1 could overflow, so it runs) finds every element finite."""
    tx = adamax(
        0.1,
        skip_nonfinite=True,
        dynamic_loss_scale={"initial_scale": scale, "min_loss_scale": 0.25},
        gating=gating,
    )
    params = jnp.zeros(3)
    grads = jnp.array(grads)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_allclose(updates, [-0.1, -0.1, 0.1], rtol=1e-6)
    assert int(get_skipped_steps(state)) == 0


def test_an_injected_scale_and_threshold_are_read_where_they_are_traced():
    """Under ``inject_hyperparams`` the factor and the threshold are traced:
    the check still sees the unscaled gradients (``[6, 1]``: a norm above 5)."""
    tx = optax.inject_hyperparams(adamax, static_args=("skip_nonfinite",))(
        learning_rate=0.1,
        skip_nonfinite=True,
        loss_scale_factor=0.5,
        skip_norm_above=5.0,
    )
    params = jnp.zeros(2)
    update = jax.jit(tx.update)
    state = tx.init(params)
    expected = ([0.0, 0.0], [-0.1, -0.1], [0.0, 0.0])
    for g, want in zip(([3e38, 1.0], [1.0, 2.0], [3.0, 0.5]), expected, strict=True):
        updates, state = update(jnp.array(g), state, params)
        np.testing.assert_allclose(updates, want, rtol=1e-6)
    assert int(get_skipped_steps(state)) == 2


@pytest.mark.parametrize("gating", ["loop", "cond", "where"])
def test_a_skip_under_dynamic_loss_scaling_leaves_its_state_alone(gating):
    """A non-finite scaled gradient: the loss scale skips it, and the skip
    wrapper inside (which takes the gradients for finite) is left as it was,
    its counter included, under every gating, mid-group."""
    tx = adamax(
        skip_nonfinite=True,
        dynamic_loss_scale=True,
        gating=gating,
        **EVERY_OPTION,
    )
    params = jnp.ones(3)
    update = jax.jit(tx.update)
    _, state = update(jnp.full(3, 2.0**14), tx.init(params), params)
    updates, after = update(jnp.array([1.0, np.nan, 1.0]), state, params)
    np.testing.assert_array_equal(updates, [0.0, 0.0, 0.0])
    chex.assert_trees_all_equal(after.inner_state, state.inner_state)
    assert int(after.skipped_steps) == 1
    assert int(after.inner_state["skip_nonfinite"].skipped_steps) == 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_handed_on_division_computes_what_a_divided_gradient_does(dtype):
    """``adamax_optax.chain`` hands the fixed scale's division on to the
    wrapper; ``optax.chain`` divides first. Bit for bit the same."""

    def make(chain):
        inner = ao.accumulate_gradients(
            ao.chain(ao.scale_by_keras_adamax(), ao.scale_by_keras_learning_rate(0.1)),
            2,
        )
        return chain(
            ao.unscale_gradients(3.0), ao.skip_nonfinite(inner, skip_norm_above=50.0)
        )

    params = jnp.zeros(4, dtype)
    rows = [
        [3.0, -6.0, 9.0, 1.5],
        [1.0, np.nan, 2.0, 0.5],
        [300.0] * 4,  # unscaled, a norm of 200
        [0.3, 0.6, -0.9, 2.4],
        [1.5, -3.0, 4.5, 6.0],
    ]
    grads = [jnp.array(g, dtype) for g in rows]
    ours, theirs = make(ao.chain), make(optax.chain)
    state_ours, state_theirs = ours.init(params), theirs.init(params)
    for g in grads:
        updates_ours, state_ours = jax.jit(ours.update)(g, state_ours, params)
        updates_theirs, state_theirs = jax.jit(theirs.update)(g, state_theirs, params)
        chex.assert_trees_all_equal(updates_ours, updates_theirs)
    chex.assert_trees_all_equal(state_ours, state_theirs)
    assert int(get_skipped_steps(state_ours)) == 2  # the NaN, the norm of 200


@pytest.mark.parametrize("chain", [ao.chain, optax.chain])
def test_loss_scales_in_front_of_the_wrapper_in_a_chain(chain):
    """Two fixed scales in front of ``skip_nonfinite``: the wrapper receives
    ``g / 2 / 3`` (handed on unapplied by ``adamax_optax.chain``)."""
    tx = chain(
        ao.unscale_gradients(2.0),
        ao.unscale_gradients(3.0),
        ao.skip_nonfinite(optax.sgd(1.0), skip_norm_above=3.0),
    )
    params = jnp.zeros(2)
    state = tx.init(params)
    updates, state = tx.update(jnp.array([6.0, 12.0]), state, params)
    np.testing.assert_allclose(updates, [-1.0, -2.0], rtol=1e-6)
    for bad in ([np.nan, 6.0], [6.0, 19.0]):  # non-finite; norm above 3
        updates, state = tx.update(jnp.array(bad), state, params)
        np.testing.assert_array_equal(updates, [0.0, 0.0])
    assert int(get_skipped_steps(state)) == 2


def test_a_non_finite_weight_is_skipped_too():
    tx = adamax(skip_nonfinite=True, gradient_accumulation_steps=2)
    params = jnp.zeros(2)
    state = tx.init(params)
    # Traced (a concrete NaN is refused when the step is traced).
    _, state = jax.jit(tx.update)(jnp.ones(2), state, params, weight=np.nan)
    assert int(get_skipped_steps(state)) == 1
    assert int(state["skip_nonfinite"].inner_state["accumulate"].micro_step) == 0


def test_wrapper_protects_a_foreign_transformation():
    """optax's momentum never sees the NaN: the result is the good steps'."""
    with jax.numpy_dtype_promotion("standard"):
        sgd = optax.sgd(0.1, momentum=0.9)
        tx = ao.skip_nonfinite(sgd)
        params = jnp.ones(2)
        state, want_state = tx.init(params), sgd.init(params)
        for g in ([1.0, 2.0], [np.nan, 1.0], [0.5, -1.0]):
            updates, state = tx.update(jnp.array(g), state)
            if np.all(np.isfinite(g)):
                want, want_state = sgd.update(jnp.array(g), want_state)
                np.testing.assert_allclose(updates, want)
    assert int(state.skipped_steps) == 1


def test_a_flush_on_a_skipped_call_is_dropped_with_it():
    """The group stays open: the next good call ends it as the flush would."""
    tx = adamax(1.0, skip_nonfinite=True, gradient_accumulation_steps=4)
    params = jnp.zeros(1)
    state = tx.init(params)
    _, state = tx.update(jnp.array([2.0]), state, params)
    updates, state = tx.update(jnp.array([np.nan]), state, params, flush=True)
    np.testing.assert_array_equal(updates, [0.0])
    accumulate = state["skip_nonfinite"].inner_state["accumulate"]
    assert int(accumulate.micro_step) == 1
    updates, state = tx.update(jnp.array([4.0]), state, params, flush=True)
    # Adamax's first step on the mean 3: -lr * sign.
    np.testing.assert_allclose(updates, [-1.0], rtol=1e-6)


def test_get_skipped_steps_needs_a_counter():
    with pytest.raises(ValueError, match="skip_nonfinite=True"):
        get_skipped_steps(adamax().init(jnp.zeros(1)))


def test_counters_keep_their_dtypes_with_low_precision_parameters():
    tx = adamax(skip_nonfinite=True, dynamic_loss_scale=True)
    state = tx.init({"w": jnp.zeros(3, jnp.bfloat16)})
    assert state.loss_scale.dtype == jnp.float32
    assert state.good_steps.dtype == state.skipped_steps.dtype == jnp.int32
    assert state.inner_state["skip_nonfinite"].skipped_steps.dtype == jnp.int32
    _, state = tx.update({"w": jnp.full(3, jnp.inf, jnp.bfloat16)}, state)
    assert state.loss_scale.dtype == jnp.float32
    assert int(get_skipped_steps(state)) == 1


def test_invalid_skip_options_are_named():
    with pytest.raises(ValueError, match="skip_norm_above=0"):
        adamax(skip_nonfinite=True, skip_norm_above=0)
    with pytest.raises(ValueError, match="skip_norm_above=-1"):
        ao.skip_nonfinite(optax.sgd(0.1), skip_norm_above=-1)
    with pytest.raises(TypeError, match="skip_nonfinite"):
        adamax(skip_nonfinite="yes")
    with pytest.warns(UserWarning, match="skip_norm_above=3.0.*no effect"):
        adamax(skip_norm_above=3.0)


@pytest.mark.parametrize(
    "threshold, skipped",
    [(4.2e19, True), (4.3e19, False), (1e30, False), (3e38, False)],
)
def test_a_threshold_above_the_squares_range_compares_the_true_norm(threshold, skipped):
    # The norm is sqrt(2 * 9e38 + 1) = 4.2426e19: its float32 squares overflow.
    tx = adamax(0.1, skip_nonfinite=True, skip_norm_above=threshold)
    params = jnp.zeros(3)
    grads = jnp.array([3e19, 3e19, 1.0])
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert int(get_skipped_steps(state)) == int(skipped)
    assert bool(jnp.all(updates == 0)) == skipped
    nan = jax.jit(tx.update)(grads.at[2].set(jnp.nan), tx.init(params), params)[1]
    assert int(get_skipped_steps(nan)) == 1
