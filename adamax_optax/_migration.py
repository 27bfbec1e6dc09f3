"""Carrying a state over to another configuration of the optimizer, by role."""

from __future__ import annotations

import collections
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamax_optax import _common, _grouping
from adamax_optax import _quantization as q8
from adamax_optax._accumulation import AccumulateGradientsState
from adamax_optax._adamax import (
    ScaleByKerasAdamaxState,
    decoded_moments,
    encoded_moments,
)
from adamax_optax._dynamic_loss_scale import DynamicLossScaleState
from adamax_optax._ema import ParameterEMAState, is_masked
from adamax_optax._learning_rate import (
    ScaleByKerasLearningRateState,
    as_step_schedule,
)
from adamax_optax._loss_scale import UnscaleGradientsState
from adamax_optax._skip_nonfinite import SkipNonfiniteState
from adamax_optax._stochastic_rounding import StochasticRoundingState

ROLES: dict[str, tuple[type, frozenset[str]]] = {
    "adamax": (ScaleByKerasAdamaxState, frozenset()),
    "learning_rate": (ScaleByKerasLearningRateState, frozenset({"schedule_step"})),
    "ema": (ParameterEMAState, frozenset()),
    "accumulate": (AccumulateGradientsState, frozenset({"weight_sum"})),
    "dynamic_loss_scale": (
        DynamicLossScaleState,
        frozenset({"skipped_steps", "last_skipped"}),
    ),
    "skip_nonfinite": (SkipNonfiniteState, frozenset({"last_skipped"})),
    "loss_scale": (UnscaleGradientsState, frozenset()),
    "stochastic_rounding": (StochasticRoundingState, frozenset()),
}
"""Each role's state type, and the fields it gained after 0.1 (a state saved
by an earlier version may lack them)."""

INNER = "inner_state"

RENAMED = {"mini_step": "micro_step"}
"""Fields renamed since they were saved (0.2.0 and 0.1 called the
accumulator's micro-step counter ``mini_step``)."""


def _fields_of(node: Any) -> tuple[str, ...] | None:
    """The field names of a NamedTuple, or the keys of a string-keyed mapping
    (orbax restores a NamedTuple without a target as such a dict)."""
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return tuple(node._fields)
    if isinstance(node, Mapping) and node and all(isinstance(k, str) for k in node):
        return tuple(node)
    return None


def _current_names(fields: tuple[str, ...]) -> set[str]:
    return {RENAMED.get(name, name) for name in fields}


def _role_of(node: Any) -> str | None:
    for role, (kind, _) in ROLES.items():
        if isinstance(node, kind):
            return role
    fields = _fields_of(node)
    if fields is None:
        return None
    for role, (kind, added) in ROLES.items():
        every = set(kind._fields)
        if every - added <= _current_names(fields) <= every:
            return role
    return None


def _field(node: Any, name: str) -> Any:
    return node[name] if isinstance(node, Mapping) else getattr(node, name)


def _collect(node: Any, found: dict[str, list[dict[str, Any]]]) -> None:
    """Every role's own fields in ``node``, outermost first."""
    role = _role_of(node)
    if role is not None:
        names = [f for f in _fields_of(node) or () if f != INNER]
        found.setdefault(role, []).append(
            {RENAMED.get(f, f): _field(node, f) for f in names}
        )
        if INNER in (_fields_of(node) or ()):
            _collect(_field(node, INNER), found)
        return
    if isinstance(node, Mapping):
        for value in node.values():
            _collect(value, found)
    elif isinstance(node, list | tuple):
        for value in node:
            _collect(value, found)


def _is_absent(x: Any) -> bool:
    """An excluded leaf, or a ``None`` (a parameter's, or an exclusion as orbax
    restores it): a leaf of its own on both sides of :func:`_carry`."""
    return x is None or is_masked(x)


def _named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """``(key path, leaf)`` pairs, an excluded EMA leaf (``MaskedNode``, or
    ``None`` as orbax restores one without a target) as a leaf of its own."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_absent)[0]
    return [(_common.key_path_name(path), leaf) for path, leaf in flat]


def _carry(old: Any, fresh: Any, where: str) -> Any:
    """``old``'s values in ``fresh``'s structure and dtypes, leaf by leaf.

    Leaves are matched by key path where both trees name them alike (a
    NamedTuple state and the dicts orbax restores do), else by position. A
    leaf one side excludes (an EMA's ``MaskedNode``) is the other side's
    fresh value or stays excluded.
    """
    old_named = _named_leaves(old)
    fresh_named, treedef = jax.tree_util.tree_flatten(fresh, is_leaf=_is_absent)
    fresh_names = [name for name, _ in _named_leaves(fresh)]
    by_name = dict(old_named)
    if set(by_name) != set(fresh_names):
        if len(old_named) != len(fresh_names):
            raise ValueError(
                f"`migrate_state`: {where} has {len(old_named)} leaves in the old "
                f"state and {len(fresh_names)} in the new one: were both made for "
                "the same parameters?"
            )
        _common.warn(
            f"`migrate_state`: {where}'s leaves are named otherwise in the old "
            "state than in the new one; they are matched by position."
        )
        by_name = dict(zip(fresh_names, (leaf for _, leaf in old_named), strict=True))
    carried = []
    for name, f in zip(fresh_names, fresh_named, strict=True):
        o = by_name.get(name)
        if is_masked(f) or o is None or is_masked(o):
            carried.append(f)  # excluded now, or new: as `init` made it
            continue
        if np.shape(o) != np.shape(f):
            raise ValueError(
                f"`migrate_state`: leaf {name!r} of {where} has shape "
                f"{np.shape(o)} in the old state and {np.shape(f)} in the new one."
            )
        value = jnp.asarray(o)
        if jnp.issubdtype(value.dtype, jnp.complexfloating) and not jnp.issubdtype(
            f.dtype, jnp.complexfloating
        ):
            raise ValueError(
                f"`migrate_state`: leaf {name!r} of {where} is complex in the old "
                "state and real in the new one."
            )
        carried.append(value.astype(f.dtype))
    return jax.tree.unflatten(treedef, carried)


def _carry_moments(old: dict[str, Any], fresh: ScaleByKerasAdamaxState) -> Any:
    """The old ``m`` and ``u`` in the fresh state's form: decoded from 8 bits
    where the old state held them so, encoded where the fresh one does.

    One compiled program of the old moments alone (the fresh state gives only
    shapes, dtypes and blocks): run eagerly, each operation of the encoding
    compiled on its own for every leaf shape, about 2 s a shape on a CPU."""
    like_m, like_u = jax.eval_shape(lambda m, u: (m, u), fresh.m, fresh.u)
    fresh_m, fresh_u = jax.eval_shape(decoded_moments, like_m, like_u)

    @jax.jit
    def carried(old_m: Any, old_u: Any) -> Any:
        old_m, old_u = decoded_moments(*_from_restored(old_m, old_u))
        m = _carry(old_m, fresh_m, "adamax.m")
        u = _carry(old_u, fresh_u, "adamax.u")
        return encoded_moments(m, u, like_m)

    return carried(old["m"], old["u"])


def _is_restored_8bit(x: Any) -> bool:
    """Whether ``x`` is 8-bit moments as orbax restores them without a target:
    a ``{"codes", "scale"}`` dict of ``uint16`` codes."""
    if not isinstance(x, Mapping) or set(x) != {"codes", "scale"}:
        return False
    return getattr(x["codes"], "dtype", None) == np.uint16


def _from_restored(m: Any, u: Any) -> tuple[Any, Any]:
    """Moments as the state holds them, from the plain containers orbax
    restores without a target: an 8-bit leaf's ``{"codes", "scale"}`` dict
    (whose ``u`` was restored as ``None``) as ``Moments8Bit`` and its ``u`` as
    a ``MaskedNode``."""

    def is_node(x: Any) -> bool:
        return q8.is_8bit(x) or _is_restored_8bit(x)

    def restored(m: Any, u: Any) -> bool:
        return _is_restored_8bit(m) and (u is None or isinstance(u, optax.MaskedNode))

    def moments(m: Any, u: Any) -> Any:
        return q8.Moments8Bit(m["codes"], m["scale"]) if restored(m, u) else m

    def norm(m: Any, u: Any) -> Any:
        return optax.MaskedNode() if restored(m, u) else u

    return (
        jax.tree.map(moments, m, u, is_leaf=is_node),
        jax.tree.map(norm, m, u, is_leaf=is_node),
    )


def _read_restored_groups(found: dict[str, list[dict[str, Any]]], fresh: Any) -> None:
    """Reads, in place, each old field that orbax restored without a target
    from a grouped view, leaf by leaf: a dict of its parts, keyed by the
    leaves each holds (:func:`_grouping.part_key`), whatever groups the new
    optimizer makes there. A view of an earlier 0.2.0 build, a plain list of
    parts that does not say which leaves each holds, is refused."""
    like_found: dict[str, list[dict[str, Any]]] = {}
    _collect(fresh, like_found)
    for role, olds in found.items():
        likes = like_found.get(role, [])
        for position, old in enumerate(olds):
            like = likes[position] if position < len(likes) else {}
            for name, value in old.items():
                if name not in like:
                    continue
                view = like[name]
                if _is_per_leaf(value, _per_leaf_structure(view)):
                    continue
                members = _restored_members(value)
                if members is not None:
                    old[name] = _ungroup_restored(
                        value, members, view, f"{role}.{name}"
                    )
                elif _grouping.is_grouped(view) and isinstance(value, list | tuple):
                    raise ValueError(
                        f"`migrate_state`: the old state's {role}.{name} is a "
                        "grouped view of a checkpoint saved by an unreleased "
                        "0.2.0 build, which does not record which leaves each "
                        "part holds; such a checkpoint cannot be migrated."
                    )


def _per_leaf_structure(view: Any) -> Any:
    """A field of the fresh state in its per-leaf structure, its leaves
    ``None``: a grouped view's tree without unstacking its parts."""
    if not _grouping.is_grouped(view):
        return view
    treedef = view.layout.treedef
    return treedef.unflatten([None] * treedef.num_leaves)


def _is_per_leaf(value: Any, template: Any) -> bool:
    """Whether ``value`` is in the per-leaf form of ``template`` (a field of
    the fresh state, ungrouped): the same keys, or as many entries."""
    if isinstance(value, Mapping):
        return isinstance(template, Mapping) and {str(k) for k in value} == {
            str(k) for k in template
        }
    if isinstance(value, list | tuple):
        return isinstance(template, list | tuple) and len(value) == len(template)
    return True


def _restored_members(value: Any) -> dict[str, tuple[int, tuple[int, ...]]] | None:
    """Each part's position and members, by key, where ``value`` is a grouped
    view as orbax restores it without a target; else ``None``."""
    if not isinstance(value, Mapping) or not value:
        return None
    members: dict[str, tuple[int, tuple[int, ...]]] = {}
    for key in value:
        parsed = _grouping.members_of_key(str(key))
        if parsed is None:
            return None
        members[str(key)] = parsed
    return members


def _state_leaf(x: Any) -> bool:
    return q8.is_8bit(x) or isinstance(x, optax.MaskedNode)


def _ungroup_restored(
    value: Mapping[str, Any],
    members: dict[str, tuple[int, tuple[int, ...]]],
    view: Any,
    where: str,
) -> Any:
    """The tree of a grouped view restored without a target, each leaf its
    own array again (as :meth:`_grouping.Grouped.ungroup` reads a live one),
    in the structure of ``view``, the fresh state's field in its place."""
    by_position = sorted(members.items(), key=lambda item: item[1][0])
    groups = tuple(indices for _, (_, indices) in by_position)
    count = sum(len(indices) for indices in groups)
    if _grouping.is_grouped(view):
        treedef, names = view.layout.treedef, view.layout.names
    else:
        # An excluded leaf (a ``MaskedNode``) counts where the view was made
        # for all the parameters (an EMA's), not where for a subset of them
        # (``optax.masked``'s): as many leaves as the parts hold.
        for is_leaf in (_state_leaf, q8.is_8bit):
            flat, treedef = jax.tree_util.tree_flatten_with_path(view, is_leaf=is_leaf)
            if len(flat) == count:
                break
        names = tuple(_common.key_path_name(path) for path, _ in flat)
    if sorted(i for indices in groups for i in indices) != list(range(len(names))):
        raise ValueError(
            f"`migrate_state`: the old state's {where} holds {count} leaves in "
            f"its parts, the new state {len(names)} there: were both made for "
            "the same parameters? If so, restore the checkpoint against "
            "`jax.eval_shape(old_optimizer.init, params)`, which keeps the "
            "old state's layout, and migrate that."
        )
    shapes = ((),) * len(names)  # only checked against new gradients, never here
    old_layout = _grouping.Layout(treedef, groups, ((),) * len(groups), names, shapes)
    parts = [_part_from_restored(value[key]) for key, _ in by_position]
    return _grouping.Grouped(parts, old_layout).ungroup()


def _part_from_restored(value: Any) -> Any:
    """A part as the state held it, from what orbax restores without a
    target: 8-bit moments as a ``{"codes", "scale"}`` dict, a ``MaskedNode``
    as ``None``."""
    if _is_restored_8bit(value):
        return q8.Moments8Bit(value["codes"], value["scale"])
    return optax.MaskedNode() if value is None else value


def _default(role: str, field: str, old: dict[str, Any], fresh: Any) -> Any:
    """A field the old state lacks: a 0.1 accumulation group weighed each call
    1, so its weight is its micro-step count; anything else starts fresh."""
    if role == "accumulate" and field == "weight_sum" and "micro_step" in old:
        return jnp.asarray(old["micro_step"]).astype(jnp.asarray(fresh).dtype)
    if role == "learning_rate" and field == "schedule_step" and "count" in old:
        # A 0.1 schedule was at k * N + N - 1; a fresh state is at N - 1.
        count = jnp.asarray(old["count"]).astype(jnp.int32)
        return count * (fresh + 1) + fresh
    return fresh


def _rebuild(node: Any, found: dict[str, list[dict[str, Any]]]) -> Any:
    role = _role_of(node)
    if role is not None:
        kind = type(node)
        olds = found.get(role)
        if not olds:  # new in this configuration: as `init` made it
            if INNER not in kind._fields:
                return node
            return node._replace(**{INNER: _rebuild(node.inner_state, found)})
        old = olds.pop(0)
        values = {}
        if role == "adamax" and {"m", "u"} <= set(old):
            values["m"], values["u"] = _carry_moments(old, node)
        for name in kind._fields:
            fresh = getattr(node, name)
            if name in values:
                continue
            if name == INNER:
                values[name] = _rebuild(fresh, found)
            elif name in old:
                values[name] = _carry(old[name], fresh, f"{role}.{name}")
            else:
                values[name] = _default(role, name, old, fresh)
        return kind(**values)
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return type(node)(*(_rebuild(value, found) for value in node))
    if isinstance(node, Mapping):
        return type(node)((key, _rebuild(value, found)) for key, value in node.items())
    if isinstance(node, list | tuple):
        return type(node)(_rebuild(value, found) for value in node)
    return node


def _with_current_rate(optimizer: Any, state: Any) -> Any:
    """``state`` recording the rate its next update uses: the new optimizer's
    learning rate at the carried schedule step (the old rate may differ)."""
    update = getattr(optimizer, "update", None)
    arguments = getattr(update, "arguments", None)  # an `adamax` optimizer's
    if arguments is None:
        return state
    rate = as_step_schedule(arguments["learning_rate"])

    def record(node: Any) -> Any:
        if isinstance(node, ScaleByKerasLearningRateState):
            return node._replace(learning_rate=rate(node.schedule_step))
        return node

    return jax.tree.map(
        record, state, is_leaf=lambda x: isinstance(x, ScaleByKerasLearningRateState)
    )


def migrate_state(
    new_optimizer: optax.GradientTransformation,
    old_state: optax.OptState,
    params: optax.Params,
) -> optax.OptState:
    r"""A state for ``new_optimizer`` that keeps what ``old_state`` shares with it.

    Components are matched by role, not by position: the Adamax moments and
    count, the learning rate's count, the EMA and its count, the accumulator
    with its micro-step and weight sum, the loss scale with its counters, the
    skip counter. Whether accumulation, loss scaling or ``skip_nonfinite``
    wraps them does not matter, so options can be added or removed
    mid-training:

    * a component both configurations have carries over, cast to the new
      ``state_dtype``;
    * a component only the new one has starts as ``new_optimizer.init(params)``
      starts it (an EMA from the current parameters, a loss scale at its
      initial value);
    * a component only the old one has is dropped, with a warning naming it.

    An accumulation group in progress carries over: with a smaller
    ``gradient_accumulation_steps`` that it already fills, the next call ends
    it (its mean is its weighted sum over its weight, whatever its length).
    A schedule continues from the step it had reached (no jump in the learning
    rate) and then advances by the new ``N`` per update; the bias correction
    keeps its update count.

    ``old_state`` may be any pytree holding these components: a state of this
    version, a state saved by 0.1 (whose accumulation, dynamic loss scale and
    learning-rate states lack the weight sum, the skip counter and the schedule
    step: the weight sum becomes the group's micro-step count, the counter 0,
    the schedule step ``k * N + N - 1``), or the plain dicts that
    ``orbax`` restores without a target. A 0.1 state's schedule step is
    computed with the new optimizer's ``N``: convert it into the configuration
    that saved it first, then migrate. Given abstract leaves
    (``jax.ShapeDtypeStruct``, as ``jax.eval_shape(old_optimizer.init,
    params)`` makes), it returns the abstract new state: shapes and dtypes
    (and shardings under explicit mesh axes), without allocating.

    Args:
      new_optimizer: the optimizer to continue with.
      old_state: the state to carry over.
      params: the current parameters (for the shapes, and the components that
        start fresh).

    Returns:
      A state with the structure of ``new_optimizer.init(params)``.

    Raises:
      ValueError: if a shared component's leaves do not match the parameters.

    Example:
      >>> import jax.numpy as jnp
      >>> from adamax_optax import adamax, get_iterations, migrate_state
      >>> params = jnp.ones(3)
      >>> tx = adamax(0.1)
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...     _, state = tx.update(jnp.ones(3), state, params)
      >>> bigger = adamax(0.1, use_ema=True, gradient_accumulation_steps=2)
      >>> state = migrate_state(bigger, state, params)
      >>> int(get_iterations(state)), int(state["accumulate"].micro_step)
      (3, 0)
    """
    is_abstract = lambda x: isinstance(x, jax.ShapeDtypeStruct)  # noqa: E731
    if any(map(is_abstract, jax.tree.leaves((old_state, params)))):
        # Shapes and dtypes only (an orbax restore target): trace the same.
        return jax.eval_shape(
            lambda old, current: migrate_state(new_optimizer, old, current),
            old_state,
            params,
        )
    found: dict[str, list[dict[str, Any]]] = {}
    _collect(_grouping.ungroup(_off_other_meshes(old_state, params)), found)
    fresh = new_optimizer.init(params)
    _read_restored_groups(found, fresh)
    rebuilt = _grouping.regroup(_rebuild(_grouping.ungroup(fresh), found), fresh)
    new_state = _placed_like(_with_current_rate(new_optimizer, rebuilt), fresh)
    dropped = sorted(role for role, olds in found.items() if olds)
    if dropped:
        _common.warn(
            "`migrate_state`: the new optimizer has no place for these parts of "
            f"the old state, which are dropped: {', '.join(dropped)}."
        )
    return new_state


def _off_other_meshes(old_state: Any, params: Any) -> Any:
    """``old_state`` with each array that lives on devices or a mesh the
    parameters do not (orbax restores a checkpoint where it was saved) read
    to the host, so that its conversion runs beside the new parameters."""
    placements = [leaf.sharding for leaf in jax.tree.leaves(params) if _placed(leaf)]
    devices = {d for sharding in placements for d in sharding.device_set}
    meshes = {getattr(sharding, "mesh", None) for sharding in placements}

    def elsewhere(leaf: Any) -> bool:
        if not _placed(leaf) or not leaf.is_fully_addressable:
            return False
        if not leaf.sharding.device_set <= devices:
            return True
        mesh = getattr(leaf.sharding, "mesh", None)
        return mesh is not None and mesh not in meshes

    if not placements:
        return old_state
    return jax.tree.map(
        lambda leaf: np.asarray(leaf) if elsewhere(leaf) else leaf, old_state
    )


def _placed(leaf: Any) -> bool:
    """Whether ``leaf`` is an array with a placement (not a tracer)."""
    return isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)


def _placed_like(new_state: Any, fresh: Any) -> Any:
    """``new_state`` with each array placed as ``init`` placed the fresh
    state's (each leaf beside its parameter), not where the old state's
    values were."""

    def place(new: Any, made: Any) -> Any:
        if not (_placed(made) and _placed(new)) or not made.committed:
            return new  # `init` left it to follow its computation: so does this
        if new.sharding == made.sharding:
            return new
        return jax.device_put(new, made.sharding)

    return jax.tree.map(place, new_state, fresh)


def _components(tree: Any) -> set[str]:
    """What a state is made of: its roles and the names of its chains'
    members (``named_chain`` states are ``OrderedDict``s; the parameters'
    own trees inside a role are not looked into)."""
    found: set[str] = set()
    pending = [tree]
    while pending:
        node = pending.pop()
        role = _role_of(node)
        if role is not None:
            found.add(role)
            if INNER in (_fields_of(node) or ()):
                pending.append(_field(node, INNER))
        elif isinstance(node, collections.OrderedDict):
            found |= {str(key) for key in node}
            pending.extend(node.values())
        elif isinstance(node, list | tuple):
            pending.extend(node)
    return found


def state_mismatch(
    optimizer: optax.GradientTransformation, state: Any, like_params: Any
) -> str | None:
    """Why ``state`` was not made by ``optimizer.init`` for parameters like
    ``like_params`` (which components differ, and the way out), or ``None``
    when its components match (parameters unlike the state's are the blocks'
    own errors, which name the leaf). Structure only, at trace time."""
    state = _common.unwrap_variables(state)
    try:
        with warnings.catch_warnings():  # `init`'s warnings were given at `init`
            warnings.simplefilter("ignore")
            expected = jax.eval_shape(optimizer.init, like_params)
    except (TypeError, ValueError):
        return None  # unlike any parameters: the blocks' own checks say how
    if jax.tree.structure(state) == jax.tree.structure(expected):
        return None
    if jax.tree.structure(_grouping.ungroup(state)) == jax.tree.structure(
        _grouping.ungroup(expected)
    ):
        return (
            "The optimizer state holds the parameters' leaves grouped otherwise "
            "than this optimizer groups them (it stacks small leaves of one shape; "
            "a state may keep every leaf alone, or have other groups). Convert it with "
            "`adamax_optax.migrate_state(tx, old_state, params)`."
        )
    have, want = _components(state), _components(expected)
    if have == want:
        return None
    missing, extra = sorted(want - have), sorted(have - want)
    return (
        "The optimizer state was built for another configuration of `adamax`: "
        f"it lacks {missing or 'nothing'} and holds {extra or 'nothing'} beyond "
        "this optimizer's components. Convert it with "
        "`adamax_optax.migrate_state(tx, old_state, params)`, or build the "
        "optimizer it was made for."
    )
