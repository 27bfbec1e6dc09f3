"""8-bit Adamax state: the encoding against a NumPy reference, and the optimizer
with it against the optimizer with float32 state."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from adamax_optax import (
    ScaleByKerasAdamaxState,
    _grouping,
    adamax,
    from_config,
    get_config,
    migrate_state,
    scale_by_keras_adamax,
    to_keras_optimizer,
)
from adamax_optax import _quantization as q8
from adamax_optax._adamax import encoded_moments
from adamax_optax._common import find_states
from adamax_optax._dither import dither_bits

BLOCK = 256


def reference_encode(m: np.ndarray, u: np.ndarray, block: int = BLOCK):
    """The encoding as the Memory page writes it, rounded to nearest, in NumPy
    (float64): ``(u codes, m codes, scales)``, for finite moments."""
    blocks_u = u.reshape(*u.shape[:-1], -1, block).astype(np.float64)
    blocks_m = m.reshape(*m.shape[:-1], -1, block).astype(np.float64)
    scale = blocks_u.max(axis=-1, keepdims=True)
    ratio = np.where(scale > 0, blocks_u / np.where(scale > 0, scale, 1), 0)
    mantissa, exponent = np.frexp(ratio)  # ratio = mantissa * 2**exponent
    octave = exponent - 1  # ratio = 2**octave * (1 + x)
    steps = np.floor((2 * mantissa - 1) * 16 + 0.5)  # nearest sixteenth
    octave = np.where(steps == 16, octave + 1, octave)
    steps = np.where(steps == 16, 0, steps)
    k = 16 * (octave + 15) + steps + 15
    k = np.where(ratio > 0, np.clip(k, 0, 255), 0).astype(np.int64)
    ratio_m = np.where(blocks_u > 0, blocks_m / np.where(blocks_u > 0, blocks_u, 1), 0)
    j = np.clip(np.floor(ratio_m * 127 + 0.5), -127, 127).astype(np.int64)
    return k.reshape(u.shape), j.reshape(m.shape), scale[..., 0]


def reference_decode_u(k: np.ndarray, scale: np.ndarray) -> np.ndarray:
    octave, steps = (k - 15) // 16 - 15, (k - 15) % 16
    return np.where(k > 0, scale * 2.0**octave * (1 + steps / 16), 0.0)


def sample(shape, seed=0):
    """``u`` spanning eight decades, ``m`` within ``[-u, u]``."""
    rng = np.random.default_rng(seed)
    u = 10.0 ** rng.uniform(-6, 2, size=shape)
    m = u * rng.uniform(-1, 1, size=shape)
    return m.astype(np.float32), u.astype(np.float32)


def encode_nearest(m, u, block=BLOCK):
    m, u = jnp.asarray(m), jnp.asarray(u)
    return q8.encode(m, u, q8.block_scale(u, block, jnp.zeros([])))  # finite


def split_codes(moments):
    codes = np.asarray(moments.codes).astype(np.int64)
    return codes >> 8, (codes & 0xFF).astype(np.uint8).view(np.int8).astype(np.int64)


def test_codes_match_the_numpy_reference():
    m, u = sample((16, 1024))
    k, j = split_codes(encode_nearest(m, u))
    k_ref, j_ref, _ = reference_encode(m, u)
    np.testing.assert_array_equal(k, k_ref)
    # m's code is rounded from a float32 ratio (float64 here): a tie may fall
    # either way.
    assert np.max(np.abs(j - j_ref)) <= 1
    assert np.mean(j != j_ref) < 1e-3


def test_every_m_code_is_written_exactly():
    """Each of ``m``'s 255 codes from a ratio a quarter step above it (to
    nearest: that code), a ratio beyond 1 either way (clipped to 127) and
    ``-0.0`` (0): the signed byte read back is the code itself."""
    codes = np.arange(-127, 128)
    ratios = np.concatenate(
        [(codes + 0.25) / 127, [1.5], [-0.0, -1.5, -0.25 / 127], np.zeros(253)]
    )
    expected = np.concatenate([codes, [127], [0, -127, 0], np.zeros(253)])
    u = np.ones((2, BLOCK), np.float32)
    m = ratios.reshape(2, BLOCK).astype(np.float32)
    _, j = split_codes(encode_nearest(m, u))
    np.testing.assert_array_equal(j, expected.reshape(2, BLOCK))


def reference_dither(shape: tuple[int, ...], count: int, salt: int) -> np.ndarray:
    """The rounding draws as ``dither_bits``' docstring writes them, in NumPy:
    the element's row-major position and a key of the count and the salt,
    mixed by Wellons' triple32 (uint32 arithmetic, wrapping)."""
    with np.errstate(over="ignore"):
        position = np.arange(np.prod(shape), dtype=np.uint32).reshape(shape)
        key = np.uint32(count) * np.uint32(0x85EBCA77) + np.uint32(
            (salt * 0xC2B2AE3D) % 2**32
        )
        h = position ^ key
        h ^= h >> np.uint32(17)
        h *= np.uint32(0xED5EB4FB)
        h ^= h >> np.uint32(11)
        h *= np.uint32(0xAC4C1B51)
        h ^= h >> np.uint32(15)
        h *= np.uint32(0x31848BAB)
        return h ^ (h >> np.uint32(14))


@pytest.mark.parametrize(
    "shape", [(4096,), (4, 3, 64), (3, 16, 256), (5, 7, 100), (2, 4100)]
)
def test_rounding_draws_are_the_hash_of_the_row_major_position(shape):
    # The position is built from runs of up to 256 where the last axis
    # allows (the first three shapes), from the axis' own index where it
    # does not.
    draws = jax.jit(lambda c: dither_bits(shape, c, 3))(jnp.int32(5))
    np.testing.assert_array_equal(np.asarray(draws), reference_dither(shape, 5, 3))


def test_stochastic_codes_round_up_with_the_chance_of_the_fraction():
    """``u`` three tenths of a step above its code 212 (``2**-3 * (1 + 5/16)``
    of its block's scale) and ``m / u = 40.3 / 127``: over 256K elements
    each code rounds up in 30% of them, the two independently, and over 400
    steps each element rounds up in 30% of them (binomially spread: the
    draws of one element are not the same from step to step)."""
    u_value = 2.0**-3 * (1 + 5.3 / 16)
    u = np.full((64, 4096), u_value, np.float32)
    u[:, ::BLOCK] = 1.0  # each block's scale
    m = (u * np.float32(40.3 / 127)).astype(np.float32)
    inside = np.ones(u.shape, bool)
    inside[:, ::BLOCK] = False
    scale = jnp.ones((64, 4096 // BLOCK))

    @jax.jit
    def codes(count, m, u):
        return q8.encode(m, u, scale, dither_bits(m.shape, count, 0))

    k, j = split_codes(codes(jnp.int32(7), jnp.asarray(m), jnp.asarray(u)))
    k, j = k[inside], j[inside]
    assert set(np.unique(k)) == {212, 213} and set(np.unique(j)) == {40, 41}
    u_up, m_up = k == 213, j == 41
    assert abs(u_up.mean() - 0.3) < 0.005 and abs(m_up.mean() - 0.3) < 0.005
    assert abs((u_up & m_up).mean() - 0.09) < 0.005

    few_m, few_u = jnp.asarray(m[:4, :BLOCK]), jnp.asarray(u[:4, :BLOCK])
    few_scale = jnp.ones((4, 1))

    @jax.jit
    def steps(counts):
        def one(count):
            moments = q8.encode(
                few_m, few_u, few_scale, dither_bits(few_m.shape, count, 0)
            )
            return moments.codes

        return jax.vmap(one)(counts)

    words = np.asarray(steps(jnp.arange(1, 401))).astype(np.int64)[:, :, 1:]
    for up in ((words >> 8) == 213, (words & 0xFF) == 41):
        per_element = up.mean(axis=0)  # over the 400 steps
        assert abs(per_element.mean() - 0.3) < 0.01
        assert 0.017 < per_element.std() < 0.03  # binomial: 0.023
        # One step's draw and the next, per element (independent: within
        # 0.05 of 0 each, 0.003 on average)
        centred = up - up.mean(axis=0)
        lag_1 = (centred[1:] * centred[:-1]).mean(axis=0) / centred.var(axis=0)
        assert abs(lag_1.mean()) < 0.015 and np.max(np.abs(lag_1)) < 0.3


@pytest.mark.parametrize("stride", [1, 2, 34, 55, 89, 144, 233, 377, 610, 987])
def test_rounding_draws_of_elements_some_strides_apart_are_uncorrelated(stride):
    """The draws of one step at a stride, including the Fibonacci ones, where
    a hash of one multiply (a Weyl sequence along the positions) draws alike:
    correlations within 0.02 of 0 over 2**20 elements (the standard error is
    0.001)."""
    draws = np.asarray(
        jax.jit(lambda c: dither_bits((1024, 1024), c, 3))(jnp.int32(9))
    ).ravel()
    m_draw = draws.view(np.int32).astype(np.float64)
    u_draw = (draws & 0x7FFFF).astype(np.float64)
    for x in (m_draw, u_draw):
        assert abs(np.corrcoef(x[:-stride], x[stride:])[0, 1]) < 0.02


@pytest.mark.parametrize("distance", [2**8, 2**10, 2**16, 2**21])
def test_rounding_draws_of_positions_a_power_of_two_apart_are_independent(distance):
    """A hash whose multiplies only carry upward relates the draws of
    positions ``2**k`` apart: their differences' low 16 bits, uniform for
    independent draws, were far from it (chi-square in the hundreds of
    thousands where 255 is expected). Also between steps ``2**k`` apart."""
    draws = np.asarray(
        jax.jit(lambda c: dither_bits((2**23,), c, 3))(jnp.int32(9))
    ).astype(np.int64)
    later = np.asarray(
        jax.jit(lambda c: dither_bits((2**16,), c, 3))(jnp.int32(9 + distance))
    ).astype(np.int64)
    for first, second in (
        (draws[:-distance], draws[distance:]),
        (draws[: 2**16], later),
    ):
        difference = (second - first) % 2**16 >> 8  # 256 bins
        counts = np.bincount(difference, minlength=256)
        expected = len(difference) / 256
        chi_square = ((counts - expected) ** 2 / expected).sum()
        assert chi_square < 400  # 255 degrees of freedom: p < 1e-7 beyond


def test_block_maxima_of_every_sign_and_special_value():
    """Each block's largest ``|x|``, from the integer maxima of the bits,
    against NumPy's: blocks all negative, all positive, mixed, of zeros of
    both signs, with an infinity of either sign, with a NaN of either sign
    (kept), and float32's largest and smallest numbers."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(9, 64)).astype(np.float32)
    x[0] = -np.abs(x[0])
    x[1] = np.abs(x[1])
    x[2] = np.where(np.arange(64) % 2, 0.0, -0.0)
    x[3, 5] = -np.inf
    x[4, 9] = np.inf
    x[5, 3] = np.nan
    x[6, 3] = -np.nan
    x[7, 0], x[7, 1] = -np.finfo(np.float32).max, np.finfo(np.float32).tiny
    x[8] = -1e-42  # subnormal
    got = np.asarray(jax.jit(lambda x: q8.block_max_abs(x, 32))(jnp.asarray(x)))
    with np.errstate(invalid="ignore"):
        want = np.abs(x).reshape(9, 2, 32).max(axis=-1)
    np.testing.assert_array_equal(got, want)
    assert np.signbit(got[2]).sum() == 0  # +0, not -0


def test_maximum_of_nonnegative_is_the_float_maximum():
    """Non-negative floats, infinity and NaN: the integer maximum of the bits
    is NumPy's float maximum, a NaN kept whichever side it is on."""
    values = np.array(
        [0.0, 1e-42, np.finfo(np.float32).tiny, 0.5, 1.0, 3e38, np.inf, np.nan],
        np.float32,
    )
    a, b = np.meshgrid(values, values)
    got = np.asarray(jax.jit(q8.maximum_of_nonnegative)(a, b))
    np.testing.assert_array_equal(got, np.maximum(a, b))


def test_round_trip_error_is_bounded_per_block():
    m, u = sample((16, 1024), seed=1)
    m_back, u_back = map(np.asarray, q8.decode(encode_nearest(m, u)))
    scale = u.reshape(16, -1, BLOCK).max(-1, keepdims=True)
    in_range = u.reshape(16, -1, BLOCK) >= scale * 2.0**-15
    relative = np.abs(u_back / u - 1).reshape(16, -1, BLOCK)
    assert np.max(relative[in_range]) <= 1 / 32 + 1e-6  # half a sixteenth
    # m: its ratio to u (Adamax's direction) to half a step of 1/127.
    ratio = np.where(u_back > 0, m_back / np.where(u_back > 0, u_back, 1), 0)
    kept = u_back > 0
    assert np.all(np.abs(ratio - m / u)[kept] <= 1 / 254 * (1 + 1e-4))


def test_zero_block_decodes_to_zero():
    moments = encode_nearest(np.zeros((2, 512), np.float32), np.zeros((2, 512)))
    m, u = q8.decode(moments)
    assert not np.any(np.asarray(moments.codes))
    np.testing.assert_array_equal(np.asarray(m), 0.0)
    np.testing.assert_array_equal(np.asarray(u), 0.0)


@pytest.mark.parametrize("huge", [1e30, 2.0**126, 1e38, 3.4e38])
def test_one_huge_value_keeps_itself_and_zeroes_what_is_out_of_range(huge):
    # Above 2**126 the scale's reciprocal would be subnormal (flushed to 0):
    # the scale stops there, and m keeps its ratio to u.
    u = np.ones((1, BLOCK), np.float32)
    u[0, 7] = huge
    u[0, 9] = huge / 1000
    m = -u
    m_back, u_back = map(np.asarray, q8.decode(encode_nearest(m, u)))
    assert u_back[0, 7] == np.float32(min(huge, 2.0**126))
    assert m_back[0, 7] == -u_back[0, 7]
    # 1/1000 is 2**-9.97: within 3.1% (to nearest), m's ratio exact.
    np.testing.assert_allclose(u_back[0, 9], huge / 1000, rtol=0.031)
    np.testing.assert_allclose(m_back[0, 9], -u_back[0, 9], rtol=1e-6)
    others = (np.arange(BLOCK) != 7) & (np.arange(BLOCK) != 9)
    np.testing.assert_array_equal(u_back[0, others], 0.0)  # below 2**-16 of it
    np.testing.assert_array_equal(m_back[0, others], 0.0)
    assert np.all(np.isfinite(m_back)) and np.all(np.isfinite(u_back))


def run(tx, params, grads):
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in grads:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def problem(steps=60, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"w": (64, 512), "v": (8, 1024), "bias": (512,)}
    params = {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in shapes.items()}
    grads = [
        {
            k: jnp.asarray(rng.normal(size=s) * (1 + rng.uniform(size=s[-1])), dtype)
            for k, s in shapes.items()
        }
        for _ in range(steps)
    ]
    return params, grads


def _largest_ratio(beta_1: float, beta_2: float, steps: int = 3000) -> float:
    """The largest |m| / u of float64 Adamax moments over a gradient that
    shrinks by beta_2 a step, which keeps every past |g| on u's bound."""
    m = u = 0.0
    largest = 0.0
    for t in range(steps):
        g = beta_2**t
        if g < 1e-200:
            break
        m = beta_1 * m + (1 - beta_1) * g
        u = max(beta_2 * u, g)
        largest = max(largest, m / u)
    return largest


@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.9, 0.99), (0.9, 0.9), (0.95, 0.9)])
@pytest.mark.parametrize("form", [float, np.asarray, jnp.float32])
def test_betas_that_let_m_outgrow_u_are_refused(betas, form):
    # Their ratio is above 1.01 (NumPy, from Adamax's recursions): the
    # encoding's [-1, 1] would cap the direction.
    if betas[0] < betas[1]:
        assert _largest_ratio(*betas) > 1.01
    with pytest.raises(ValueError, match=r"ratio to `u`.* beta_1=.* beta_2="):
        adamax(beta_1=form(betas[0]), beta_2=form(betas[1]), quantized_state=True)


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.0, 0.5), (0.0, 0.0), (0.5, 0.9999)])
def test_betas_that_keep_m_within_u_are_accepted(betas):
    assert _largest_ratio(*betas) <= 1.01
    adamax(beta_1=betas[0], beta_2=betas[1], quantized_state=True)


def test_state_layout_and_bytes():
    params = {"w": jnp.zeros((1024, 1024)), "bias": jnp.zeros(1024)}
    state = adamax(quantized_state=True).init(params)
    adamax_state = find_states(state, ScaleByKerasAdamaxState)[0]
    assert isinstance(adamax_state.m["w"], q8.Moments8Bit)
    assert adamax_state.m["w"].codes.dtype == jnp.uint16
    assert adamax_state.m["w"].scale.shape == (1024, 4)
    assert isinstance(adamax_state.u["w"], optax.MaskedNode)
    assert adamax_state.m["bias"].dtype == jnp.float32  # under 4096 elements
    moments_bytes = sum(
        x.nbytes for x in jax.tree.leaves((adamax_state.m, adamax_state.u))
    )
    assert moments_bytes / (1024 * 1024 + 1024) <= 2.1


def test_quantized_trajectory_stays_near_float_state():
    params, grads = problem()
    kwargs = dict(learning_rate=1e-2, weight_decay=0.01, global_clipnorm=50.0)
    ours, state = run(adamax(quantized_state=True, **kwargs), params, grads)
    reference, reference_state = run(adamax(**kwargs), params, grads)
    moved = jax.tree.map(lambda a, b: jnp.abs(a - b), reference, params)
    for key in params:
        error = np.abs(np.asarray(ours[key]) - np.asarray(reference[key]))
        # Within 8% of how far the float-state run moved each leaf, on pure
        # noise (measured: 5.9%; bfloat16 state: 1.1%).
        assert np.mean(error) <= 0.08 * float(np.mean(moved[key])), key
    np.testing.assert_array_equal(ours["bias"], reference["bias"])  # float state
    m, _ = find_states(state, ScaleByKerasAdamaxState)[0].moments()
    m_ref = find_states(reference_state, ScaleByKerasAdamaxState)[0].m
    assert np.max(np.abs(np.asarray(m["w"]) - np.asarray(m_ref["w"]))) < 0.1


def test_u_decays_on_average_below_a_code_step():
    # A decay of 0.1% a step is a 60th of a code: rounded to nearest it would
    # never move; rounded stochastically it follows beta_2 ** t on average.
    g = np.zeros((64, BLOCK), np.float32)
    g[:, 0] = 1.0  # each block's maximum, refreshed every step
    first = g.copy()
    first[:, 1:] = 0.25
    tx = scale_by_keras_adamax(quantized_state=True)
    state = tx.init(jnp.zeros((64, BLOCK)))
    step = jax.jit(tx.update)
    _, state = step(jnp.asarray(first), state)
    for _ in range(700):
        _, state = step(jnp.asarray(g), state)
    u = np.asarray(state.moments()[1])[:, 1:]
    expected = 0.25 * 0.999**700
    assert abs(u.mean() / expected - 1) < 0.02


def test_m_decays_to_zero_when_the_gradient_vanishes():
    # Rounded to nearest, m / u = 5/127 would round back to 5/127 (0.9 * 5 is
    # 4.5) and move the parameters by 4% of the learning rate for good.
    tx = scale_by_keras_adamax(quantized_state=True)
    state = tx.init(jnp.zeros((64, BLOCK)))
    step = jax.jit(tx.update)
    _, state = step(jnp.ones((64, BLOCK)), state)
    for _ in range(60):
        direction, state = step(jnp.zeros((64, BLOCK)), state)
    m, u = (np.asarray(x) for x in state.moments())
    assert np.mean(np.abs(m)) < 0.005  # float state: 0.1 * 0.9 ** 60 = 1.8e-4
    assert np.mean(np.abs(np.asarray(direction))) < 0.005
    np.testing.assert_allclose(u.mean(), 0.999**60, rtol=0.02)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_gradients_and_parameters(dtype):
    params, grads = problem(steps=30, dtype=dtype)
    ours, _ = run(adamax(1e-2, quantized_state=True), params, grads)
    reference, _ = run(adamax(1e-2, state_dtype=jnp.float32), params, grads)
    for key in params:
        assert ours[key].dtype == dtype
        moved = np.abs(
            np.asarray(reference[key], np.float32) - np.asarray(params[key], np.float32)
        )
        error = np.abs(
            np.asarray(ours[key], np.float32) - np.asarray(reference[key], np.float32)
        )
        assert np.mean(error) <= 0.08 * np.mean(moved), key  # measured: 5.4%


@pytest.mark.parametrize("at", [0, 1])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_nonfinite_gradient_makes_its_element_nan_as_float_state_does(bad, at):
    """The bad element at step ``at``, the rest of the gradient 2 there (1 at
    the other steps), so that the block's scale must grow past the old one."""
    params = {"w": jnp.ones((4, 1024))}
    g = np.full((4, 1024), 2.0, np.float32)
    g[2, 300] = bad
    grads = [{"w": jnp.ones((4, 1024))} for _ in range(3)]
    grads[at] = {"w": jnp.asarray(g)}
    ours, state = run(adamax(quantized_state=True), params, grads)
    theirs, float_state = run(adamax(), params, grads)
    # Float state: that element's parameter is NaN from then on.
    theirs, ours = np.asarray(theirs["w"]), np.asarray(ours["w"])
    assert np.isnan(theirs[2, 300]) and np.sum(np.isnan(theirs)) == 1
    # 8-bit state: the same element, and only it; the rest of its block moves
    # as float state moves it, to m's code (a 127th of the direction, whose
    # bias correction 1 - 0.9**t is 0.1, 0.19, 0.271: at most 1.5e-4 here).
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    finite = ~np.isnan(theirs)
    bound = 1e-3 / 127 * sum(1 / (1 - 0.9**t) for t in (1, 2, 3))
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=0, atol=bound)
    adamax_state = find_states(state, ScaleByKerasAdamaxState)[0]
    m, u = (np.asarray(x["w"]) for x in adamax_state.moments())
    _, float_u = find_states(float_state, ScaleByKerasAdamaxState)[0].moments()
    assert np.isnan(m[2, 300]) and np.isnan(u[2, 300])
    assert not np.isfinite(np.asarray(float_u["w"])[2, 300])
    outside = np.ones_like(u, bool)
    outside[2, 300] = False
    assert np.all(np.isfinite(u[outside])) and np.all(np.isfinite(m[outside]))


def test_m_overflowing_alone_is_marked_as_float_state_overflows():
    """A finite gradient near float32's largest, against an ``m`` of the
    other sign, overflows ``m`` (float32 state: ``m = inf``) while ``u`` stays
    finite: the element is marked not finite (read back as NaN), not kept as
    a finite ``m = u``."""
    params = {"w": jnp.zeros((16, 256))}
    grads = [jnp.full((16, 256), -3e38), jnp.full((16, 256), 3.4e38)]
    moments = {}
    for name, options in (("8-bit", dict(quantized_state=True)), ("float", {})):
        tx = adamax(1e-3, **options)
        state = tx.init(params)
        for g in grads:
            _, state = jax.jit(tx.update)({"w": g}, state, params)
        moments[name] = [np.asarray(x["w"]) for x in state["adamax"].moments()]
    m_float, u_float = moments["float"]
    assert np.all(np.isinf(m_float)) and np.all(np.isfinite(u_float))
    m_8bit, u_8bit = moments["8-bit"]
    assert np.all(np.isnan(m_8bit)) and np.all(np.isnan(u_8bit))


def migrated_and_read_back(m: np.ndarray, u: np.ndarray):
    """Float moments of shape ``(2, 512)`` encoded as ``migrate_state``
    encodes them, and decoded: ``(m, u)`` as NumPy arrays."""
    moments, _ = encoded_moments(
        {"w": jnp.asarray(m)}, {"w": jnp.asarray(u)}, {"w": q8.zeros((2, 512), BLOCK)}
    )
    return tuple(map(np.asarray, q8.decode(moments["w"])))


def test_nonfinite_float_moments_encode_as_nan():
    """``migrate_state`` from a float state whose moments hold a NaN or an
    infinity: those elements read back as NaN, the rest of their block as
    the finite moments encode alone."""
    m, u = sample((2, 512), seed=4)
    bad_m, bad_u = m.copy(), u.copy()
    bad_m[1, 3], bad_u[1, 3] = np.nan, np.nan
    bad_u[0, 7] = np.inf
    bad_m[0, 20] = -np.inf  # beside a finite u
    m_back, u_back = migrated_and_read_back(bad_m, bad_u)
    finite_u = np.where(np.isfinite(bad_u), bad_u, 0)
    k_ref, _, scale_ref = reference_encode(m, finite_u)
    u_ref = reference_decode_u(k_ref, np.repeat(scale_ref, BLOCK, axis=-1))
    assert np.isnan(m_back[1, 3]) and np.isnan(u_back[1, 3])
    assert np.isnan(m_back[0, 7]) and np.isnan(u_back[0, 7])
    assert np.isnan(m_back[0, 20]) and np.isnan(u_back[0, 20])
    assert np.sum(np.isnan(u_back)) == 3
    others = ~np.isnan(u_back)
    np.testing.assert_allclose(u_back[others], u_ref[others], rtol=1e-6)


def test_encoding_a_float_pair_with_u_of_zero_or_below_reads_as_zeros():
    """A float state's ``u`` of 0, -0.0 or below 0 (no Adamax state holds one
    below 0) beside any ``m``: read back as ``m = u = 0``, the rest of the
    block as the NumPy reference encodes it; ``u = -inf`` is marked, as any
    moment that is not finite."""
    m, u = sample((2, 512), seed=4)
    bad_m, bad_u = m.copy(), u.copy()
    cells = [(0, 3), (0, 4), (1, 5), (1, 6), (1, 7)]
    for (row, col), (m_value, u_value) in zip(
        cells,
        [(0.3, -0.0), (-0.3, -0.0), (0.2, -0.5), (-1e-3, 0.0), (-0.0, -0.0)],
        strict=True,
    ):
        bad_m[row, col], bad_u[row, col] = m_value, u_value
    m_back, u_back = migrated_and_read_back(bad_m, bad_u)
    for cell in cells:
        assert m_back[cell] == 0 and u_back[cell] == 0, cell
    zeroed_m, zeroed_u = bad_m.copy(), bad_u.copy()
    for cell in cells:
        zeroed_m[cell], zeroed_u[cell] = 0.0, 0.0
    k_ref, _, scale_ref = reference_encode(zeroed_m, zeroed_u)
    u_ref = reference_decode_u(k_ref, np.repeat(scale_ref, BLOCK, axis=-1))
    np.testing.assert_allclose(u_back, u_ref, rtol=1e-6)
    # an infinite u below 0 is not finite: marked, as any infinity is
    bad_u[1, 9] = -np.inf
    m_marked, u_marked = migrated_and_read_back(bad_m, bad_u)
    assert np.isnan(m_marked[1, 9]) and np.isnan(u_marked[1, 9])
    assert np.sum(np.isnan(u_marked)) == 1


def test_migrates_between_float_and_8bit_state():
    params, grads = problem(steps=20)
    _, float_state = run(adamax(), params, grads)
    quantized = adamax(quantized_state=True)
    state = migrate_state(quantized, float_state, params)
    _, u = find_states(state, ScaleByKerasAdamaxState)[0].moments()
    reference = find_states(float_state, ScaleByKerasAdamaxState)[0]
    k_ref, j_ref, _ = reference_encode(
        np.asarray(reference.m["w"]), np.asarray(reference.u["w"])
    )
    k, j = split_codes(find_states(state, ScaleByKerasAdamaxState)[0].m["w"])
    np.testing.assert_array_equal(k, k_ref)
    assert np.max(np.abs(j - j_ref)) <= 1
    np.testing.assert_allclose(u["w"], reference.u["w"], rtol=1 / 32)
    back = migrate_state(adamax(), state, params)
    assert find_states(back, ScaleByKerasAdamaxState)[0].m["w"].dtype == jnp.float32
    again = migrate_state(quantized, back, params)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)  # decoding and encoding again is exact


def test_checkpoint_restores_and_resumes_bit_identically(tmp_path):
    params, grads = problem(steps=12)
    tx = adamax(1e-2, quantized_state=True, gradient_accumulation_steps=2)
    straight, straight_state = run(tx, params, grads)
    half, half_state = run(tx, params, grads[:5])
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", {"params": half, "opt": half_state})
    checkpointer.wait_until_finished()
    target = {"params": params, "opt": tx.init(params)}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = checkpointer.restore(tmp_path / "ckpt", abstract)
    state, resumed = restored["opt"], restored["params"]
    step = jax.jit(tx.update)
    for g in grads[5:]:
        updates, state = step(g, state, resumed)
        resumed = optax.apply_updates(resumed, updates)
    for a, b in zip(
        jax.tree.leaves((straight, straight_state)),
        jax.tree.leaves((resumed, state)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("quantized", [True, False])
def test_a_state_restored_without_a_target_migrates(tmp_path, quantized, monkeypatch):
    """orbax restores a state without a target as plain containers: 8-bit
    moments as ``{"codes", "scale"}`` dicts, ``u``'s ``MaskedNode`` as
    ``None``, a grouped view as a dict of its parts keyed by the leaves each
    holds. ``migrate_state``
    reads them back: to the same optimizer exactly the state saved, to the
    other form as the live state migrates."""
    monkeypatch.setattr(_grouping, "MIN_SHARED", 2)  # "stack" stands for many
    params = {
        "w": jnp.ones((64, 512)),
        "b": jnp.ones((512,)),
        "stack": [jnp.full((64, 128), 1.0 + i) for i in range(3)],
    }
    grads = jax.tree.map(lambda x: 0.3 * x, params)
    tx = adamax(1e-2, quantized_state=quantized)
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update(grads, state, params)
    assert _grouping.layout_in(state) is not None  # the stack is grouped
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "ckpt")  # plain containers
    # "b", the stack (leaves 1 to 3), "w", in the order of their flattening
    assert sorted(restored["adamax"]["m"]) == ["part0_m0", "part1_m1to3", "part2_m4"]
    same = migrate_state(tx, restored, params)
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    other = adamax(1e-2, quantized_state=not quantized)
    expected = migrate_state(other, state, params)
    got = migrate_state(other, restored, params)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)


def test_config_round_trip_keeps_the_options():
    tx = adamax(quantized_state=True, quantized_block_size=128)
    config = get_config(tx)
    assert config["quantized_state"] is True and config["quantized_block_size"] == 128
    rebuilt = from_config(config)
    state = rebuilt.init({"w": jnp.zeros((64, 512))})
    assert find_states(state, ScaleByKerasAdamaxState)[0].m["w"].block == 128


def test_keras_export_refuses_it_by_name():
    keras = pytest.importorskip("keras")
    tx = adamax(quantized_state=True)
    params = [jnp.zeros((64, 128))]
    variables = [keras.Variable(np.zeros((64, 128), np.float32))]
    with pytest.raises(ValueError, match="quantized_state"):
        to_keras_optimizer(tx, tx.init(params), variables)


def test_complex_parameters_are_refused_at_init():
    tx = adamax(quantized_state=True)
    with pytest.raises(TypeError, match=r"quantized_state.*'w'"):
        tx.init({"w": jnp.zeros((64, 128), jnp.complex64)})


@pytest.mark.parametrize("bad", [0, -256])
def test_block_size_must_be_positive(bad):
    with pytest.raises(ValueError, match=f"quantized_block_size={bad}"):
        adamax(quantized_state=True, quantized_block_size=bad)


@pytest.mark.parametrize("bad", [2.5, True, "256"])
def test_block_size_must_be_an_integer(bad):
    with pytest.raises(TypeError, match="quantized_block_size"):
        adamax(quantized_state=True, quantized_block_size=bad)


def test_block_size_without_quantized_state_warns():
    with pytest.warns(UserWarning, match="quantized_block_size=128.*quantized_state"):
        adamax(quantized_block_size=128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adamax(quantized_state=True, quantized_block_size=128)


def test_a_leaf_without_a_fitting_block_keeps_float_state():
    # 4099 is prime: its only divisors are 1 and itself.
    state = scale_by_keras_adamax(quantized_state=True).init(jnp.zeros((2, 4099)))
    assert state.m.dtype == jnp.float32


def test_equal_leaves_stack_their_8bit_state_and_read_back_per_leaf(monkeypatch):
    # Three leaves of 8192 elements share a shape: one stacked part (stacked
    # from 2 leaves a shape, as a deep model's hundreds are).
    monkeypatch.setattr(_grouping, "MIN_SHARED", 2)
    params = {f"layer_{i}": jnp.full((64, 128), 0.1 * i) for i in range(3)}
    rng = np.random.default_rng(5)
    grads = [
        {k: jnp.asarray(rng.normal(size=(64, 128)), jnp.float32) for k in params}
        for _ in range(10)
    ]
    tx = adamax(1e-2, quantized_state=True)
    state = tx.init(params)
    m = find_states(state, ScaleByKerasAdamaxState)[0].m
    assert isinstance(m, _grouping.Grouped) and len(m.parts) == 1
    assert m.parts[0].codes.shape == (3, 64, 128)
    assert m.parts[0].scale.shape == (3, 64, 1)  # blocks never span two leaves
    ours, state = run(tx, params, grads)
    # Each leaf alone (no stacking: its own shape) moves as it does stacked,
    # but for the rounding draws, which depend on the position.
    for key in params:
        alone, _ = run(
            adamax(1e-2, quantized_state=True), params[key], [g[key] for g in grads]
        )
        moved = np.mean(np.abs(np.asarray(alone) - np.asarray(params[key])))
        assert np.mean(np.abs(np.asarray(ours[key]) - np.asarray(alone))) < 0.1 * moved
    # Per leaf, through migrate_state's ungrouping, and back: the same codes.
    stacked = find_states(state, ScaleByKerasAdamaxState)[0].m
    per_leaf = _grouping.ungroup(stacked)
    np.testing.assert_array_equal(
        per_leaf["layer_1"].codes, np.asarray(stacked.parts[0].codes)[1]
    )
    np.testing.assert_array_equal(
        per_leaf["layer_2"].scale, np.asarray(stacked.parts[0].scale)[2]
    )
    again = migrate_state(tx, migrate_state(adamax(1e-2), state, ours), ours)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
