"""Adamax's moments in 8 bits: ``u`` as a small float per block, ``m`` as ``m / u``.

Adamax suits 8-bit state better than Adam does. Its infinity norm
``u = maximum(beta_2 * u, |g|)`` is non-negative, and the first moment is
bounded by it elementwise (``|m| <= u`` to 1% for Keras' betas; betas that
allow more are refused), so the update direction ``m / (u + epsilon)`` is a
ratio in ``[-1, 1]``. The encoding keeps exactly what that direction needs:

* ``u``: one float32 ``scale`` per block of ``block`` elements along the last
  axis (the block's largest ``u``), and per element an unsigned byte ``k``, an
  8-bit float of ``u / scale`` with 4 exponent and 4 mantissa bits:
  ``u = scale * 2 ** e * (1 + f / 16)`` for ``k = 16 * (e + 15) + f + 15`` in
  1..255, and ``u = 0`` for ``k = 0``: from ``2 ** -16 * 1.125`` (``k = 1``)
  to 1 (``k = 255``) in steps of a sixteenth of an octave. Rounded to nearest
  that keeps every ``u`` to 3.1% of itself over 16 octaves below its block's
  largest (rounded stochastically, as the update does, to one step, 6.25%),
  where a linear code would zero the small ones. A scale stops at ``2 ** 126``
  (:data:`LARGEST_SCALE`), whose reciprocal is still a normal float32.
* ``m``: a signed byte ``j`` per element, ``j = round(127 * m / u)`` of the
  float ``m`` and ``u``, read back as ``m = u * j / 127``: the ratio the
  direction reads, to within 1/254 (to nearest; 1/127 stochastically),
  however ``u`` was rounded; ``j = -128`` marks a moment that is not finite.

The two bytes of an element are one ``uint16`` word (``u``'s high), so that
one pass reads and writes each element's state.

Both are integer arithmetic on the float's bits (no logarithm), which XLA
fuses into one pass. Codes are rounded stochastically, up with the chance of
the fraction (``floor(x + d)``, ``d`` uniform in [0, 1)), so that changes
smaller than a code still happen on average: ``u``'s decay, 0.1% a step and
a 60th of a code's width, and ``m``'s decay to 0 when the gradient vanishes
(rounded to nearest, ``m / u`` would stop at 5/127 and move the parameter
for good); ``d`` is a hash of the element's position and the update count,
reproducible and free of any key. The block scale follows the float rule exactly,
``scale = maximum(beta_2 * scale, max(|g|))``, over the finite ``g``.

A NaN or an infinity in a gradient makes that element's moments NaN for good
(``m``'s code ``-128``, which no finite ratio takes), as float state makes
them; the rest of its block is scaled as without it (neither recovers: use
``skip_nonfinite``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MANTISSA_BITS = 4
"""Bits of ``u / scale``'s mantissa in its code: 16 steps an octave."""

TOP_CODE = 255
"""``u``'s code for its block's scale (``u / scale = 1``)."""

_SHIFT = 23 - MANTISSA_BITS  # float32 bits below the code's mantissa
_BASE = (127 << MANTISSA_BITS) - TOP_CODE  # float32 (exponent, mantissa) of k = 0

RATIO_CODES = 127
"""``m``'s code for ``m = u``."""

_WHOLE_NUMBER_BIAS = 1.5 * 2**23
"""float32's spacing is 1 in [2**23, 2**24): the bits of ``c + 1.5 * 2**23``
are ``0x4B400000 + c`` for a whole number ``|c| < 2**22``, so their low byte
is ``c``'s in two's complement."""

NONFINITE_CODE = -128
"""``m``'s code for a moment that is not finite (a NaN or an infinity in a
gradient): read back as NaN, ``m`` and ``u`` alike."""

LARGEST_SCALE = 2.0**126
"""The largest block scale: the reciprocal of a larger one is below float32's
normal range, which XLA:CPU flushes to zero. A block whose largest ``u`` is
above it (within 4x of float32's largest number) holds its ``u`` at most
this: ``m`` keeps its ratio to ``u``, so the direction is kept."""

DEFAULT_BLOCK_SIZE = 256
"""Elements per scale: 4 bytes of scale per 256 elements, 1/64 byte each."""

MIN_QUANTIZED_SIZE = 4096
"""A leaf of fewer elements keeps its moments in ``state_dtype``, as
bitsandbytes keeps small tensors: they are a few bytes of the model and the
most sensitive (biases, norms)."""


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True)
class Moments8Bit:
    """A leaf's ``m`` and ``u`` in 8 bits each, one 16-bit word an element.

    Attributes:
      codes: ``uint16``, the leaf's shape: ``u``'s code in the high byte,
        ``m``'s (a signed byte) in the low byte.
      scale: ``float32``, the leaf's shape with its last axis divided by the
        block length: each block's largest ``u``.
    """

    codes: jax.Array
    scale: jax.Array

    def tree_flatten_with_keys(self) -> tuple[Any, None]:
        keys = (jax.tree_util.GetAttrKey("codes"), jax.tree_util.GetAttrKey("scale"))
        return list(zip(keys, (self.codes, self.scale), strict=True)), None

    @classmethod
    def tree_unflatten(cls, aux: None, children: Any) -> Moments8Bit:
        del aux
        return cls(*children)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.codes))

    @property
    def block(self) -> int:
        return self.shape[-1] // int(np.shape(self.scale)[-1])


def is_8bit(x: Any) -> bool:
    return isinstance(x, Moments8Bit)


def block_length(
    shape: tuple[int, ...], block_size: int, shards: int = 1
) -> int | None:
    """The block length for a leaf of ``shape`` whose last axis is split in
    ``shards``: the largest divisor of each shard's length up to
    ``block_size`` (so that no block straddles two shards), or ``None`` (kept
    in ``state_dtype``) for a leaf too small or whose shards have no divisor
    of ``block_size / 8`` or more (its scales would cost more than a byte a
    parameter)."""
    if len(shape) == 0 or math.prod(shape) < MIN_QUANTIZED_SIZE:
        return None
    if shape[-1] % shards:
        return None
    last = shape[-1] // shards
    length = max(d for d in range(1, min(block_size, last) + 1) if last % d == 0)
    return length if length * 8 >= block_size else None


def zeros(shape: tuple[int, ...], block: int, like: Any = None) -> Moments8Bit:
    """The codes of ``m = u = 0``."""
    scale_shape = (*shape[:-1], shape[-1] // block)
    codes = (
        jnp.zeros(shape, jnp.uint16)
        if like is None  # else keeps the leaf's sharding where it has one
        else jnp.zeros_like(like, dtype=jnp.uint16)
    )
    return Moments8Bit(codes, jnp.zeros(scale_shape, jnp.float32))


def _u_over_scale(u_codes: jax.Array) -> jax.Array:
    """``u / scale`` (float32) from ``u``'s codes (int32)."""
    bits = (u_codes + _BASE).astype(jnp.uint32) << _SHIFT
    ratio = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return jnp.where(u_codes == 0, 0.0, ratio)


def _per_element(scale: jax.Array, block: int) -> jax.Array:
    """A block scale repeated over its block's elements (the leaf's shape).
    Every per-element array keeps the leaf's shape, so that XLA writes the new
    codes over the old in place."""
    spread = jax.lax.broadcast_in_dim(
        scale, (*scale.shape, block), tuple(range(scale.ndim))
    )
    return spread.reshape(*scale.shape[:-1], scale.shape[-1] * block)


def decode(moments: Moments8Bit) -> tuple[jax.Array, jax.Array]:
    """``(m, u)`` in float32 from their codes."""
    # In 32-bit lanes from the start: from 16-bit ones, the byte tests and
    # conversions cost a widening each (the advance at 32M measured 21.5 ms
    # from 16-bit lanes, 18.9 ms from these).
    word = moments.codes.astype(jnp.int32)
    u_codes = word >> 8
    m_codes = (word << 24) >> 24  # the low byte, signed
    u = _per_element(moments.scale, moments.block) * _u_over_scale(u_codes)
    u = jnp.where(m_codes == NONFINITE_CODE, jnp.nan, u)
    return m_codes.astype(jnp.float32) * (1.0 / RATIO_CODES) * u, u


def encode(
    m: jax.Array,
    u: jax.Array,
    scale: jax.Array,
    dither: jax.Array | None = None,
) -> Moments8Bit:
    """The codes of float32 ``m`` and ``u`` against the block ``scale`` (each
    block's largest ``u``); ``dither``: 32 random bits per element
    (``_dither.dither_bits``) for stochastic rounding, ``None`` for round to
    nearest. A moment that is not finite is marked where ``m`` is not finite:
    Adamax's ``m`` is wherever its ``u`` is (:func:`encodable` makes a
    pair from elsewhere so), and overflows alone (a finite gradient near
    float32's largest against an ``m`` of the other sign)."""
    block = u.shape[-1] // scale.shape[-1]
    scale = jnp.minimum(scale, LARGEST_SCALE)
    # The reciprocal per block, where 1/inf = 0 stands for a block of zeros: a
    # select after it would be repeated for every element of the block.
    inverse_scale = _per_element(1.0 / jnp.where(scale > 0, scale, jnp.inf), block)
    ratio_bits = jax.lax.bitcast_convert_type(u * inverse_scale, jnp.uint32)
    if dither is None:
        u_dither, m_dither = jnp.uint32(1 << (_SHIFT - 1)), 0.0
    else:
        # u's draw: the 19 bits below its code's; m's: the 32 bits as a
        # signed number, scaled to [-1/2, 1/2] (one conversion, no mask).
        u_dither = dither & jnp.uint32((1 << _SHIFT) - 1)
        signed = jax.lax.bitcast_convert_type(dither, jnp.int32)
        m_dither = signed.astype(jnp.float32) * 2.0**-32
    # Adding the dither below the kept bits and truncating rounds the
    # (exponent, mantissa) pair: linearly within an octave, carrying across.
    kept = ((ratio_bits + u_dither) >> _SHIFT).astype(jnp.int32) - _BASE
    u_codes = jnp.clip(kept, 0, TOP_CODE)
    # m's code is its ratio to u itself (not to u's code): decoded, m / u
    # keeps Adamax's direction whatever the rounding of u. An update makes
    # u = 0 only where m = 0 (Adamax bounds m by u), whose ratio 0 / 0 is NaN;
    # whatever code that, or any m over u = 0, makes, u's code 0 reads m back
    # as 0. (No select before the division, and a subnormal u, on a backend
    # that keeps them, divides exactly.)
    ratio = m / u
    m_code = jnp.clip(ratio * RATIO_CODES + m_dither, -RATIO_CODES, RATIO_CODES)
    # The addition of ``_WHOLE_NUMBER_BIAS`` rounds the code to a whole number
    # (to nearest, ties to even) in the low byte of its bits: ``round(x + d)``
    # for ``d`` uniform in [-1/2, 1/2] rounds up with the chance of ``x``'s
    # fraction, as ``floor(x + d + 1/2)`` does, but for the draws whose sum
    # ``x + d``, rounded to float32, lands on a tie (a draw within half a
    # float32 step of +-1/2: about 4e-6 of the draws at |x| near 127, fewer
    # below), which goes to the even neighbour. The clip comes first, so no
    # tie reaches the NaN mark. (A floor costs an operation an element, a
    # float-to-int conversion, which XLA guards against NaN and overflow, four.
    # A NaN code, from a moment that is not finite, is replaced below.)
    m_bits = jax.lax.bitcast_convert_type(m_code + _WHOLE_NUMBER_BIAS, jnp.int32)
    m_byte = jnp.where(jnp.isfinite(m), m_bits & 0xFF, NONFINITE_CODE & 0xFF)
    codes = (u_codes << 8) | m_byte
    return Moments8Bit(codes.astype(jnp.uint16), scale)


def encodable(m: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A float pair from elsewhere (a float state) in the form :func:`encode`
    reads: ``m`` NaN where ``u`` is not finite (it marks a moment that is not
    finite by its ``m``), and a finite ``u`` of 0, -0.0 or below (no Adamax
    state holds one below 0) read as 0 with its ``m`` (it divides ``m`` by
    ``u``)."""
    kept = (u > 0) | ~jnp.isfinite(u)
    m, u = jnp.where(kept, m, 0.0), jnp.where(kept, u, 0.0)
    return jnp.where(jnp.isfinite(u), m, jnp.nan), u


def maximum_of_nonnegative(a: jax.Array, b: jax.Array) -> jax.Array:
    """``maximum(a, b)`` of float32 arrays that are non-negative or NaN (a NaN
    kept), as the integer maximum of their bits: the bits of non-negative
    floats are in the floats' order, and a NaN's (positive) are above
    infinity's. One instruction, where XLA's NaN-keeping float maximum takes
    five on AVX2. (Subnormals compare as their bits do, where XLA:CPU's float
    maximum reads them as 0.)"""
    larger = jnp.maximum(_float_bits(a), _float_bits(b))
    return jax.lax.bitcast_convert_type(larger, jnp.float32)


def _float_bits(x: jax.Array) -> jax.Array:
    """A float32 array's bits as int32."""
    return jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)


def block_max_abs(x: jax.Array, block: int) -> jax.Array:
    """Each block's largest ``|x|`` (float32; an infinity or a NaN is kept).

    Two built-in reductions of ``x``'s bits, which every backend and the SPMD
    partitioner take: the signed maximum, the largest non-negative ``x``
    (float bits of one sign are in the floats' order), and the unsigned
    maximum less the sign bit, the negative ``x`` of largest magnitude. Each
    block is first reduced to 16 lanes across its rows of 16 (a reduction over
    a major axis, which XLA:CPU vectorises along the lanes). An integer
    maximum is one instruction; XLA's NaN-keeping float maximum, five on AVX2:
    at 32M parameters on XLA:CPU the maxima of ``x`` and ``-x`` as floats took
    8.5 ms, these 5.0 ms. (``max(abs(x))`` is slower again: XLA:CPU writes
    the ``abs`` out first.)
    """
    lanes = math.gcd(block, 16)
    rows = _float_bits(x).reshape(
        *x.shape[:-1], x.shape[-1] // block, block // lanes, lanes
    )
    positive = jnp.max(rows, axis=-2)
    negative = jnp.max(jax.lax.bitcast_convert_type(rows, jnp.uint32), axis=-2)
    magnitude = jax.lax.bitcast_convert_type(
        negative & jnp.uint32(0x7FFFFFFF), jnp.int32
    )
    largest = jnp.max(jnp.maximum(positive, magnitude), axis=-1)
    return jax.lax.bitcast_convert_type(largest, jnp.float32)


def finite_block_max_abs(x: jax.Array, block: int) -> jax.Array:
    """Each block's largest finite ``|x|`` (0 where it has none).

    A loop over the positions in a block, each step reading one element of
    every block: XLA:CPU fuses no computation into a reduction's operand, so
    a reduction of the masked ``x`` would write it out whole first, where
    this holds only the maxima. Slower than :func:`block_max_abs`, for the
    updates that meet a NaN or an infinity.
    """
    rows = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)

    def widen(position: jax.Array, largest: jax.Array) -> jax.Array:
        column = jax.lax.dynamic_index_in_dim(rows, position, -1, keepdims=False)
        finite = jnp.where(jnp.isfinite(column), jnp.abs(column), 0.0)
        return jnp.maximum(largest, finite)

    # The carry starts as a column, so that it has the columns' sharding.
    return jax.lax.fori_loop(0, block, widen, jnp.zeros_like(rows[..., 0]))


def block_scale(x: jax.Array, block: int, floor: jax.Array) -> jax.Array:
    """The block scales ``maximum(floor, max |x|)`` (not finite where ``x``
    holds a NaN or an infinity: the update then takes them again over the
    finite elements)."""
    return jnp.maximum(floor, block_max_abs(x, block))
