"""Decoupled weight decay with Keras-style exclusions by variable name."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax
from jax.typing import ArrayLike

from adamax_optax import _common, _grouping, _validation

ExcludeFromWeightDecay = str | Sequence[str] | Any | Callable[[Any], Any] | None
"""Patterns, a pytree of bools (``True`` = excluded), or ``params -> such a tree``."""


def _pattern_mask(patterns: Sequence[str]) -> Callable[[Any], Any]:
    compiled = re.compile("|".join(patterns))

    def mask(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: compiled.search(_common.key_path_name(path)) is not None,
            params,
        )

    return mask


def exclusion_mask(
    exclude_from_weight_decay: ExcludeFromWeightDecay,
    name: str = "exclude_from_weight_decay",
) -> Callable[[Any], Any]:
    """Turns any accepted form of exclusion into ``params -> tree of bools``;
    ``name`` is the argument's name in the errors, and the label that the mask
    reads on a grouped view of the parameters (see ``_grouping.grouped``).

    Raises:
      TypeError: for a pattern list holding something other than strings.
      ValueError: for a pattern that is not a valid regular expression.
    """
    return _grouping.labelled(_plain_mask(exclude_from_weight_decay, name), name)


def _plain_mask(exclude_from_weight_decay: ExcludeFromWeightDecay, name: str) -> Any:
    exclude = exclude_from_weight_decay
    if exclude is None or (isinstance(exclude, list | tuple | set) and not exclude):
        return lambda params: jax.tree.map(lambda _: False, params)
    if isinstance(exclude, str):
        exclude = [exclude]
    if callable(exclude):
        return exclude
    if isinstance(exclude, list | tuple | set | frozenset) and all(
        isinstance(p, str) for p in exclude
    ):
        for pattern in exclude:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(
                    f"`{name}` holds an invalid regular "
                    f"expression. Received: {pattern!r} ({error})"
                ) from None
        return _pattern_mask(sorted(exclude))
    leaves = jax.tree.leaves(exclude)
    if isinstance(exclude, list | tuple) and any(isinstance(p, str) for p in leaves):
        raise TypeError(
            f"`{name}` must be a sequence of strings, a pytree "
            f"of bools or a callable. Received: {exclude!r}"
        )
    if not all(isinstance(leaf, bool) for leaf in leaves):
        raise TypeError(
            f"A mask given as `{name}` must hold Python bools "
            f"(True = excluded). Received: {exclude!r}"
        )
    return lambda params: exclude


def warn_unmatched_patterns(
    exclude_from_weight_decay: ExcludeFromWeightDecay,
    params: Any,
    name: str = "exclude_from_weight_decay",
) -> None:
    """Warns about each exclusion pattern that matches no leaf of ``params``."""
    patterns = exclude_from_weight_decay
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, list | tuple | set | frozenset) or not all(
        isinstance(p, str) for p in patterns
    ):
        return
    if _grouping.is_grouped(params):
        params = params.ungroup()
    paths = [
        _common.key_path_name(path)
        for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    ]
    for pattern in sorted(patterns):
        if not any(re.search(pattern, path) for path in paths):
            examples = ", ".join(repr(p) for p in paths[:3])
            _common.warn(
                f"`{name}` pattern {pattern!r} matches no "
                f"parameter, so it excludes nothing (key paths read like "
                f"{examples})."
            )


def decoupled_weight_decay(
    weight_decay: ArrayLike,
    *,
    exclude_from_weight_decay: ExcludeFromWeightDecay = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adds ``weight_decay * w`` to the update direction (Keras' ``weight_decay``).

    Keras applies ``w = w - w * weight_decay * lr`` just before the optimizer
    step, with the step's own learning rate. Placed before the learning rate in
    a chain, this block computes the same thing in optax form::

        direction = direction + weight_decay * w     # then  * -lr

    Leaves can be excluded, as with Keras' ``exclude_from_weight_decay``:

    * a sequence of regular expressions (or one string), searched with
      ``re.search`` in each leaf's key path written as ``"/"``-joined names
      (a Flax leaf reads ``"params/Dense_0/bias"``);
    * a pytree of Python bools shaped like the parameters, ``True`` = excluded;
    * a callable ``params -> such a pytree``.

    A pattern that matches no leaf warns at ``init``: it is most likely a typo.

    Args:
      weight_decay: the decay rate, >= 0.
      exclude_from_weight_decay: which leaves not to decay.

    Returns:
      A stateless ``optax.GradientTransformationExtraArgs`` that needs ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adamax_optax import decoupled_weight_decay
      >>> tx = decoupled_weight_decay(0.1, exclude_from_weight_decay=["bias"])
      >>> params = {"kernel": jnp.array([2.0]), "bias": jnp.array([2.0])}
      >>> zeros = {"kernel": jnp.zeros(1), "bias": jnp.zeros(1)}
      >>> updates, _ = tx.update(zeros, tx.init(params), params)
      >>> updates["kernel"], updates["bias"]
      (Array([0.2], dtype=float32), Array([0.], dtype=float32))
    """
    _validation.check_non_negative("weight_decay", weight_decay)
    excluded = exclusion_mask(exclude_from_weight_decay)

    def decay_leaf(is_excluded: bool, u: jax.Array, w: jax.Array) -> jax.Array:
        if is_excluded:
            return u
        dtype = _common.compute_dtype(u.dtype, w.dtype)
        wd = _common.as_compute_scalar(weight_decay, _common.real_dtype(dtype))
        return _common.by_parts(
            lambda u, w: u + wd * w, u.astype(dtype), w.astype(dtype)
        ).astype(u.dtype)

    def init_fn(params: optax.Params) -> optax.EmptyState:
        warn_unmatched_patterns(exclude_from_weight_decay, params)
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _common.require_params(
            params, "decoupled_weight_decay", updates, against="gradients"
        )
        return jax.tree.map(decay_leaf, excluded(params), updates, params), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
