"""Carrying a state over to another configuration of the optimizer, by role."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamax_optax._accumulation import AccumulateGradientsState
from adamax_optax._adamax import ScaleByKerasAdamaxState
from adamax_optax._dynamic_loss_scale import DynamicLossScaleState
from adamax_optax._ema import ParameterEMAState
from adamax_optax._learning_rate import ScaleByKerasLearningRateState
from adamax_optax._loss_scale import StaticLossScaleState
from adamax_optax._skip_nonfinite import SkipNonfiniteState

ROLES: dict[str, tuple[type, frozenset[str]]] = {
    "adamax": (ScaleByKerasAdamaxState, frozenset()),
    "learning_rate": (ScaleByKerasLearningRateState, frozenset()),
    "ema": (ParameterEMAState, frozenset()),
    "accumulate": (AccumulateGradientsState, frozenset({"weight_sum"})),
    "dynamic_loss_scale": (DynamicLossScaleState, frozenset({"skipped_steps"})),
    "skip_nonfinite": (SkipNonfiniteState, frozenset()),
    "loss_scale": (StaticLossScaleState, frozenset()),
}
"""Each role's state type, and the fields it gained after 0.1 (a state saved
by 0.1 lacks them)."""

INNER = "inner_state"


def _fields_of(node: Any) -> tuple[str, ...] | None:
    """The field names of a NamedTuple, or the keys of a string-keyed mapping
    (orbax restores a NamedTuple without a target as such a dict)."""
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return tuple(node._fields)
    if isinstance(node, Mapping) and node and all(isinstance(k, str) for k in node):
        return tuple(node)
    return None


def _role_of(node: Any) -> str | None:
    for role, (kind, _) in ROLES.items():
        if isinstance(node, kind):
            return role
    fields = _fields_of(node)
    if fields is None:
        return None
    for role, (kind, added) in ROLES.items():
        every = set(kind._fields)
        if every - added <= set(fields) <= every:
            return role
    return None


def _field(node: Any, name: str) -> Any:
    return node[name] if isinstance(node, Mapping) else getattr(node, name)


def _collect(node: Any, found: dict[str, list[dict[str, Any]]]) -> None:
    """Every role's own fields in ``node``, outermost first."""
    role = _role_of(node)
    if role is not None:
        names = [f for f in _fields_of(node) or () if f != INNER]
        found.setdefault(role, []).append({f: _field(node, f) for f in names})
        if INNER in (_fields_of(node) or ()):
            _collect(_field(node, INNER), found)
        return
    if isinstance(node, Mapping):
        for value in node.values():
            _collect(value, found)
    elif isinstance(node, list | tuple):
        for value in node:
            _collect(value, found)


def _carry(old: Any, fresh: Any, where: str) -> Any:
    """``old``'s values in ``fresh``'s structure and dtypes."""
    old_leaves = jax.tree.leaves(old)
    fresh_leaves, treedef = jax.tree.flatten(fresh)
    if len(old_leaves) != len(fresh_leaves):
        raise ValueError(
            f"`migrate_state`: {where} has {len(old_leaves)} leaves in the old "
            f"state and {len(fresh_leaves)} in the new one: were both made for "
            "the same parameters?"
        )
    carried = []
    for index, (o, f) in enumerate(zip(old_leaves, fresh_leaves, strict=True)):
        if np.shape(o) != np.shape(f):
            raise ValueError(
                f"`migrate_state`: leaf {index} of {where} has shape "
                f"{np.shape(o)} in the old state and {np.shape(f)} in the new one."
            )
        value = jnp.asarray(o)
        if jnp.issubdtype(value.dtype, jnp.complexfloating) and not jnp.issubdtype(
            f.dtype, jnp.complexfloating
        ):
            raise ValueError(
                f"`migrate_state`: leaf {index} of {where} is complex in the old "
                "state and real in the new one."
            )
        carried.append(value.astype(f.dtype))
    return jax.tree.unflatten(treedef, carried)


def _default(role: str, field: str, old: dict[str, Any], fresh: Any) -> Any:
    """A field the old state lacks: a 0.1 accumulation group weighed each call
    1, so its weight is its micro-step count; anything else starts fresh."""
    if role == "accumulate" and field == "weight_sum" and "mini_step" in old:
        return jnp.asarray(old["mini_step"]).astype(jnp.asarray(fresh).dtype)
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
        for name in kind._fields:
            fresh = getattr(node, name)
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
    The learning rate's count is the number of updates, so a schedule under a
    changed ``gradient_accumulation_steps`` is evaluated at ``k * N + N - 1``
    with the new ``N``.

    ``old_state`` may be any pytree holding these components: a state of this
    version, a state saved by 0.1 (whose accumulation and dynamic loss scale
    states lack the weight sum and the skip counter: the weight sum becomes the
    group's micro-step count, the counter 0), or the plain dicts that
    ``orbax`` restores without a target.

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
      >>> int(get_iterations(state)), int(state["accumulate"].mini_step)
      (3, 0)
    """
    found: dict[str, list[dict[str, Any]]] = {}
    _collect(old_state, found)
    new_state = _rebuild(new_optimizer.init(params), found)
    dropped = sorted(role for role, olds in found.items() if olds)
    if dropped:
        warnings.warn(
            "`migrate_state`: the new optimizer has no place for these parts of "
            f"the old state, which are dropped: {', '.join(dropped)}.",
            UserWarning,
            stacklevel=2,
        )
    return new_state
