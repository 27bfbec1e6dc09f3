"""Multi-tensor execution: the small leaves of one shape and dtype, stacked.

Every leaf of a pytree costs a step something whatever its size: its own
kernels, its own buffers in the call, its own copy of the optimizer's HLO (and
of its compile time). A model of many small leaves (a deep MLP's biases, a
transformer's layer norms) pays that per leaf, not per byte. :func:`grouped`
runs a transformation on a *grouped view* of the tree instead: the leaves that
share a shape, a dtype and a label (their weight-decay and EMA exclusions),
:data:`MIN_SHARED` of them or more, are stacked into one array per group, up
to :data:`MAX_MEMBERS` leaves of fewer than :data:`MAX_ELEMENTS` elements
each, and the state keeps them stacked. A step then gathers the gradients into
their groups once, runs the optimizer's elementwise math once per group, and
slices the updates back, where XLA fuses each slice into the caller's
``optax.apply_updates``.

A tree with nothing to group (every leaf large, or of a shape shared by few
others) is left as it is: the view is the tree itself, and so is the state.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamax_optax import _common, _quantization, _runner

MAX_ELEMENTS = 2**16
"""A leaf of this many elements or more is never stacked: its bytes, not its
fixed cost, set its time, and stacking would copy its gradient."""

MIN_SHARED = 64
"""The fewest leaves that must share a shape, a dtype, a sharding and a label
for them to be stacked. XLA's CPU backend compiles each distinct kernel once,
so the updates of a few equal leaves cost one kernel's compile however many
they are, while their stacks cost a gather and a parameter write per position
in a stack: a ResNet-50's 106 BatchNorm leaves (8 to 32 a shape) compiled
1.18x slower stacked than per leaf (10.5 s against 8.9 s, the whole step on a
2-core CPU). A deep stack of equal layers (hundreds of leaves a shape) is where
stacking pays."""

MAX_MEMBERS = 16
"""The most leaves in one group. XLA's CPU backend compiles the slices of one
buffer in a time that grows faster than their number (500 slices of one stack:
5 to 10 s; in stacks of 16: under 1 s), so many equal leaves make several
groups."""


class LeafMismatchError(ValueError):
    """A leaf of the parameters or gradients unlike the one the state was made
    for (its message names the leaf)."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which leaves of a tree (by their index in its flattening) form each
    part of its grouped view, and each part's label; static, hashable."""

    treedef: Any
    members: tuple[tuple[int, ...], ...]
    labels: tuple[Hashable, ...]
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...] = ()

    @property
    def is_identity(self) -> bool:
        return all(len(indices) == 1 for indices in self.members)

    def parts(self, leaves: Sequence[Any]) -> tuple[Any, ...]:
        """The parts made of a tree's ``leaves`` (in flattening order): each
        leaf alone, or its group's leaves stacked on a new axis 0."""
        return tuple(_stack([leaves[i] for i in idx]) for idx in self.members)

    def check(self, tree: Any, what: str) -> tuple[list[Any], Any]:
        """``tree``'s leaves and structure, once its leaves are known to be
        those this layout was made for (by name, in order, and shape; the
        error names the first leaf that differs)."""
        with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
        names = [_common.key_path_name(path) for path, _ in with_paths]
        if names != list(self.names):
            raise ValueError(_leaves_unlike(names, self.names, what))
        for name, (_, leaf), shape in zip(names, with_paths, self.shapes, strict=True):
            if tuple(jnp.shape(leaf)) != shape:
                raise LeafMismatchError(
                    f"`adamax`: leaf {name!r} has shape {tuple(jnp.shape(leaf))} "
                    f"in the {what}, {shape} in the optimizer state."
                )
        if what == "parameters" and self.dtypes:  # gradients may differ
            for name, (_, leaf), dtype in zip(
                names, with_paths, self.dtypes, strict=True
            ):
                if _dtype_name(leaf) != dtype:
                    raise LeafMismatchError(
                        f"`adamax`: parameter {name!r} is {_dtype_name(leaf)}, "
                        f"{dtype} when the optimizer state was made for it. Make "
                        "the state for the parameters as they are (`init`, or "
                        "`migrate_state(tx, state, params)`)."
                    )
        return [leaf for _, leaf in with_paths], treedef

    def leaves(self, parts: Sequence[Any]) -> list[Any]:
        """The leaves of the tree, in flattening order, from its parts."""
        leaves: list[Any] = [None] * len(self.names)
        for part, indices in zip(parts, self.members, strict=True):
            for index, leaf in zip(indices, _unstack(part, len(indices)), strict=True):
                leaves[index] = leaf
        return leaves


def _stack(leaves: list[Any]) -> Any:
    if len(leaves) == 1:
        return leaves[0]
    first = leaves[0]
    if isinstance(first, optax.MaskedNode):
        return first
    if _quantization.is_8bit(first):  # 8-bit moments: codes and scales
        return jax.tree.map(lambda *xs: _stack(list(xs)), *leaves)
    if isinstance(first, jax.ShapeDtypeStruct):  # an abstract tree
        return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype)
    # Gradients of one group's parameters may differ in dtype (a float32
    # gradient keeps it until the Adamax step): stacked in the widest, a
    # deliberate promotion that strict mode would refuse.
    with jax.numpy_dtype_promotion("standard"):
        dtype = jnp.result_type(*leaves)
    # One primitive a leaf: a step traces this for every small leaf of the
    # gradients and the parameters.
    return jax.lax.concatenate(
        [jax.lax.expand_dims(_in_dtype(x, dtype), (0,)) for x in leaves], 0
    )


def _in_dtype(x: Any, dtype: Any) -> jax.Array:
    if isinstance(x, jax.Array) and x.dtype == dtype:
        return x
    return jnp.asarray(x, dtype)


def _unstack(part: Any, count: int) -> list[Any]:
    if count == 1:
        return [part]
    if isinstance(part, optax.MaskedNode):
        return [part] * count
    if isinstance(part, jax.ShapeDtypeStruct):
        return [jax.ShapeDtypeStruct(part.shape[1:], part.dtype)] * count
    if isinstance(part, bool | np.bool_):  # a label mask's entry
        return [part] * count
    if _quantization.is_8bit(part):
        codes, scales = (_unstack(x, count) for x in (part.codes, part.scale))
        return [
            _quantization.Moments8Bit(c, s) for c, s in zip(codes, scales, strict=True)
        ]
    part = _whole_on_axis_0(part)
    return [jax.lax.squeeze(x, (0,)) for x in jax.lax.split(part, [1] * count)]


def _whole_on_axis_0(part: jax.Array) -> jax.Array:
    """``part``, gathered along its stacking axis where that axis is split over
    explicit mesh axes (jax cannot slice one member out of a split axis; a
    state sharded by a rule of its own may split it)."""
    sharding = getattr(jax.typeof(part), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if not spec or spec[0] is None:
        return part
    if jax.sharding.AxisType.Explicit not in getattr(sharding.mesh, "axis_types", ()):
        return part
    whole = jax.sharding.PartitionSpec(None, *spec[1:])
    return jax.sharding.reshard(part, jax.sharding.NamedSharding(sharding.mesh, whole))


def part_key(index: int, members: Sequence[int]) -> str:
    """A part's key in the state's key paths: its position and its members
    (the leaves' indices in the tree's flattening, runs written ``atob``),
    so that a checkpoint restored without a target, which drops the
    layout, still says which leaves each part holds:
    ``part_key(2, (5, 6, 7, 9)) == "part2_m5to7_9"`` (a part holds one leaf
    or more)."""
    runs: list[str] = []
    start = previous = members[0]
    for member in (*members[1:], None):
        if member is not None and member == previous + 1:
            previous = member
            continue
        runs.append(str(start) if start == previous else f"{start}to{previous}")
        if member is not None:
            start = previous = member
    return f"part{index}_m" + "_".join(runs)


_PART_KEY = re.compile(r"part(\d+)_m(\d+(?:to\d+)?(?:_\d+(?:to\d+)?)*)", re.ASCII)


def members_of_key(key: str) -> tuple[int, tuple[int, ...]] | None:
    """The position and members that :func:`part_key` wrote in ``key``, or
    ``None`` for a key it did not write."""
    match = _PART_KEY.fullmatch(key)
    if match is None:
        return None
    members: list[int] = []
    for run in match.group(2).split("_"):
        first, _, last = run.partition("to")
        if last and int(last) <= int(first):
            return None
        members.extend(range(int(first), int(last or first) + 1))
    return int(match.group(1)), tuple(members)


def _mask_flags(treedef: Any, mask: Any, name: str) -> list[Any]:
    """``mask``'s entries, one per parameter leaf; a tree of another
    structure than the parameters' is refused, naming the argument."""
    try:
        return treedef.flatten_up_to(mask)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"`{name}`: the tree of bools must have the parameters' structure ({error})"
        ) from None


def _leaves_unlike(names: Sequence[str], expected: Sequence[str], what: str) -> str:
    """Why the leaves ``names`` of the ``what`` are not the state's
    ``expected``: which leaf either side lacks, or else the first that is in
    another place."""
    missing = [n for n in expected if n not in names]
    extra = [n for n in names if n not in expected]
    if not missing and not extra:
        index, name, want = next(
            (i, n, w)
            for i, (n, w) in enumerate(zip(names, expected, strict=True))
            if n != w
        )
        return (
            f"`adamax`: the {what} hold the optimizer state's leaves in another "
            f"order: leaf {index} is {name!r} in the {what}, {want!r} in the state."
        )
    counts = (
        ""
        if len(names) == len(expected)
        else f"the {what} have {len(names)} leaves, the optimizer state "
        f"{len(expected)}; "
    )
    return (
        f"`adamax`: {counts}the {what} are not the leaves the optimizer state "
        "was made for: "
        + "; ".join(
            ([f"the {what} have no leaf {missing[0]!r}"] if missing else [])
            + ([f"the state has no leaf {extra[0]!r}"] if extra else [])
        )
        + "."
    )


@jax.tree_util.register_pytree_with_keys_class
class Grouped:
    """The grouped view of a tree: one entry per part (a leaf, or a stack of
    equal leaves on axis 0), with the :class:`Layout` as static data.

    Read it as the tree it stands for with :meth:`ungroup`.
    """

    def __init__(self, parts: Sequence[Any], layout: Layout):
        self.parts = tuple(parts)
        self.layout = layout

    def tree_flatten_with_keys(self) -> tuple[Any, Layout]:
        keys = [
            jax.tree_util.DictKey(part_key(index, members))
            for index, members in enumerate(self.layout.members)
        ]
        return list(zip(keys, self.parts, strict=True)), self.layout

    def tree_flatten(self) -> tuple[tuple[Any, ...], Layout]:
        # Flattening without keys (every jitted call's arguments) builds none.
        return self.parts, self.layout

    @classmethod
    def tree_unflatten(cls, layout: Layout, parts: Sequence[Any]) -> Grouped:
        return cls(parts, layout)

    def ungroup(self) -> Any:
        """The tree this view stands for (each leaf its own array again)."""
        return self.layout.treedef.unflatten(self.layout.leaves(self.parts))

    def stacked(self) -> tuple[bool, ...]:
        """Whether each part stacks several leaves (on its axis 0)."""
        return tuple(len(indices) > 1 for indices in self.layout.members)

    def __repr__(self) -> str:
        leaves, parts = len(self.layout.names), len(self.layout.members)
        return f"Grouped({leaves} leaves in {parts} parts)"


def is_grouped(x: Any) -> bool:
    return isinstance(x, Grouped)


def _spec(leaf: Any) -> Hashable:
    """A leaf's partition spec where jax knows it at trace time (explicit
    mesh axes), else ``None``: the same at ``init`` and under ``eval_shape``."""
    try:
        sharding = jax.typeof(leaf).sharding
    except (TypeError, AttributeError):
        return None
    spec = getattr(sharding, "spec", None)
    return None if spec is None else tuple(spec)


def layout_of(tree: Any, labels: Any) -> Layout:
    """The layout that groups ``tree``'s small leaves by shape, dtype, explicit
    sharding and label (``labels``: a tree of hashables shaped like ``tree``),
    where :data:`MIN_SHARED` leaves or more share all four."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = tuple(_common.key_path_name(path) for path, _ in with_paths)
    leaves = [leaf for _, leaf in with_paths]
    label_leaves = treedef.flatten_up_to(labels)
    keys = [
        _group_key(leaf, label)
        for leaf, label in zip(leaves, label_leaves, strict=True)
    ]
    shared = collections.Counter(key for key in keys if key is not None)
    members: list[list[int]] = []
    part_labels: list[Hashable] = []
    open_groups: dict[Hashable, int] = {}
    for index, (key, label) in enumerate(zip(keys, label_leaves, strict=True)):
        if key is not None and shared[key] < MIN_SHARED:
            key = None
        part = open_groups.get(key) if key is not None else None
        if part is None or len(members[part]) >= MAX_MEMBERS:
            members.append([])
            part_labels.append(label)
            part = len(members) - 1
            if key is not None:
                open_groups[key] = part
        members[part].append(index)
    return Layout(
        treedef,
        tuple(tuple(indices) for indices in members),
        tuple(part_labels),
        names,
        tuple(tuple(np.shape(leaf)) for leaf in leaves),
        tuple(_dtype_name(leaf) for leaf in leaves),
    )


def _dtype_name(leaf: Any) -> str:
    try:
        return np.dtype(jnp.result_type(leaf)).name
    except TypeError:
        return type(leaf).__name__


def _group_key(leaf: Any, label: Hashable) -> Hashable | None:
    """What a leaf must share with others to be stacked with them, or ``None``
    for a leaf kept alone (large, not a floating array, or not an array)."""
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dtype is None or not hasattr(leaf, "ndim"):
        return None
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        return None
    if not jnp.issubdtype(dtype, jnp.inexact):
        return None
    if int(np.prod(shape)) >= MAX_ELEMENTS:
        return None
    return (tuple(shape), dtype.name, _spec(leaf), label)


def group(tree: Any, layout: Layout) -> Any:
    """``tree`` in its grouped view (``tree`` itself under an identity layout)."""
    if layout.is_identity:
        return tree
    return Grouped(layout.parts(layout.treedef.flatten_up_to(tree)), layout)


def ungroup(tree: Any) -> Any:
    """A tree with every :class:`Grouped` view in it read as its own tree."""
    return jax.tree.map(
        lambda x: x.ungroup() if is_grouped(x) else x, tree, is_leaf=is_grouped
    )


def regroup(per_leaf: Any, like: Any) -> Any:
    """``per_leaf`` (a tree shaped like ``ungroup(like)``) with the views of
    ``like`` in it: the state a grouped optimizer keeps, from its per-leaf form."""
    outer = jax.tree.structure(like, is_leaf=is_grouped)
    templates = jax.tree.leaves(like, is_leaf=is_grouped)
    parts = outer.flatten_up_to(per_leaf)
    return outer.unflatten(
        [
            group(p, t.layout) if is_grouped(t) else p
            for p, t in zip(parts, templates, strict=True)
        ]
    )


def layout_in(state: Any) -> Layout | None:
    """The layout of the first grouped view in ``state``, if any."""
    for node in jax.tree.leaves(state, is_leaf=is_grouped):
        if is_grouped(node):
            return node.layout
    return None


def map_members(
    fn: Callable[[jax.Array, tuple[int, ...] | None], Any], tree: Any
) -> Any:
    """``fn(leaf, axes)`` on every leaf of ``tree``, where ``axes`` are the axes
    that span one original leaf (``None``: all of them); for a stacked part of
    a grouped view, every axis but the stacking axis 0."""
    if not is_grouped(tree):
        return jax.tree.map(lambda x: fn(x, None), tree)
    parts = [
        fn(part, tuple(range(1, jnp.ndim(part))) if stacked else None)
        for part, stacked in zip(tree.parts, tree.stacked(), strict=True)
    ]
    return Grouped(parts, tree.layout)


def labelled(mask: Callable[[Any], Any], name: str) -> Callable[[Any], Any]:
    """``mask`` (``params -> tree of bools``), which on a grouped view reads
    whether ``name`` is in each part's label instead (see :func:`grouped`)."""

    def read(tree: Any) -> Any:
        if not is_grouped(tree):
            return mask(tree)
        return Grouped([name in label for label in tree.layout.labels], tree.layout)

    return read


def grouped(
    inner: optax.GradientTransformation,
    masks: Mapping[str, Callable[[Any], Any]] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """``inner`` run on the grouped view of the parameters and gradients.

    ``masks`` (by name, ``params -> tree of bools``, made with
    :func:`labelled`) label each leaf with the names whose mask holds there;
    leaves of unlike labels are never stacked together, so that each mask,
    given to a member of ``inner``, reads the labels of the view. ``init``
    fixes the layout (from the parameters); ``update`` checks the gradients
    against it, leaf by leaf, by name.
    """
    inner = optax.with_extra_args_support(inner)
    masks = dict(masks or {})

    def leaf_labels(params: Any) -> list[tuple[str, ...]]:
        """Each leaf's label: the names of the masks that hold there."""
        treedef = jax.tree.structure(params)
        flags = {
            name: _mask_flags(treedef, m(params), name) for name, m in masks.items()
        }
        return [
            tuple(sorted(name for name in masks if flags[name][i]))
            for i in range(treedef.num_leaves)
        ]

    def layout_for(params: Any) -> Layout:
        treedef = jax.tree.structure(params)
        return layout_of(params, treedef.unflatten(leaf_labels(params)))

    def check_labels(layout: Layout, params: Any) -> None:
        """Refuses a state whose stacks were labelled by other exclusions
        than this optimizer's: its members would read the state's labels."""
        if not masks:
            return
        labels = leaf_labels(params)
        for label, members in zip(layout.labels, layout.members, strict=True):
            kept = tuple(name for name in label if name in masks)
            for index in members:
                if labels[index] != kept:
                    here = ", ".join(labels[index]) or "no exclusion"
                    there = ", ".join(kept) or "no exclusion"
                    raise LeafMismatchError(
                        f"`adamax`: leaf {layout.names[index]!r} has {here} in "
                        f"this optimizer and {there} in the optimizer state: the "
                        "state was made by an optimizer with other exclusions. "
                        "Make the state for this one: `migrate_state(tx, state, "
                        "params)`."
                    )

    def init_fn(params: optax.Params) -> optax.OptState:
        if not jax.tree.leaves(params):  # optax's placeholder (`map_params`)
            return inner.init(params)
        return inner.init(group(params, layout_for(params)))

    def view(updates: Any, state: Any, params: Any) -> tuple[Any, Any, Any]:
        """The gradients and parameters grouped as the state is, and a function
        that reads updates back in the gradients' structure."""
        layout = layout_in(state)
        if layout is None:
            return updates, params, lambda updates: updates
        leaves, treedef = layout.check(updates, "gradients")
        if params is not None:
            param_leaves = layout.check(params, "parameters")[0]
            check_labels(layout, params)
            params = Grouped(layout.parts(param_leaves), layout)
        return (
            Grouped(layout.parts(leaves), layout),
            params,
            lambda grouped: treedef.unflatten(layout.leaves(grouped.parts)),
        )

    def update_fn(updates, state, params=None, **extra_args):
        updates, params, back = view(updates, state, params)
        updates, new_state = inner.update(updates, state, params, **extra_args)
        return back(updates), new_state

    def emit_fn(updates, state, new_state, params=None, **extra_args):
        updates, params, back = view(updates, new_state, params)
        return back(
            _runner.emit_updates(inner, updates, state, new_state, params, **extra_args)
        )

    return _runner.transformation(init_fn, update_fn, emit=emit_fn, members=(inner,))
