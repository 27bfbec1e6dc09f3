"""The Keras Adamax rule as an optax building block."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike, DTypeLike

from adamax_optax import _common, _grouping, _runner, _validation
from adamax_optax import _quantization as q8
from adamax_optax._dither import dither_bits


class ScaleByKerasAdamaxState(NamedTuple):
    """State of :func:`scale_by_keras_adamax`.

    Attributes:
      count: number of updates applied so far (int32); the next update uses
        ``t = count + 1`` for its bias correction.
      m: first moment, one leaf per parameter (in a model with 64 or more
        small leaves of one shape, those are stacked into one ``Grouped``
        part each: :meth:`moments` reads them per parameter).
      u: exponentially weighted infinity norm, laid out as ``m``.

    With ``quantized_state=True`` a large leaf's ``m`` holds both its moments
    in 8 bits each (``Moments8Bit``: a 16-bit word an element and a float32
    scale per block) and its ``u`` is an ``optax.MaskedNode``; read them as
    numbers with :meth:`moments`.
    """

    count: jax.Array
    m: optax.Updates
    u: optax.Updates

    def moments(self) -> tuple[optax.Updates, optax.Updates]:
        """``(m, u)`` as float arrays, 8-bit leaves decoded to float32, each a
        tree of the parameters' structure (a grouped state read per leaf)."""
        # One compiled program: eagerly, each operation of the decoding would
        # compile on its own for every leaf shape (16 shapes: 9.9 s on a CPU).
        m, u = jax.jit(decoded_moments)(self.m, self.u)
        return _grouping.ungroup(m), _grouping.ungroup(u)


def decoded_moments(m: Any, u: Any) -> tuple[Any, Any]:
    """``m`` and ``u`` trees with every 8-bit leaf decoded to float32."""

    def pick(index: int) -> Any:
        return jax.tree.map(
            lambda m, u: q8.decode(m)[index] if q8.is_8bit(m) else (m, u)[index],
            m,
            u,
            is_leaf=q8.is_8bit,
        )

    return pick(0), pick(1)


def encoded_moments(m: Any, u: Any, like_m: Any) -> tuple[Any, Any]:
    """Float ``m`` and ``u`` in the form of ``like_m``: encoded (rounded to
    nearest) where ``like_m`` holds a leaf in 8 bits."""

    def encode(m: Any, u: Any, like: Any) -> Any:
        if not q8.is_8bit(like):
            return _Moments(m, u)
        m, u = jnp.asarray(m, jnp.float32), jnp.asarray(u, jnp.float32)
        m, u = q8.encodable(m, u)
        scale = q8.finite_block_max_abs(u, like.block)  # a NaN reads back as NaN
        return _Moments(q8.encode(m, u, scale), optax.MaskedNode())

    pairs = jax.tree.map(encode, m, u, like_m, is_leaf=q8.is_8bit)
    return (
        jax.tree.map(lambda pair: pair.m, pairs, is_leaf=_is_moments),
        jax.tree.map(lambda pair: pair.u, pairs, is_leaf=_is_moments),
    )


def scale_by_keras_adamax(
    beta_1: ArrayLike = 0.9,
    beta_2: ArrayLike = 0.999,
    epsilon: ArrayLike = 1e-7,
    *,
    state_dtype: DTypeLike | None = None,
    quantized_state: bool = False,
    quantized_block_size: int | None = None,
    full_precision_updates: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescales updates by the Adamax rule exactly as Keras computes it.

    With ``t`` the number of updates applied so far plus one, each leaf becomes::

        m = m + (g - m) * (1 - beta_1)
        u = maximum(beta_2 * u, abs(g))
        direction = m / ((1 - beta_1 ** t) * (u + epsilon))

    Chain it with a learning rate (``optax.scale(-lr)`` or
    :func:`scale_by_keras_learning_rate`) to get Keras' step
    ``w = w - lr * direction``. This is not ``optax.scale_by_adamax``, which adds
    epsilon inside the maximum, ``u = max(|g| + epsilon, beta_2 * u)`` (with the
    same bias correction of ``m``): with equal epsilon the first steps agree,
    and later ones differ wherever the decayed maximum wins.

    The arithmetic runs in the widest of float32 and the dtypes involved (float32
    for bfloat16, float16 and float32; float64 for float64); ``m`` and ``u`` are
    stored in ``state_dtype`` (default: each parameter's dtype, as Keras does);
    like Keras, the direction is computed from the stored (rounded) ``m`` and
    ``u``. Given ``params``, each update is first cast to its parameter's
    dtype, as Keras casts a gradient to its variable's in the step, and the
    direction comes back in it (with ``full_precision_updates``, in the
    arithmetic's dtype); without, in the dtype of the incoming update.

    Complex parameters: ``abs(g)`` is the modulus, so ``u`` is real and is
    stored in the parameter's real dtype (``float32`` for ``complex64``): it
    holds no imaginary part worth storing, and a real ``u`` halves its memory.
    ``m`` is complex. A complex parameter whose gradients stay real moves
    exactly as the real parameter would. As in optax, pass the conjugate of the
    gradient of a real loss (``jax.grad`` returns ``conj`` of the descent
    direction for complex inputs).

    Args:
      beta_1: decay rate of the first moment, in [0, 1).
      beta_2: decay rate of the infinity norm, in [0, 1).
      epsilon: added to ``u`` before dividing, >= 0.
      state_dtype: precision of ``m`` and ``u``; ``None`` keeps each parameter's
        dtype. A complex parameter keeps complex ``m`` of that precision.
      quantized_state: hold ``m`` and ``u`` of every leaf of 4096 elements or
        more in 8 bits each (2 bytes a parameter, plus 4 bytes of scale per
        block), decoded to float32 for the arithmetic and encoded again after
        it; smaller leaves stay in ``state_dtype``, as does a leaf whose last
        axis has no divisor of ``quantized_block_size / 8`` or more. The
        encoding is on the documentation's *Memory* page. Real parameters
        only.
      quantized_block_size: the most elements along the last axis that share
        one scale, a positive integer (``None``: 256): the block of a leaf is
        the largest divisor of its last axis up to this (of each shard's part
        of it, where the parameter's sharding is explicit).
      full_precision_updates: return each direction in the arithmetic's dtype
        (float32 for bfloat16 and float16 parameters) instead of rounding it
        to the parameter's, for a later stage that rounds the new parameter
        itself (:func:`stochastic_rounding`, which ``adamax`` sets it for).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` that is also a block (see
      :func:`block`): its ``emit`` reads the direction from the new ``m`` and
      ``u``.

    Example (Keras' own golden value, one step with learning rate 0.5):
      >>> import jax.numpy as jnp, optax
      >>> from adamax_optax import scale_by_keras_adamax
      >>> tx = optax.chain(scale_by_keras_adamax(), optax.scale(-0.5))
      >>> params = jnp.array([1.0, 2.0, 3.0, 4.0])
      >>> grads = jnp.array([1.0, 6.0, 7.0, 2.0])
      >>> updates, state = tx.update(grads, tx.init(params))
      >>> optax.apply_updates(params, updates).round(4)  # epsilon moves the 7th digit
      Array([0.5, 1.5, 2.5, 3.5], dtype=float32)

    References:
      Kingma and Ba, *Adam: A Method for Stochastic Optimization*, section 7.1,
      https://arxiv.org/abs/1412.6980
    """
    _validation.check_in_unit_interval("beta_1", beta_1)
    _validation.check_in_unit_interval("beta_2", beta_2)
    _validation.check_non_negative("epsilon", epsilon)
    _validation.check_state_dtype(state_dtype)
    _validation.check_bool("quantized_state", quantized_state)
    _validation.check_bool("full_precision_updates", full_precision_updates)
    if quantized_block_size is None:
        quantized_block_size = q8.DEFAULT_BLOCK_SIZE
    _validation.check_integer_at_least(
        "quantized_block_size",
        quantized_block_size,
        1,
        "`quantized_block_size` must be a positive integer.",
        int32=False,
    )
    if quantized_state:
        _check_ratio_bound(beta_1, beta_2)

    def block_of(leaf: Any, axes: tuple[int, ...] | None) -> int | None:
        """The block length of a leaf's 8-bit moments, or ``None`` (float)."""
        if not quantized_state:
            return None
        shape = tuple(np.shape(leaf))
        member = shape if axes is None else tuple(shape[a] for a in axes)
        return q8.block_length(
            member, quantized_block_size, _common.last_axis_shards(leaf)
        )

    def init_fn(params: optax.Params) -> ScaleByKerasAdamaxState:
        _common.check_float_params(params, "scale_by_keras_adamax")
        if quantized_state:
            _refuse_complex(params)

        def moments(leaf: Any, axes: tuple[int, ...] | None) -> tuple[Any, Any]:
            block = block_of(leaf, axes)
            if block is None:
                return (
                    _common.zeros_like_in(leaf, state_dtype),
                    _common.zeros_like_in(leaf, state_dtype, real=True),
                )
            return q8.zeros(tuple(np.shape(leaf)), block, like=leaf), optax.MaskedNode()

        return ScaleByKerasAdamaxState(
            count=jnp.zeros([], jnp.int32),
            m=_grouping.map_members(lambda x, a: moments(x, a)[0], params),
            u=_grouping.map_members(lambda x, a: moments(x, a)[1], params),
        )

    def advance(
        updates: optax.Updates,
        state: ScaleByKerasAdamaxState,
        params: optax.Params | None = None,
    ) -> ScaleByKerasAdamaxState:
        # Keras casts each gradient to its variable's dtype in the step itself,
        # after the loss scale, accumulation and clipping.
        updates = _common.cast_to_params(updates, params)
        per_parameter = jax.tree.map(
            lambda m: m.codes if q8.is_8bit(m) else m, state.m, is_leaf=q8.is_8bit
        )
        _common.check_updates_match(updates, per_parameter, "scale_by_keras_adamax")
        if params is not None and state_dtype is None:
            _check_params_keep_state_dtypes(params, state.m)

        def first_moment(g: jax.Array, m: jax.Array) -> jax.Array:
            g = _common.sharded_like(g, m)
            dtype = _common.compute_dtype(g.dtype, m.dtype)
            b1 = _common.as_compute_scalar(beta_1, _common.real_dtype(dtype))
            return _common.by_parts(
                lambda g, m: m + (g - m) * (1 - b1), g.astype(dtype), m.astype(dtype)
            ).astype(m.dtype)

        def infinity_norm(g: jax.Array, u: jax.Array) -> jax.Array:
            g = _common.sharded_like(g, u)
            dtype = _common.compute_dtype(g.dtype, u.dtype)
            real = _common.real_dtype(dtype)
            b2 = _common.as_compute_scalar(beta_2, real)
            modulus = jnp.abs(g.astype(dtype))
            return jnp.maximum(b2 * u.astype(real), modulus).astype(u.dtype)

        count = optax.safe_increment(state.count)

        b2_f32 = _common.as_compute_scalar(beta_2, jnp.float32)

        def eight_bit(
            g: jax.Array, moments: q8.Moments8Bit, salt: int, scale: jax.Array
        ) -> q8.Moments8Bit:
            # Decoded, advanced in float32 as a float state is, encoded again
            # against the new block ``scale``.
            g = g.astype(jnp.float32)
            b1 = _common.as_compute_scalar(beta_1, jnp.float32)
            m, u = q8.decode(moments)
            m = m + (g - m) * (1 - b1)
            u = q8.maximum_of_nonnegative(b2_f32 * u, jnp.abs(g))
            scale = _common.sharded_like(scale, moments.scale)
            return q8.encode(m, u, scale, dither_bits(g.shape, count, salt))

        def advance_8bit(ms: list[Any], gs: list[Any]) -> list[Any]:
            # Cast where each is read, not once here: a cast gradient handed to
            # the conditional below would be written out whole.
            gs = [_common.sharded_like(g, m.codes) for g, m in zip(gs, ms, strict=True)]
            floors = [b2_f32 * m.scale for m in ms]
            scales = [
                q8.block_scale(g.astype(jnp.float32), m.block, floor)
                for g, m, floor in zip(gs, ms, floors, strict=True)
            ]

            def finite_scales(gs: list[Any], _: Any) -> list[Any]:
                # A NaN or an infinity is left to its element (read back as
                # NaN); the rest of its block is scaled as without it.
                return [
                    jnp.maximum(
                        floor, q8.finite_block_max_abs(g.astype(jnp.float32), m.block)
                    )
                    for g, m, floor in zip(gs, ms, floors, strict=True)
                ]

            finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(s)) for s in scales]))
            scales = jax.lax.cond(
                finite, lambda gs, scales: scales, finite_scales, gs, scales
            )
            return [
                eight_bit(g, m, i, scale)
                for i, g, m, scale in zip(which, gs, ms, scales, strict=True)
            ]

        def advance_leaf(g: jax.Array, m: Any, u: Any) -> Any:
            if q8.is_8bit(m):
                return _Moments(m, u)  # all of them at once, below
            return _Moments(first_moment(g, m), infinity_norm(g, u))

        advanced = jax.tree.map(
            advance_leaf, updates, state.m, state.u, is_leaf=q8.is_8bit
        )
        g_leaves = jax.tree.leaves(updates)
        m_leaves = jax.tree.leaves(state.m, is_leaf=q8.is_8bit)
        which = [i for i, m in enumerate(m_leaves) if q8.is_8bit(m)]
        if which:
            # The 8-bit leaves advance in a conditional that always runs
            # (count >= 1): its result is a buffer, which the direction reads.
            # Inlined, XLA would compute the direction again from the old
            # codes (twice the arithmetic) and keep them in a copy.
            new_codes = jax.lax.cond(
                count > 0,
                advance_8bit,
                lambda ms, gs: list(ms),
                [m_leaves[i] for i in which],
                [g_leaves[i] for i in which],
            )
            moments = jax.tree.leaves(advanced, is_leaf=_is_moments)
            for i, codes in zip(which, new_codes, strict=True):
                moments[i] = moments[i]._replace(m=codes)
            advanced = jax.tree.unflatten(
                jax.tree.structure(advanced, is_leaf=_is_moments), moments
            )
        return ScaleByKerasAdamaxState(
            count=count,
            m=jax.tree.map(lambda pair: pair.m, advanced, is_leaf=_is_moments),
            u=jax.tree.map(lambda pair: pair.u, advanced, is_leaf=_is_moments),
        )

    def emit(
        updates: optax.Updates,
        new_state: ScaleByKerasAdamaxState,
        params: optax.Params | None = None,
    ) -> optax.Updates:
        # Keras reads m and u back after assigning them, i.e. rounded to the
        # state dtype; so does this phase, which reads only the new state.
        updates = _common.cast_to_params(updates, params)
        t = new_state.count  # this update's 1-based number

        @_common.per_dtype
        def scalars(real: np.dtype) -> tuple[jax.Array, ArrayLike]:
            b1 = jnp.asarray(_common.as_compute_scalar(beta_1, real), real)
            bias_correction = 1 - jnp.power(b1, t.astype(real))
            return bias_correction, _common.as_compute_scalar(epsilon, real)

        def direction(g: jax.Array, m: jax.Array, u: jax.Array) -> jax.Array:
            dtype = _common.compute_dtype(g.dtype, m.dtype)
            real = _common.real_dtype(dtype)
            bias_correction, eps = scalars(real)
            denominator = bias_correction * (u.astype(real) + eps)
            direction = _common.divide_by_real(m.astype(dtype), denominator)
            out = dtype if full_precision_updates else g.dtype
            return _common.sharded_like(direction.astype(out), g)

        m, u = decoded_moments(new_state.m, new_state.u)
        return jax.tree.map(direction, updates, m, u)

    return _runner.from_phases(init_fn, advance, emit)


class _Moments(NamedTuple):
    m: Any
    u: Any


def _is_moments(x: Any) -> bool:
    return isinstance(x, _Moments)


def _check_params_keep_state_dtypes(params: Any, m: Any) -> None:
    """With ``state_dtype=None`` each float ``m`` has its parameter's dtype
    at ``init``: a parameter of another dtype now is refused, naming it."""
    if jax.tree.structure(params) != jax.tree.structure(m, is_leaf=q8.is_8bit):
        return  # the blocks' structure checks say how they differ
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, p), m_leaf in zip(
        flat, jax.tree.leaves(m, is_leaf=q8.is_8bit), strict=True
    ):
        if q8.is_8bit(m_leaf) or _common.is_complex(m_leaf.dtype):
            continue
        if np.dtype(jnp.result_type(p)) != np.dtype(m_leaf.dtype):
            raise _grouping.LeafMismatchError(
                f"`adamax`: parameter {_common.key_path_name(path)!r} is "
                f"{np.dtype(jnp.result_type(p)).name}, "
                f"{np.dtype(m_leaf.dtype).name} when the optimizer state was made "
                "for it. Make the state for the parameters as they are (`init`, "
                "or `migrate_state(tx, state, params)`)."
            )


def _check_ratio_bound(beta_1: Any, beta_2: Any) -> None:
    """8-bit ``m`` is a ratio to ``u`` in ``[-1, 1]``. Adamax bounds it by
    ``(1 - beta_1) / (1 - beta_1 / beta_2)`` (``|g|`` at ``k`` steps back is at
    most ``u / beta_2 ** k``): 1.009 for Keras' betas; betas whose bound
    exceeds 1.01 would have their direction capped, and are refused. Traced
    betas (``optax.inject_hyperparams``) are not checked."""
    betas = [_validation.concrete_scalar(b) for b in (beta_1, beta_2)]
    if None in betas:
        return
    beta_1, beta_2 = (float(b) for b in betas)
    if beta_1 == 0:
        bound = 1.0  # m = g, u >= |g|
    elif beta_1 < beta_2:
        bound = (1 - beta_1) / (1 - beta_1 / beta_2)
    else:
        bound = float("inf")
    if bound > RATIO_BOUND:
        raise ValueError(
            "`quantized_state=True` holds `m` as a ratio to `u` in [-1, 1], and "
            f"with beta_1={beta_1:.6g} and beta_2={beta_2:.6g} Adamax lets |m| reach "
            f"{bound:.3g} u ((1 - beta_1) / (1 - beta_1 / beta_2)), above the "
            f"{RATIO_BOUND} the encoding allows: the direction would be capped. "
            "Use a beta_2 closer to 1 (0.999 gives 1.009 with beta_1=0.9) or a "
            "float state (`state_dtype=jnp.bfloat16`)."
        )


RATIO_BOUND = 1.01
"""The largest ``|m| / u`` that betas may allow with 8-bit state."""


def _refuse_complex(params: Any) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if _common.is_complex(jnp.result_type(leaf)):
            raise TypeError(
                "`quantized_state=True` holds real moments only; leaf "
                f"{_common.key_path_name(path)!r} is {jnp.result_type(leaf)}. "
                "Keep complex parameters in a float state (`quantized_state=False`)."
            )
