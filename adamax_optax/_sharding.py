"""ZeRO stage 1: the optimizer state sharded over the data-parallel axis."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from adamax_optax import _common, _grouping, _quantization
from adamax_optax._stochastic_rounding import StochasticRoundingState


def state_shardings(
    opt_state: Any,
    mesh: Mesh,
    axis_name: str,
    *,
    optimizer: optax.GradientTransformation | None = None,
    param_shardings: Any = None,
) -> Any:
    """Shardings that split each state leaf over ``axis_name`` (ZeRO stage 1).

    With data parallelism the parameters are replicated over the data axis, and
    by default every state leaf takes its parameter's sharding: each device holds
    the whole state. This returns, for a state of the same structure, a
    ``NamedSharding`` per leaf that also splits it over ``axis_name``:

    * an array leaf is split along its largest dimension that the axis size
      divides (after any split it already has), so each of the ``k`` devices of
      the axis holds ``1/k`` of it;
    * a leaf already sharded on other mesh axes keeps them (FSDP plus ZeRO); one
      already split over ``axis_name`` is kept as it is;
    * scalars, and leaves with no dimension the axis size divides, stay
      replicated over ``axis_name``, as does the key of
      :func:`stochastic_rounding` (a key's data is never split).

    A leaf's existing sharding is read from the leaf itself. Under ``Explicit``
    mesh axes ``jax.eval_shape(tx.init, params)`` carries the parameters'
    shardings; under ``Auto`` axes it does not, so for FSDP plus ZeRO there pass
    ``optimizer`` and ``param_shardings`` (a tree of the parameters' shardings):
    each state leaf that mirrors a parameter then starts from its sharding
    (``optax.tree.map_params`` finds them).

    Use it as the ``out_shardings`` of ``jax.jit(tx.init)`` and as the state's
    in and out shardings of the training step; the update itself is unchanged
    (under ``Explicit`` mesh axes each rule brings the gradient to the state's
    sharding and the updates back to the parameters').

    Args:
      opt_state: a state, concrete or abstract (``jax.eval_shape(tx.init,
        params)``, whose leaves carry their parameters' sharding when the
        parameters had one).
      mesh: the device mesh.
      axis_name: the mesh axis to split the state over (the data axis).
      optimizer: the transformation the state belongs to, with
        ``param_shardings``.
      param_shardings: the parameters' ``NamedSharding``s, a tree shaped like
        the parameters, with ``optimizer``.

    Returns:
      A pytree of ``NamedSharding`` with the structure of ``opt_state``.

    Raises:
      ValueError: if ``axis_name`` is not an axis of ``mesh``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from adamax_optax import adamax, state_shardings
      >>> mesh = jax.make_mesh((1,), ("data",))
      >>> tx = adamax(0.01, use_ema=True)
      >>> params = {"w": jnp.ones((8, 4))}
      >>> shardings = state_shardings(jax.eval_shape(tx.init, params), mesh, "data")
      >>> shardings["adamax"].m["w"].spec, shardings["adamax"].count.spec
      (P('data', None), P())
      >>> opt_state = jax.jit(tx.init, out_shardings=shardings)(params)
    """
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"`axis_name={axis_name!r}` is not an axis of the mesh; its axes are "
            f"{mesh.axis_names}."
        )
    if (optimizer is None) != (param_shardings is None):
        raise ValueError("Pass `optimizer` and `param_shardings` together.")
    size = mesh.shape[axis_name]

    def sharding(leaf: Any, base: Any = None) -> Any:
        if isinstance(leaf, optax.MaskedNode):  # an EMA leaf left out
            return leaf
        if _quantization.is_8bit(leaf):  # codes and scales split alike
            blocks = np.shape(leaf.scale)
            spec = split_spec(
                leaf.codes, base if base is not None else leaf.codes, blocks
            )
            # A split inherited from the parameter that cuts through blocks
            # (their length was chosen without the parameter's sharding, under
            # Auto axes) leaves the scales whole along it.
            scale_spec = [
                _dividing_part(entry, blocks[d], mesh) for d, entry in enumerate(spec)
            ]
            return _quantization.Moments8Bit(
                NamedSharding(mesh, PartitionSpec(*spec)),
                NamedSharding(mesh, PartitionSpec(*scale_spec)),
            )
        spec = split_spec(leaf, leaf if base is None else base)
        return NamedSharding(mesh, PartitionSpec(*spec))

    def split_spec(leaf: Any, base: Any, blocks: Any = None) -> list[Any]:
        """``leaf``'s partition with ``axis_name`` added to its largest
        dimension that takes it; with ``blocks`` (the shape of its block
        scales), only where every shard holds whole blocks."""
        shape = tuple(np.shape(leaf))
        spec = _spec_on(base, mesh, len(shape))
        if not shape or axis_name in _axes_of(spec):
            return spec
        counts = shape if blocks is None else tuple(blocks)
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            split = _common.split_count(spec[dim], mesh)
            if counts[dim] % split:  # its blocks straddle the shards already
                continue
            local = counts[dim] // split
            if local % size == 0 and local >= size:
                spec[dim] = _with_axis(spec[dim], axis_name)
                break
        return spec

    is_node = lambda x: isinstance(x, optax.MaskedNode) or _quantization.is_8bit(x)  # noqa: E731
    if optimizer is None:
        found = jax.tree.map(sharding, opt_state, is_leaf=is_node)
    else:
        # Each state leaf that mirrors a parameter starts from its sharding; a
        # stack of small leaves (adamax's grouped view) takes its first member's,
        # unsplit along the stacking axis.
        per_leaf = optax.tree.map_params(
            optimizer,
            sharding,
            _grouping.ungroup(opt_state),
            param_shardings,
            transform_non_params=sharding,
            is_leaf=is_node,
        )
        outer = jax.tree.structure(opt_state, is_leaf=_grouping.is_grouped)
        nodes = jax.tree.leaves(opt_state, is_leaf=_grouping.is_grouped)
        found = outer.unflatten(
            [
                _stacked_shardings(node, leaf) if _grouping.is_grouped(node) else leaf
                for node, leaf in zip(nodes, outer.flatten_up_to(per_leaf), strict=True)
            ]
        )
    # A key's data is never split (a uint32[2] divides a data axis of 2).
    whole = StochasticRoundingState(NamedSharding(mesh, PartitionSpec()))
    return jax.tree.map(
        lambda node, found: whole if _is_key(node) else found,
        opt_state,
        found,
        is_leaf=_is_key,
    )


def _is_key(node: Any) -> bool:
    return isinstance(node, StochasticRoundingState)


def _stacked_shardings(node: Any, member_shardings: Any) -> Any:
    """A grouped view's part shardings, from its leaves' own."""
    layout = node.layout
    leaves = jax.tree.leaves(
        member_shardings,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode) or _quantization.is_8bit(x),
    )

    def unsplit_stack(sharding: Any) -> Any:
        if not isinstance(sharding, NamedSharding):
            return sharding
        return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))

    parts = []
    for members in layout.members:
        first = leaves[members[0]]
        if len(members) > 1:
            first = jax.tree.map(unsplit_stack, first)
        parts.append(first)
    return _grouping.Grouped(parts, layout)


def _spec_on(leaf: Any, mesh: Mesh, ndim: int) -> list[Any]:
    """The partition of a leaf (or a sharding) over ``mesh``'s axes, one entry
    per dimension."""
    current = (
        leaf if isinstance(leaf, NamedSharding) else getattr(leaf, "sharding", None)
    )
    spec = getattr(current, "spec", None)
    if spec is None or getattr(current, "mesh", None) is None:
        return [None] * ndim
    if tuple(current.mesh.axis_names) != tuple(mesh.axis_names):
        return [None] * ndim
    entries = list(spec) + [None] * (ndim - len(spec))
    return entries[:ndim]


def _axes_of(spec: list[Any]) -> set[str]:
    axes: set[str] = set()
    for entry in spec:
        if isinstance(entry, str):
            axes.add(entry)
        elif isinstance(entry, tuple):
            axes.update(entry)
    return axes


def _dividing_part(entry: Any, count: int, mesh: Mesh) -> Any:
    """The longest leading part of a dimension's mesh axes whose shards divide
    ``count`` (``None`` if none does)."""
    names = () if entry is None else (entry,) if isinstance(entry, str) else entry
    names = tuple(names)
    while names and count % _common.split_count(names, mesh):
        names = names[:-1]
    if not names:
        return None
    return names[0] if len(names) == 1 else names


def _with_axis(entry: Any, axis_name: str) -> Any:
    if entry is None:
        return axis_name
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    return (*names, axis_name)
