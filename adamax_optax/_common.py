"""Small helpers shared by the transformations: dtypes, hyperparameters, key paths."""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

COMPUTE_DTYPE = jnp.float32
"""The narrowest dtype any update rule computes in: float16 and bfloat16 leaves
compute in float32, float64 leaves (under ``jax_enable_x64``) in float64."""


_INTERNAL = frozenset({"adamax_optax", "jax", "jaxlib", "optax"})
"""The packages whose frames lie between a warning and the user's call (this
one, jax's tracing, ``optax.chain``)."""


def warn(message: str) -> None:
    """A ``UserWarning`` at the user's line: the first frame outside this
    package, jax and optax, however many of their wrappers the call went
    through."""
    frame = sys._getframe(1)
    level = 2  # the caller of this function
    while frame is not None and (
        frame.f_globals.get("__name__", "").partition(".")[0] in _INTERNAL
    ):
        frame = frame.f_back
        level += 1
    warnings.warn(message, UserWarning, stacklevel=level)


def is_complex(dtype: DTypeLike) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.complexfloating))


def real_dtype(dtype: DTypeLike) -> np.dtype:
    """The real dtype of ``dtype``'s precision: ``complex64 -> float32``."""
    return np.dtype(jnp.finfo(dtype).dtype)


def complex_dtype(dtype: DTypeLike) -> np.dtype:
    """The complex dtype of ``dtype``'s precision: ``float32 -> complex64``.

    Raises:
      TypeError: for float16 and bfloat16, which have no complex counterpart.
    """
    if is_complex(dtype):
        return np.dtype(dtype)
    complex_of = {
        np.dtype(np.float32): np.complex64,
        np.dtype(np.float64): np.complex128,
    }
    if np.dtype(dtype) not in complex_of:
        raise TypeError(f"{np.dtype(dtype)} has no complex counterpart.")
    return np.dtype(complex_of[np.dtype(dtype)])


def compute_dtype(*dtypes: DTypeLike) -> np.dtype:
    """The dtype leaves of ``dtypes`` compute in.

    The precision is the widest of float32 and the dtypes' own; the result is
    complex when any of them is complex (``complex64`` with ``float16`` gives
    ``complex64``, ``complex64`` with ``float64`` gives ``complex128``).
    """
    reals = [real_dtype(d) for d in (COMPUTE_DTYPE, *dtypes)]
    widest = max(reals, key=_itemsize)
    return complex_dtype(widest) if any(map(is_complex, dtypes)) else widest


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


def by_parts(fn: Callable[..., jax.Array], *arrays: jax.Array) -> jax.Array:
    """``fn(*arrays)``, with complex arrays split into their two parts.

    Every update of this package but the modulus is real-linear, so it applies
    to the real and the imaginary parts apart, with real scalars. Computed so,
    the real part of a complex leaf goes through the very arithmetic (and the
    same fusion by XLA) as a real leaf: a complex parameter whose imaginary
    parts stay zero moves exactly as the real one.
    """
    if not any(is_complex(a.dtype) for a in arrays):
        return fn(*arrays)
    real = fn(*(jnp.real(a) for a in arrays))
    imag = fn(*(jnp.imag(a) for a in arrays))
    return jax.lax.complex(real, imag)


def divide_by_real(x: jax.Array, divisor: ArrayLike) -> jax.Array:
    """``x / divisor`` for a real ``divisor`` in ``x``'s real dtype (or a Python
    number); a complex ``x`` has its two parts divided, so that a complex value
    with a zero imaginary part divides exactly as the real one does."""
    return by_parts(lambda x: x / divisor, x)


def divide_in_compute(g: jax.Array, divisor: ArrayLike) -> jax.Array:
    """``g / divisor`` computed in ``g``'s compute dtype, returned in its dtype."""
    dtype = compute_dtype(g.dtype)
    divisor = as_compute_scalar(divisor, real_dtype(dtype))
    return divide_by_real(g.astype(dtype), divisor).astype(g.dtype)


def per_dtype(scalars: Callable[[np.dtype], Any]) -> Callable[[np.dtype], Any]:
    """``scalars`` computed once per compute dtype, for all the leaves of one call.

    Scalars such as a bias correction or a learning rate are the same for every
    leaf of a dtype; computing them once keeps the traced program, and so the
    compile time, from growing by their cost per leaf. Make the cached function
    inside the update, so that nothing traced outlives the trace.
    """
    return functools.cache(scalars)


def sharded_like(x: jax.Array, reference: jax.Array) -> jax.Array:
    """``x`` with ``reference``'s sharding, where that sharding is explicit.

    Under a mesh with ``AxisType.Explicit`` axes, arrays sharded differently
    cannot be combined elementwise; a state leaf may be sharded unlike its
    gradient (ZeRO-1 shards the state over the data axis, the parameters not),
    so each rule brings its operands to one sharding first: the gradient and
    parameters to the state's, the new updates back to the parameters'. Under
    ``Auto`` axes XLA chooses, and this is a no-op.
    """
    target = getattr(jax.typeof(reference), "sharding", None)
    source = getattr(jax.typeof(x), "sharding", None)
    if target is None or source is None or source.spec == target.spec:
        return x
    explicit = jax.sharding.AxisType.Explicit
    if explicit not in getattr(target.mesh, "axis_types", ()):
        return x
    return jax.sharding.reshard(x, target)


def split_count(entry: Any, mesh: Any) -> int:
    """Into how many shards one dimension's entry of a partition spec (a mesh
    axis name, a tuple of them, or ``None``) splits it over ``mesh``."""
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    return int(np.prod([mesh.shape[name] for name in names]))


def last_axis_shards(x: ArrayLike) -> int:
    """Into how many shards ``x``'s last axis is split, where its sharding is
    explicit (known at trace time, the same under ``eval_shape``); else 1."""
    sharding = getattr(jax.typeof(x), "sharding", None) if np.ndim(x) else None
    spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
    if not spec or mesh is None or len(spec) < np.ndim(x):
        return 1
    if jax.sharding.AxisType.Explicit not in getattr(mesh, "axis_types", ()):
        return 1
    return split_count(spec[-1], mesh)


def state_dtype_of(leaf: ArrayLike, state_dtype: DTypeLike | None) -> np.dtype:
    """The dtype of a state leaf that mirrors ``leaf``.

    ``state_dtype`` sets the precision and the leaf its kind: a complex leaf
    with ``state_dtype=float32`` keeps ``complex64`` state, a real leaf with
    ``state_dtype=complex64`` keeps ``float32`` state.

    Raises:
      TypeError: for a complex leaf and a ``state_dtype`` without a complex
        counterpart (float16, bfloat16): the imaginary parts would be lost.
    """
    dtype = jnp.result_type(leaf)
    if state_dtype is None:
        return np.dtype(dtype)
    if not is_complex(dtype):
        return real_dtype(state_dtype)
    try:
        return complex_dtype(state_dtype)
    except TypeError:
        raise TypeError(
            f"`state_dtype={np.dtype(state_dtype)}` cannot hold the state of a "
            f"{dtype} parameter: it has no complex counterpart (use float32)."
        ) from None


def real_state_dtype_of(leaf: ArrayLike, state_dtype: DTypeLike | None) -> np.dtype:
    """The dtype of a real state leaf (a norm) that mirrors ``leaf``."""
    return real_dtype(state_dtype_of(leaf, state_dtype))


def zeros_like_in(
    tree: Any, state_dtype: DTypeLike | None, *, real: bool = False
) -> Any:
    """Zeros like ``tree`` in ``state_dtype`` (default: each leaf's dtype).

    ``real=True`` gives real zeros for complex leaves (a modulus' dtype).
    ``zeros_like`` keeps each leaf's sharding, so the state of sharded
    parameters is sharded the same way.
    """
    dtype_of = real_state_dtype_of if real else state_dtype_of
    return jax.tree.map(
        lambda x: jnp.zeros_like(x, dtype=dtype_of(x, state_dtype)), tree
    )


def as_arrays(tree: Any) -> Any:
    """``tree`` with Python numbers as JAX arrays (optax accepts them as leaves)."""
    return None if tree is None else jax.tree.map(jnp.asarray, tree)


def cast_to_params(updates: Any, params: Any | None, keep_wider: bool = False) -> Any:
    """``updates`` as arrays in each parameter's dtype; in their own dtypes
    without ``params`` (or with a tree unlike the updates', which the rules then
    report). ``keep_wider``: a real float update wider than its real float
    parameter (float32 for float16) keeps its dtype, so that the loss scale's
    division and the clipping run in it, as Keras runs them; the Adamax step
    casts it (:func:`adamax_optax.scale_by_keras_adamax`)."""
    if params is None or jax.tree.structure(updates) != jax.tree.structure(params):
        return as_arrays(updates)

    def cast(update: Any, param: Any) -> jax.Array:
        update, dtype = jnp.asarray(update), jnp.result_type(param)
        if (
            keep_wider
            and jnp.issubdtype(update.dtype, jnp.floating)
            and jnp.issubdtype(dtype, jnp.floating)
            and update.dtype.itemsize > np.dtype(dtype).itemsize
        ):
            return update
        return update.astype(dtype)

    return jax.tree.map(cast, updates, params)


key_path_name = functools.partial(jax.tree_util.keystr, simple=True, separator="/")
"""A leaf's key path as ``"/"``-joined names (``"params/Dense_0/bias"``)."""


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
    """Parameters must be real or complex floating point, never integers."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        try:
            dtype = jnp.result_type(leaf)
        except TypeError:  # a string, or any object that is not a number
            raise TypeError(
                f"`{transform_name}` can only update floating-point (real or "
                f"complex) parameters; leaf {key_path_name(path)!r} is "
                f"{leaf!r:.60} of type {type(leaf).__name__}, not an array."
            ) from None
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"`{transform_name}` can only update floating-point (real or "
                "complex) parameters; "
                f"leaf {key_path_name(path)!r} has dtype {dtype}."
            )


def check_tree_match(
    tree: Any, reference: Any, what: str, against: str, transform_name: str
) -> None:
    """``tree`` must have ``reference``'s structure and leaf shapes; the error
    names the leaves missing or extra by key path, or the first of another shape.
    Runs at trace time, on static information, so a mismatch is a clear error
    even inside ``jit``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    references = jax.tree_util.tree_flatten_with_path(reference)[0]
    names = [key_path_name(path) for path, _ in leaves]
    reference_names = [key_path_name(path) for path, _ in references]
    present, expected = frozenset(names), frozenset(reference_names)
    missing = [name for name in reference_names if name not in present]
    extra = [name for name in names if name not in expected]
    if missing or extra:
        differences = []
        if missing:
            differences.append(f"the {what} have no {_leaves(missing)}")
        if extra:
            differences.append(
                f"the {what} have {_leaves(extra)} that the {against} lacks"
            )
        raise ValueError(
            f"`{transform_name}`: the {what} do not match the {against}: "
            f"{'; '.join(differences)} (the {against}: {len(reference_names)} "
            f"leaves, the {what}: {len(names)})."
        )
    for index, name in enumerate(names):
        if name != reference_names[index]:
            break  # the same leaves in another order: the container check says so
        shape, wanted_shape = (
            jnp.shape(leaves[index][1]),
            jnp.shape(references[index][1]),
        )
        if shape != wanted_shape:
            raise ValueError(
                f"`{transform_name}`: leaf {name!r} has shape {shape} in the "
                f"{what}, {wanted_shape} in the {against}."
            )
    if jax.tree.structure(tree) != jax.tree.structure(reference):
        raise ValueError(
            f"`{transform_name}`: the {what} have the {against}'s leaves in another "
            f"container.\n  {what}: {jax.tree.structure(tree)}"
            f"\n  {against}: {jax.tree.structure(reference)}"
        )


def _leaves(names: list[str], shown: int = 3) -> str:
    """``leaf 'a'``, or ``leaves 'a', 'b', 'c' and 2 more``."""
    listed = ", ".join(repr(name) for name in names[:shown])
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{'leaf' if len(names) == 1 else 'leaves'} {listed}{more}"


STATE = "optimizer state"


def check_updates_match(updates: Any, reference: Any, transform_name: str) -> None:
    """Gradients must have the state's structure and shapes, and be floats."""
    check_tree_match(updates, reference, "gradients", STATE, transform_name)
    check_float_gradients(updates, transform_name)


def check_float_gradients(updates: Any, transform_name: str) -> None:
    """Gradients must be floating point (an integer or bool gradient is refused,
    naming the leaf, before anything casts it)."""
    for path, g in jax.tree_util.tree_flatten_with_path(updates)[0]:
        if not jnp.issubdtype(jnp.result_type(g), jnp.inexact):
            raise TypeError(
                f"`{transform_name}`: gradient {key_path_name(path)!r} has dtype "
                f"{jnp.result_type(g)}; gradients must be floating point "
                "(real or complex)."
            )


def require_params(
    params: Any, transform_name: str, reference: Any = None, against: str = STATE
) -> None:
    """A clear error when a transformation that reads params gets none, or
    parameters unlike ``reference`` (the state they made, or the gradients)."""
    if params is None:
        raise ValueError(
            f"`{transform_name}` needs the current parameters: call "
            "`update(updates, state, params)`."
        )
    if reference is not None:
        check_tree_match(params, reference, "params", against, transform_name)


def in_compute_dtype(x: ArrayLike) -> jax.Array:
    """``x`` as an array in its compute dtype."""
    x = jnp.asarray(x)
    return x.astype(compute_dtype(x.dtype))
