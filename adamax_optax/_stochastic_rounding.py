"""Stochastic rounding of low-precision parameters."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamax_optax import _common, _runner, _validation
from adamax_optax._dither import dither_bits

LOW_PRECISION = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


class StochasticRoundingState(NamedTuple):
    """State of :func:`stochastic_rounding`.

    Attributes:
      key: the PRNG key of the next update, as ``jax.random.key_data``
        (``uint32[2]``): an ordinary array, saved and restored with the state.
    """

    key: jax.Array


def round_stochastically(x: jax.Array, dtype: Any, bits: jax.Array) -> jax.Array:
    """``x`` (float32) rounded to ``dtype`` (bfloat16 or float16) up or down at
    random, with the chances that make it exact on average: ``E[round(x)] = x``.
    ``bits``: 32 random bits per element (uint32).

    A value of the narrow type is a float32 with its low ``23 - mantissa``
    bits zero. Adding a random number below that unit to ``x``'s bits and
    clearing them rounds the magnitude up with the chance of the cleared bits'
    share of the unit (a carry runs into the exponent, as the next value up
    does): integer operations, where comparing against the neighbours found by
    ``nextafter`` took several times as long. float16's subnormals, below
    ``2**-14``, are multiples of ``2**-24``: there ``x * 2**24`` is rounded
    up where a uniform draw falls below the fraction. Beyond the type's
    largest value, and for infinities and NaN, ``x`` is rounded to nearest,
    as without the option.
    """
    info = jnp.finfo(dtype)
    cleared = 23 - int(info.nmant)
    whole = jax.lax.bitcast_convert_type(x, jnp.uint32)
    unit_mask = jnp.uint32(2**32 - 2**cleared)
    carried = (whole + (bits >> (32 - cleared))) & unit_mask
    rounded = jax.lax.bitcast_convert_type(carried, jnp.float32)
    if int(info.minexp) > -126:  # subnormals below float32's normal range
        tiny = float(info.smallest_subnormal)
        draw = (bits >> 8).astype(jnp.float32) * 2.0**-24  # uniform in [0, 1)
        # floor(units + draw) would round the sum in float32 first (up, past
        # a carry); compared with the exact fraction instead.
        units = x * (1 / tiny)
        below = jnp.floor(units)
        linear = (below + jnp.where(draw < units - below, 1.0, 0.0)) * tiny
        rounded = jnp.where(jnp.abs(x) < float(info.smallest_normal), linear, rounded)
    # Rounding up from at most the largest value cannot pass it.
    return jnp.where(jnp.abs(x) <= float(info.max), rounded, x).astype(dtype)


IMPLEMENTATION = "threefry2x32"
"""The key's PRNG, whatever ``jax_default_prng_impl`` says: a seed gives the
same draws everywhere, and the state holds ``uint32[2]``."""

SEEDS = 2**32
"""``rounding_seed`` takes the seeds ``0 <= seed < SEEDS``."""


def stochastic_rounding(seed: int = 0) -> optax.GradientTransformationExtraArgs:
    r"""Rounds each new bfloat16 or float16 parameter stochastically.

    With ``p`` a low-precision parameter and ``u`` its update, the new
    parameter is ``round(float32(p) + float32(u))`` to ``p``'s dtype, up or
    down at random with the probabilities that make it exact on average; the
    update returned is that new parameter minus ``p`` in ``p``'s dtype, so that
    ``optax.apply_updates`` lands on it. That difference is exact when the new
    parameter is within a factor of 2 of the old (Sterbenz), the small updates
    this is for; a larger step, or one across zero, is rounded to nearest
    once more, an error of at most half a unit of the update itself. An
    update smaller than half a unit in the last place, which round to nearest
    loses, moves the parameter by its size on average. Other parameters'
    updates pass unchanged.

    The key is ``seed``'s (threefry, whatever jax's default PRNG), split once
    per update, and part of the state. Place it after the transformations that
    make the update and before :func:`parameter_ema`, which then averages the
    parameters as rounded; hand it the update in float32
    (``scale_by_keras_adamax(..., full_precision_updates=True)``, as
    ``adamax(..., stochastic_rounding=True)`` does): an update already rounded
    to the parameter's dtype has lost what rounding to nearest loses.

    Args:
      seed: an integer in ``[0, 2**32)``, the seed of the key.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from adamax_optax import adamax
      >>> tx = adamax(1e-3, stochastic_rounding=True)
      >>> params = jnp.ones(1000, jnp.bfloat16)  # one unit in the last place: 2 ** -7
      >>> state = tx.init(params)
      >>> for _ in range(100):
      ...     updates, state = tx.update(jnp.ones(1000), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> round(float(params.astype(jnp.float32).mean()), 1)  # 1 - 100 * 1e-3
      0.9
    """
    _validation.check_integer_at_least(
        "rounding_seed",
        seed,
        0,
        "`rounding_seed` must be a non-negative integer.",
        int32=False,
    )
    if int(seed) >= SEEDS:
        # jax keeps a seed's low 32 bits without 64-bit mode: two seeds that
        # differ above them would give one key.
        raise ValueError(
            f"`rounding_seed` must be below 2**32. Received: rounding_seed={seed}"
        )

    def init_fn(params: optax.Params) -> StochasticRoundingState:
        dtypes = {np.dtype(jnp.result_type(x)) for x in jax.tree.leaves(params)}
        if jax.tree.leaves(params) and not dtypes & set(LOW_PRECISION):
            _common.warn(
                "`stochastic_rounding=True` has no effect: no parameter is "
                f"bfloat16 or float16 (they are {sorted(d.name for d in dtypes)})."
            )
        key = jax.random.key(seed, impl=IMPLEMENTATION)
        return StochasticRoundingState(jax.random.key_data(key))

    def advance(updates, state, params=None):
        del updates, params
        key = jax.random.wrap_key_data(state.key, impl=IMPLEMENTATION)
        return StochasticRoundingState(jax.random.key_data(jax.random.split(key)[0]))

    def emit(updates, new_state, params=None):
        _common.require_params(params, "stochastic_rounding", updates, "updates")
        # The key gives this update one 32-bit seed; each element's draw is a
        # hash of its position, the seed and its leaf's index, a few integer
        # operations (random bits from the key for every element, threefry
        # on XLA:CPU, made the step of 32M parameters 11 times slower).
        key = jax.random.wrap_key_data(new_state.key, impl=IMPLEMENTATION)
        seed = jax.random.bits(jax.random.fold_in(key, 1), (), jnp.uint32)
        leaves, treedef = jax.tree.flatten(updates)
        rounded = []
        for index, (u, p) in enumerate(
            zip(leaves, treedef.flatten_up_to(params), strict=True)
        ):
            dtype = np.dtype(jnp.result_type(p))
            if dtype not in LOW_PRECISION:
                rounded.append(u)
                continue
            before = jnp.asarray(p).astype(jnp.float32)
            bits = dither_bits(before.shape or (1,), seed, index).reshape(before.shape)
            after = round_stochastically(
                before + u.astype(jnp.float32), dtype, bits
            ).astype(jnp.float32)
            # An unchanged parameter (an infinite one among them, whose
            # difference would be NaN) gets a zero update.
            step = jnp.where(after == before, 0.0, after - before)
            rounded.append(step.astype(dtype))
        return treedef.unflatten(rounded)

    return _runner.from_phases(init_fn, advance, emit)
