"""Stochastic rounding of bfloat16 and float16 parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from adamax_optax import (
    ParameterEMAState,
    adamax,
    decoupled_weight_decay,
    scale_by_keras_adamax,
    scale_by_keras_learning_rate,
)
from adamax_optax._common import find_states
from adamax_optax._dither import dither_bits
from adamax_optax._stochastic_rounding import (
    StochasticRoundingState,
    round_stochastically,
)

ULP = 2.0**-7  # bfloat16's unit in the last place in [1, 2)


def train(tx, params, steps, grads=None):
    state = tx.init(params)
    step = jax.jit(tx.update)
    for i in range(steps):
        g = jnp.ones_like(params) if grads is None else grads[i]
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_quarter_ulp_updates_move_bfloat16_parameters_on_average():
    # Adamax's direction for a constant gradient is 1 (with float32 moments),
    # so each update is -learning_rate: a quarter of bfloat16's unit at 1.5.
    start = jnp.full(4096, 1.5, jnp.bfloat16)
    lr, f32 = ULP / 4, jnp.float32
    nearest, _ = train(adamax(lr, state_dtype=f32), start, 1000)
    stochastic, _ = train(
        adamax(lr, state_dtype=f32, stochastic_rounding=True), start, 1000
    )
    exact, _ = train(adamax(lr), start.astype(f32), 1000)
    np.testing.assert_array_equal(nearest, start)  # round to nearest never moves
    assert stochastic.dtype == jnp.bfloat16
    mean = float(np.mean(np.asarray(stochastic, np.float32)))
    target = float(np.mean(np.asarray(exact)))  # 1.5 - 1000 / 512
    assert abs(target - (1.5 - 1000 * lr)) < 1e-3
    # Each element's path is a sum of 1000 coin flips of at most one unit: the
    # mean of 4096 of them is within 0.005 of the float32 path (over 5 sigma).
    assert abs(mean - target) < 0.005


def test_float16_parameters_too():
    start = jnp.full(4096, 1.5, jnp.float16)
    lr = 2.0**-10 / 4  # a quarter of float16's unit in [1, 2)
    f32 = jnp.float32
    nearest, _ = train(adamax(lr, state_dtype=f32), start, 200)
    stochastic, _ = train(
        adamax(lr, state_dtype=f32, stochastic_rounding=True), start, 200
    )
    np.testing.assert_array_equal(nearest, start)
    mean = float(np.mean(np.asarray(stochastic, np.float32)))
    assert abs(mean - (1.5 - 200 * lr)) < 2e-4


def test_rounding_is_unbiased_and_lands_on_neighbours():
    x = jnp.full(100_000, 1.0 + ULP * 0.3, jnp.float32)
    rounded = round_stochastically(x, jnp.bfloat16, dither_bits(x.shape, jnp.uint32(0)))
    values = np.unique(np.asarray(rounded, np.float32))
    np.testing.assert_array_equal(values, [1.0, 1.0 + ULP])
    share_up = float(np.mean(np.asarray(rounded, np.float32) > 1.0))
    assert abs(share_up - 0.3) < 0.01


def neighbours(x: float, dtype) -> tuple[float, float]:
    """The values of ``dtype`` just below and just above ``x`` (NumPy)."""
    dtype = np.dtype(dtype)
    near = np.asarray(np.float32(x)).astype(dtype)
    if float(near) > x:
        return float(np.nextafter(near, np.asarray(-np.inf, dtype))), float(near)
    if float(near) < x:
        return float(near), float(np.nextafter(near, np.asarray(np.inf, dtype)))
    return float(near), float(near)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(
    "x",
    [
        1.0 + 2.0**-10,  # within [1, 2)
        -(1.0 + 2.0**-9),  # negative
        1.0 - 2.0**-12,  # just below a power of two: a smaller gap
        0.3 * 2.0**-24,  # float16's subnormals
        -2.6 * 2.0**-24,
        0.99 * 2.0**-14,  # float16's largest subnormal and smallest normal
        -123.456,
        65490.0,  # float16's largest: 65504
    ],
)
def test_rounding_picks_the_two_neighbours_with_the_chances_of_a_mean_of_x(x, dtype):
    n = 200_000
    x32 = float(np.float32(x))
    low, high = neighbours(x32, dtype)
    rounded = jax.jit(lambda x, bits: round_stochastically(x, dtype, bits))(
        jnp.full(n, x32, jnp.float32), dither_bits((n,), jnp.uint32(11))
    )
    values = np.asarray(rounded, np.float64)
    assert set(np.unique(values)) <= {low, high}
    if high > low:
        chance = (x32 - low) / (high - low)
        sigma = (high - low) * np.sqrt(chance * (1 - chance) / n)
        assert abs(values.mean() - x32) < 5 * sigma + 1e-3 * (high - low)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_values_of_the_narrow_type_are_kept_whatever_the_draw(dtype):
    # Every bit pattern of the type but NaNs, subnormals included: a zero
    # update leaves a parameter as it is. (A sum rounded in float32 before
    # its floor once moved float16's subnormals up, 2**-15 of the draws.)
    patterns = np.arange(2**16, dtype=np.uint16)
    values = patterns.view(np.dtype(dtype)).astype(np.float32)
    values = np.tile(values[~np.isnan(values)], 32)  # 2**21 draws
    bits = dither_bits(values.shape, jnp.uint32(1))
    rounded = jax.jit(lambda x, b: round_stochastically(x, dtype, b))(
        jnp.asarray(values), bits
    )
    np.testing.assert_array_equal(np.asarray(rounded, np.float32), values)


def test_same_seed_same_run_other_seed_other_run():
    start = jnp.full(512, 1.5, jnp.bfloat16)
    a, _ = train(adamax(ULP / 4, stochastic_rounding=True, rounding_seed=3), start, 50)
    b, _ = train(adamax(ULP / 4, stochastic_rounding=True, rounding_seed=3), start, 50)
    c, _ = train(adamax(ULP / 4, stochastic_rounding=True, rounding_seed=4), start, 50)
    np.testing.assert_array_equal(a, b)
    assert np.any(np.asarray(a) != np.asarray(c))


def test_the_key_advances_once_per_update_not_per_micro_step():
    params = jnp.full(64, 1.5, jnp.bfloat16)
    tx = adamax(ULP, stochastic_rounding=True, gradient_accumulation_steps=2)
    state = tx.init(params)
    keys = []
    for _ in range(4):
        _, state = tx.update(jnp.ones(64), state, params)
        keys.append(np.asarray(find_states(state, StochasticRoundingState)[0].key))
    np.testing.assert_array_equal(
        keys[0],
        np.asarray(find_states(tx.init(params), StochasticRoundingState)[0].key),
    )
    assert np.any(keys[1] != keys[0])
    np.testing.assert_array_equal(keys[2], keys[1])
    assert np.any(keys[3] != keys[2])


def test_checkpoint_keeps_the_key(tmp_path):
    start = jnp.full(512, 1.5, jnp.bfloat16)
    tx = adamax(ULP / 4, stochastic_rounding=True)
    straight, _ = train(tx, start, 20)
    half, state = train(tx, start, 10)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", {"params": half, "opt": state})
    checkpointer.wait_until_finished()
    target = jax.tree.map(
        ocp.utils.to_shape_dtype_struct, {"params": start, "opt": tx.init(start)}
    )
    restored = checkpointer.restore(tmp_path / "ckpt", target)
    params, state = restored["params"], restored["opt"]
    step = jax.jit(tx.update)
    for _ in range(10):
        updates, state = step(jnp.ones(512), state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params, straight)


def test_float32_parameters_warn_that_it_has_no_effect():
    tx = adamax(stochastic_rounding=True)
    with pytest.warns(UserWarning, match="stochastic_rounding=True.*no effect"):
        tx.init({"w": jnp.zeros(3)})


def test_float32_leaves_beside_bfloat16_ones_are_unchanged():
    params = {"low": jnp.full(64, 1.5, jnp.bfloat16), "full": jnp.full(64, 1.5)}
    grads = [{"low": jnp.ones(64), "full": jnp.ones(64)}] * 5
    ours, _ = train(adamax(1e-3, stochastic_rounding=True), params, 5, grads)
    plain, _ = train(adamax(1e-3), params, 5, grads)
    np.testing.assert_array_equal(ours["full"], plain["full"])


def test_seed_without_the_option_warns_and_a_bad_seed_is_refused():
    with pytest.warns(UserWarning, match="rounding_seed=5.*stochastic_rounding"):
        adamax(rounding_seed=5)
    with pytest.raises(ValueError, match="rounding_seed"):
        adamax(stochastic_rounding=True, rounding_seed=-1)
    # Without 64-bit mode jax keeps a seed's low 32 bits: 2**32 + 5 would be 5.
    adamax(stochastic_rounding=True, rounding_seed=2**32 - 1)
    with pytest.raises(
        ValueError, match=r"below 2\*\*32. Received: rounding_seed=4294967301"
    ):
        adamax(stochastic_rounding=True, rounding_seed=2**32 + 5)
    with pytest.raises(TypeError, match="stochastic_rounding"):
        adamax(stochastic_rounding="yes")


def test_the_ema_averages_the_rounded_weights():
    # Rounding runs before the EMA: with momentum 0, the average is the
    # weights themselves, as rounded (not their round-to-nearest value).
    start = jnp.full(4096, 1.5, jnp.bfloat16)
    lr, f32 = ULP / 4, jnp.float32
    tx = adamax(
        lr, state_dtype=f32, stochastic_rounding=True, use_ema=True, ema_momentum=0.0
    )
    params, state = train(tx, start, 100)
    ema = np.asarray(find_states(state, ParameterEMAState)[0].ema, np.float32)
    np.testing.assert_array_equal(ema, np.asarray(params, np.float32))
    assert abs(float(ema.mean()) - (1.5 - 100 * lr)) < 0.005


def test_float16_updates_below_its_smallest_step_are_not_lost():
    # At 2**-10 float16's unit is 2**-20 (about 9.5e-7); an update of 2.5e-8 is
    # below float16's smallest subnormal, so rounded to float16 before the
    # rounding it would be 0. Computed in float32, it moves the parameter by
    # its size on average.
    start = jnp.full(4096, 2.0**-10, jnp.float16)
    lr, f32 = 2.5e-8, jnp.float32
    nearest, _ = train(adamax(lr, state_dtype=f32), start, 1000)
    stochastic, _ = train(
        adamax(lr, state_dtype=f32, stochastic_rounding=True), start, 1000
    )
    np.testing.assert_array_equal(nearest, start)
    moved = 2.0**-10 - float(np.mean(np.asarray(stochastic, np.float64)))
    # Each element moves by 1000 coin flips of one unit: the mean of 4096 is
    # within 5% of 1000 * lr (about 5 sigma).
    assert abs(moved / (1000 * lr) - 1) < 0.05


def test_the_update_reaches_the_rounding_in_float32():
    # The first step from a NumPy reference (m = (1 - b1) g, u = |g|): the
    # decay, far below bfloat16's unit beside the direction, is kept.
    params = jnp.asarray([1.5, -0.75, 3.0, 0.1], jnp.bfloat16)
    grads = jnp.asarray([0.3, -2.0, 1e-3, 5.0], jnp.float32)
    lr, wd = 1e-3, 2e-3
    tx = optax.chain(
        scale_by_keras_adamax(state_dtype=jnp.float32, full_precision_updates=True),
        decoupled_weight_decay(wd),
        scale_by_keras_learning_rate(lr),
    )
    updates, _ = tx.update(grads, tx.init(params), params)
    assert updates.dtype == jnp.float32
    g = np.asarray(grads.astype(jnp.bfloat16), np.float64)  # Keras' cast
    w = np.asarray(params, np.float64)
    expected = -lr * (g / (np.abs(g) + 1e-7) + wd * w)
    np.testing.assert_allclose(np.asarray(updates), expected, rtol=1e-6)
    # Without it, in the parameter's dtype: the first element's decay, 0.3% of
    # its direction, is below bfloat16's unit (0.8%) there and is lost.
    plain = optax.chain(
        scale_by_keras_adamax(state_dtype=jnp.float32),
        decoupled_weight_decay(wd),
        scale_by_keras_learning_rate(lr),
    )
    rounded, _ = plain.update(grads, plain.init(params), params)
    assert rounded.dtype == jnp.bfloat16
    assert float(rounded[0]) == float(jnp.asarray(-lr, jnp.bfloat16))


def test_infinite_and_nan_parameters_stay_as_they_are():
    params = jnp.asarray([np.inf, -np.inf, np.nan, 1.5], jnp.bfloat16)
    grads = jnp.ones(4)
    for options in ({}, {"stochastic_rounding": True}):
        tx = adamax(0.05, **options)
        updates, _ = tx.update(grads, tx.init(params), params)
        new = np.asarray(optax.apply_updates(params, updates), np.float32)
        np.testing.assert_array_equal(new[:3], [np.inf, -np.inf, np.nan])
        assert 1.44 < new[3] < 1.46  # 1.5 - 0.05, to one of bfloat16's neighbours


def test_the_key_is_threefry_whatever_the_default_prng():
    params = jnp.full(512, 1.5, jnp.bfloat16)
    tx = adamax(ULP / 4, stochastic_rounding=True, rounding_seed=7)
    expected, _ = train(tx, params, 3)
    previous = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")
    try:
        state = tx.init(params)
        key = find_states(state, StochasticRoundingState)[0].key
        assert key.shape == (2,) and key.dtype == jnp.uint32
        ours, _ = train(tx, params, 3)
    finally:
        jax.config.update("jax_default_prng_impl", previous)
    np.testing.assert_array_equal(ours, expected)
