"""Small helpers shared by the transformations: dtypes, hyperparameters, key paths."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

COMPUTE_DTYPE = jnp.float32
"""The narrowest dtype any update rule computes in: float16 and bfloat16 leaves
compute in float32, float64 leaves (under ``jax_enable_x64``) in float64."""


def compute_dtype(*dtypes: DTypeLike) -> np.dtype:
    """The dtype leaves of ``dtypes`` compute in: the widest of them and float32."""
    return max((np.dtype(d) for d in (COMPUTE_DTYPE, *dtypes)), key=_itemsize)


def _itemsize(dtype: np.dtype) -> int:
    return dtype.itemsize


def as_compute_scalar(value: ArrayLike, dtype: DTypeLike = COMPUTE_DTYPE) -> ArrayLike:
    """A hyperparameter ready to combine with arrays computing in ``dtype``.

    Python numbers stay Python numbers, so that they enter the arithmetic as weakly
    typed constants exactly as Keras' do; arrays (for example the ones
    ``optax.inject_hyperparams`` passes, possibly in bfloat16) are cast to
    ``dtype`` so that strict dtype promotion never sees a mixed pair.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return jnp.asarray(value).astype(dtype)


def divide_in_compute(g: jax.Array, divisor: ArrayLike) -> jax.Array:
    """``g / divisor`` computed in ``g``'s compute dtype, returned in its dtype."""
    dtype = compute_dtype(g.dtype)
    return (g.astype(dtype) / as_compute_scalar(divisor, dtype)).astype(g.dtype)


def per_dtype(scalars: Callable[[np.dtype], Any]) -> Callable[[np.dtype], Any]:
    """``scalars`` computed once per compute dtype, for all the leaves of one call.

    Scalars such as a bias correction or a learning rate are the same for every
    leaf of a dtype; computing them once keeps the traced program, and so the
    compile time, from growing by their cost per leaf. Make the cached function
    inside the update, so that nothing traced outlives the trace.
    """
    return functools.cache(scalars)


def state_dtype_of(leaf: ArrayLike, state_dtype: DTypeLike | None) -> np.dtype:
    """The dtype of a state leaf that mirrors ``leaf``."""
    return np.dtype(state_dtype) if state_dtype is not None else jnp.result_type(leaf)


def zeros_like_in(tree: Any, state_dtype: DTypeLike | None) -> Any:
    """Zeros like ``tree`` in ``state_dtype`` (default: each leaf's dtype).

    ``zeros_like`` keeps each leaf's sharding, so the state of sharded
    parameters is sharded the same way.
    """
    return jax.tree.map(
        lambda x: jnp.zeros_like(x, dtype=state_dtype_of(x, state_dtype)), tree
    )


def cast_like(tree: Any, reference: Any) -> Any:
    """Casts each leaf of ``tree`` to the dtype of its twin in ``reference``."""
    return jax.tree.map(lambda x, r: x.astype(jnp.result_type(r)), tree, reference)


def key_path_name(path: Sequence[Any]) -> str:
    """A leaf's key path written as ``"/"``-joined names.

    Dict keys, NamedTuple / dataclass fields and sequence indices each give one
    name, so the bias of a Flax ``Dense_0`` layer reads ``"params/Dense_0/bias"``.

    >>> import jax
    >>> paths = jax.tree_util.tree_flatten_with_path({"a": [0, {"b": 1}]})[0]
    >>> [key_path_name(path) for path, _ in paths]
    ['a/0', 'a/1/b']
    """
    names = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            names.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            names.append(entry.name)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            names.append(str(entry.idx))
        elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
            names.append(str(entry.key))
        else:
            names.append(str(entry))
    return "/".join(names)


def unwrap_variables(tree: Any) -> Any:
    """Replaces every Flax NNX ``Variable`` in ``tree`` by the array it holds.

    ``nnx.Optimizer`` keeps its optax state as ``OptVariable``s and ``nnx.state``
    returns ``Param``s; the accessors read through both. Flax is not imported
    here: without it loaded, no tree can hold a ``Variable``.
    """
    nnx = getattr(sys.modules.get("flax"), "nnx", None)
    variable = getattr(nnx, "Variable", None)
    if variable is None:
        return tree

    def unwrap(leaf: Any) -> Any:
        if not isinstance(leaf, variable):
            return leaf
        get_value = getattr(leaf, "get_value", None)  # flax >= 0.12
        return get_value() if get_value is not None else leaf.value

    return jax.tree.map(unwrap, tree, is_leaf=lambda x: isinstance(x, variable))


def find_states(tree: Any, kinds: type | tuple[type, ...]) -> list[Any]:
    """Every node of ``tree`` that is an instance of ``kinds``, outermost first.

    A match is not searched further, so a state nested in a matching state is
    not reported twice. Flax NNX variables inside a match are unwrapped.
    """
    return [
        unwrap_variables(node)
        for node in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kinds))
        if isinstance(node, kinds)
    ]


def check_float_params(params: Any, transform_name: str) -> None:
    """Parameters must be floating point: an optimizer cannot step integers."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"`{transform_name}` can only update floating-point parameters; "
                f"leaf {key_path_name(path)!r} has dtype {dtype}."
            )


def check_updates_match(updates: Any, reference: Any, transform_name: str) -> None:
    """Gradients must have the parameters' structure and shapes, and be floats.

    Runs at trace time on static information, so a mismatch is a clear error
    even inside ``jit``, not a failure deep in a tree map.
    """
    if jax.tree.structure(updates) != jax.tree.structure(reference):
        raise ValueError(
            f"`{transform_name}` got gradients whose tree structure does not "
            f"match the parameters'.\n  gradients:  {jax.tree.structure(updates)}"
            f"\n  parameters: {jax.tree.structure(reference)}"
        )
    flat = jax.tree_util.tree_flatten_with_path(updates)[0]
    for (path, g), r in zip(flat, jax.tree.leaves(reference), strict=True):
        name = key_path_name(path)
        if jnp.shape(g) != jnp.shape(r):
            raise ValueError(
                f"`{transform_name}`: gradient {name!r} has shape {jnp.shape(g)} "
                f"but the parameter has shape {jnp.shape(r)}."
            )
        if not jnp.issubdtype(jnp.result_type(g), jnp.floating):
            raise TypeError(
                f"`{transform_name}`: gradient {name!r} has dtype "
                f"{jnp.result_type(g)}; gradients must be floating point."
            )


def require_params(params: Any, transform_name: str) -> None:
    """Raises a clear error when a transformation that reads params gets none."""
    if params is None:
        raise ValueError(
            f"`{transform_name}` needs the current parameters: call "
            "`update(updates, state, params)`."
        )
