"""Keras' three gradient-clipping options, with Keras' exact formulas."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from adamax_optax import _common, _gate, _grouping, _validation


def _in_compute_dtype(fn: Callable[[jax.Array], jax.Array], g: jax.Array) -> jax.Array:
    """Applies ``fn`` in ``g``'s compute dtype and returns the result in its dtype."""
    return fn(g.astype(_common.compute_dtype(g.dtype))).astype(g.dtype)


def _separate_read(tree: optax.Updates) -> optax.Updates:
    """``tree`` as a value of its own, for a reduction over it.

    XLA would otherwise share one float32 convert of a low-precision gradient
    between the reduction and the elementwise update, and, on CPU, materialise
    it as a full-size temporary; behind the barrier each consumer converts on
    the fly. The barrier compiles to nothing. Leaves already in their compute
    dtype have no convert to share and stay out of it.
    """
    leaves, treedef = jax.tree.flatten(tree)
    converted = [
        i for i, g in enumerate(leaves) if g.dtype != _common.compute_dtype(g.dtype)
    ]
    if converted:
        separate = jax.lax.optimization_barrier([leaves[i] for i in converted])
        for i, g in zip(converted, separate, strict=True):
            leaves[i] = g
    return jax.tree.unflatten(treedef, leaves)


def _stateless(
    transform: Callable[[optax.Updates], optax.Updates],
) -> optax.GradientTransformationExtraArgs:
    """``optax.stateless`` of ``transform``, taking extra arguments."""
    return optax.with_extra_args_support(
        optax.stateless(lambda updates, params: transform(updates))
    )


def _abs_sq(g: jax.Array) -> jax.Array:
    """``|g| ** 2``, real for a complex ``g``."""
    if _common.is_complex(g.dtype):
        return jnp.square(g.real) + jnp.square(g.imag)
    return jnp.square(g)


def global_norm(
    updates: optax.Updates, leaf_map: _gate.LeafMap | None = None, scale: float = 1.0
) -> jax.Array:
    """``sqrt(sum over leaves of sum(|g| ** 2))``, in the widest compute dtype
    (real); inside ``jit`` with sharded leaves the sums are global. With
    ``leaf_map``, of ``leaf_map(g)``, computed in the reductions; with
    ``scale`` (a power of two, exact), of ``scale * g``, in compute dtype."""
    leaves = jax.tree.leaves(updates)  # a leaf map keeps their dtypes
    dtype = _common.real_dtype(_common.compute_dtype(*(g.dtype for g in leaves)))

    def scaled(g: jax.Array) -> jax.Array:
        g = g.astype(_common.compute_dtype(g.dtype))
        return g if scale == 1.0 else g * _common.real_dtype(g.dtype).type(scale)

    squared = [
        jnp.sum(_abs_sq(scaled(g))).astype(dtype)
        for g in jax.tree.leaves(_gate.mapped(_separate_read(updates), leaf_map))
    ]
    if not squared:
        return jnp.zeros([], dtype)
    return jnp.sqrt(jnp.sum(jnp.stack(squared)))


def keras_clipnorm(clipnorm: ArrayLike) -> optax.GradientTransformationExtraArgs:
    r"""Clips each leaf to an L2 norm of at most ``clipnorm`` (Keras' ``clipnorm``).

    Per leaf ``g``, with ``c = clipnorm``::

        g = g * c / maximum(l2(g), c)

    A leaf of zeros stays zeros (Keras takes the norm with a NaN-safe ``where``).
    For a complex leaf ``l2(g)`` sums ``|g| ** 2``.

    Args:
      clipnorm: the largest L2 norm of any one leaf, > 0.

    Returns:
      A stateless ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adamax_optax import keras_clipnorm
      >>> tx = keras_clipnorm(1.0)
      >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.1, 0.0])}
      >>> updates, _ = tx.update(grads, tx.init(grads))
      >>> updates["a"], updates["b"]
      (Array([0.6, 0.8], dtype=float32), Array([0.1, 0. ], dtype=float32))
    """
    _validation.check_positive("clipnorm", clipnorm)

    def clip_leaf(update: jax.Array, axes: tuple[int, ...] | None) -> jax.Array:
        # ``axes``: those of one parameter (a stack of equal small leaves in
        # adamax's grouped view holds one parameter per index of axis 0).
        dtype = _common.compute_dtype(update.dtype)
        real = _common.real_dtype(dtype)
        c = _common.as_compute_scalar(clipnorm, real)
        g = update.astype(dtype)
        squares = _abs_sq(_separate_read(update).astype(dtype))
        l2sum = jnp.sum(squares, axis=axes, keepdims=True)
        nonzero = l2sum > 0
        l2sum_safe = jnp.where(nonzero, l2sum, jnp.ones_like(l2sum))
        l2norm = jnp.where(nonzero, jnp.sqrt(l2sum_safe), l2sum)
        denominator = jnp.maximum(l2norm, c)
        clipped = _common.by_parts(lambda g: (g * c) / denominator, g)
        return clipped.astype(update.dtype)

    return _stateless(lambda updates: _grouping.map_members(clip_leaf, updates))


def keras_global_clipnorm(
    global_clipnorm: ArrayLike,
) -> optax.GradientTransformationExtraArgs:
    r"""Clips all leaves together to a global L2 norm of at most ``global_clipnorm``.

    With ``n = sqrt(sum over leaves of sum(|g| ** 2))`` and ``c = global_clipnorm``::

        g = g * (c * minimum(1 / n, 1 / c) + (n - n))

    The ``(n - n)`` term is Keras' on purpose: a non-finite norm turns every
    gradient into NaN rather than silently clipping an overflowed gradient. Under
    ``jit`` with sharded leaves the sums are global, so ``n`` is the true norm.

    Args:
      global_clipnorm: the largest global L2 norm, > 0.

    Returns:
      A stateless ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adamax_optax import keras_global_clipnorm
      >>> tx = keras_global_clipnorm(1.0)
      >>> grads = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
      >>> updates, _ = tx.update(grads, tx.init(grads))
      >>> updates["a"], updates["b"]
      (Array([0.6], dtype=float32), Array([0.8], dtype=float32))
    """
    _validation.check_positive("global_clipnorm", global_clipnorm)

    def clip(updates: optax.Updates) -> optax.Updates:
        norm = global_norm(updates)
        c = _common.as_compute_scalar(global_clipnorm, norm.dtype)
        scale = c * jnp.minimum(1.0 / norm, 1.0 / c) + (norm - norm)

        def clip_leaf(g: jax.Array) -> jax.Array:
            leaf_dtype = _common.compute_dtype(g.dtype)
            leaf_scale = scale.astype(_common.real_dtype(leaf_dtype))
            return _common.by_parts(
                lambda g: g * leaf_scale, g.astype(leaf_dtype)
            ).astype(g.dtype)

        return jax.tree.map(clip_leaf, updates)

    return _stateless(clip)


def keras_clipvalue(clipvalue: ArrayLike) -> optax.GradientTransformationExtraArgs:
    r"""Clips every element to ``[-clipvalue, clipvalue]`` (Keras' ``clipvalue``).

    ``g = clip(g, -v, v)`` elementwise. Complex updates are refused, as
    ``optax.clip`` refuses them: complex numbers have no order, and clipping the
    real and imaginary parts apart would turn the update's direction.

    Args:
      clipvalue: the largest absolute value of any element, > 0.

    Returns:
      A stateless ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adamax_optax import keras_clipvalue
      >>> tx = keras_clipvalue(0.5)
      >>> updates, _ = tx.update(jnp.array([-2.0, 0.25, 3.0]), tx.init(None))
      >>> updates
      Array([-0.5 ,  0.25,  0.5 ], dtype=float32)
    """
    _validation.check_positive("clipvalue", clipvalue)

    def clip_leaf(g: jax.Array) -> jax.Array:
        v = _common.as_compute_scalar(clipvalue, g.dtype)
        return jnp.clip(g, -v, v)

    def clip(updates: optax.Updates) -> optax.Updates:
        for path, g in jax.tree_util.tree_flatten_with_path(updates)[0]:
            if _common.is_complex(g.dtype):
                raise TypeError(
                    "`clipvalue` cannot clip complex updates (complex numbers "
                    f"have no order); leaf {_common.key_path_name(path)!r} has "
                    f"dtype {g.dtype}. Use `clipnorm` or `global_clipnorm`."
                )
        return jax.tree.map(lambda g: _in_compute_dtype(clip_leaf, g), updates)

    return _stateless(clip)
