"""The Keras Adamax rule as an optax building block."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike, DTypeLike

from adamax_optax import _common, _runner, _validation


class ScaleByKerasAdamaxState(NamedTuple):
    """State of :func:`scale_by_keras_adamax`.

    Attributes:
      count: number of updates applied so far (int32); the next update uses
        ``t = count + 1`` for its bias correction.
      m: first moment, one leaf per parameter.
      u: exponentially weighted infinity norm, one leaf per parameter.
    """

    count: jax.Array
    m: optax.Updates
    u: optax.Updates


def scale_by_keras_adamax(
    beta_1: ArrayLike = 0.9,
    beta_2: ArrayLike = 0.999,
    epsilon: ArrayLike = 1e-7,
    *,
    state_dtype: DTypeLike | None = None,
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
    ``u``, and comes back in the dtype of the incoming updates.

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

    def init_fn(params: optax.Params) -> ScaleByKerasAdamaxState:
        _common.check_float_params(params, "scale_by_keras_adamax")
        return ScaleByKerasAdamaxState(
            count=jnp.zeros([], jnp.int32),
            m=_common.zeros_like_in(params, state_dtype),
            u=_common.zeros_like_in(params, state_dtype, real=True),
        )

    def advance(
        updates: optax.Updates,
        state: ScaleByKerasAdamaxState,
        params: optax.Params | None = None,
    ) -> ScaleByKerasAdamaxState:
        del params
        _common.check_updates_match(updates, state.m, "scale_by_keras_adamax")

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

        return ScaleByKerasAdamaxState(
            count=optax.safe_increment(state.count),
            m=jax.tree.map(first_moment, updates, state.m),
            u=jax.tree.map(infinity_norm, updates, state.u),
        )

    def emit(
        updates: optax.Updates,
        new_state: ScaleByKerasAdamaxState,
        params: optax.Params | None = None,
    ) -> optax.Updates:
        # Keras reads m and u back after assigning them, i.e. rounded to the
        # state dtype; so does this phase, which reads only the new state.
        del params
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
            return _common.sharded_like(direction.astype(g.dtype), g)

        return jax.tree.map(direction, updates, new_state.m, new_state.u)

    return _runner.from_phases(init_fn, advance, emit)
