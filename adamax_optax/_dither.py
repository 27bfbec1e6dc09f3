"""Pseudo-random bits per element from a hash of its position: rounding
draws that need no key and cost a few integer operations an element, where
``jax.random`` (threefry) costs tens (a stochastically rounded update step of
32M bfloat16 parameters took 11 times the plain step's time with it on a CPU).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _last_axis_position(shape: tuple[int, ...]) -> jax.Array:
    """Each element's index along the last axis (uint32; ``shape`` has one
    axis or more), as ``run * (index // run) + index % run`` for ``run`` the
    largest power of two up to 256 that divides the axis, where that is 8 or
    more: XLA:CPU's loop then takes ``index // run`` once for every vector of
    8 elements, as a scalar, and the lanes' ``index % run`` from its vector
    counter, where it assembles an iota along the axis from 64-bit lanes (8
    scalar adds and inserts a vector). The advance of the update step at 32M
    parameters measured 32 ms with the iota, 28 ms with runs of 8 (which
    LLVM still formed in 64-bit lanes), and a further 1.7 ms less with runs of
    256."""
    last = shape[-1]
    run = math.gcd(last, 256)
    if run < 8:
        return jax.lax.broadcasted_iota(jnp.uint32, shape, len(shape) - 1)
    runs = (*shape[:-1], last // run, run)
    first = jax.lax.broadcasted_iota(jnp.uint32, runs, len(shape) - 1)
    lane = jax.lax.broadcasted_iota(jnp.uint32, runs, len(shape))
    return (first * jnp.uint32(run) + lane).reshape(shape)


def dither_bits(shape: tuple[int, ...], count: jax.Array, salt: int = 0) -> jax.Array:
    """32 pseudo-random bits per element (uint32), a hash of the element's
    position (its row-major index in ``shape``, modulo 2**32), ``count`` and
    ``salt`` (a leaf's index, so that leaves of one shape do not round alike).

    With ``key = count * 0x85EBCA77 + salt * 0xC2B2AE3D`` and uint32 arithmetic
    that wraps, Wellons' triple32 of ``position ^ key``::

        h = position ^ key
        h = (h ^ (h >> 17)) * 0xED5EB4FB
        h = (h ^ (h >> 11)) * 0xAC4C1B51
        h = (h ^ (h >> 15)) * 0x31848BAB
        bits = h ^ (h >> 14)

    A full avalanche: every input bit moves every output bit, so the draws of
    two positions (or two counts) are independent whatever their distance,
    powers of two among them (a row's element and the one below it in a
    matrix of 2**k columns). The same for the same step, different from one
    step to the next (tested). Two rounds (the build before 2026-12-08, 8%
    faster in the 8-bit update step on XLA:CPU) related the draws of
    positions ``2**k`` apart: a multiply carries only upward, so the high
    bits of a position never reached the low bits of its draw (two stochastic
    roundings 2**21 positions apart rounded up together 0.42 times as often
    as independent ones would); one round also drew alike at Fibonacci
    strides (the multiply of a run of positions is a Weyl sequence). The
    8-bit encoding draws ``u``'s rounding from the low 19 bits and ``m``'s
    from the 32 bits read as a signed number; stochastic rounding of
    parameters from the top 24."""
    position = _last_axis_position(shape)
    stride = shape[-1]
    for axis in range(len(shape) - 2, -1, -1):
        position = position + jax.lax.broadcasted_iota(
            jnp.uint32, shape, axis
        ) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    key = count.astype(jnp.uint32) * jnp.uint32(0x85EBCA77) + jnp.uint32(
        (salt * 0xC2B2AE3D) % 2**32
    )
    h = position ^ key
    for shift, multiplier in ((17, 0xED5EB4FB), (11, 0xAC4C1B51), (15, 0x31848BAB)):
        h = (h ^ (h >> shift)) * jnp.uint32(multiplier)
    return h ^ (h >> 14)
