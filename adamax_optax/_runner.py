"""The runner: how a transformation's update runs around a gate, without copies.

Gradient accumulation, a dynamic loss scale and skipping each decide, per call,
whether the transformation they wrap advances. Written as
``lax.cond(run, inner.update, keep)``, the updates leaving the conditional are
materialised (zeros on a skipped call) and, on older XLA, the state is copied.
A gated wrapper (:func:`gated`) runs such a call in two phases instead:

1. **advance** the inner state behind a gate (:func:`adamax_optax._gate.gate`),
   which keeps the state buffers in place and leaves them untouched when the
   gate is closed;
2. **emit** the updates after the gate, from the new state
   (:func:`emit_updates`), selected to zero by ``where(run, updates, 0)``, which
   XLA fuses into the caller's ``optax.apply_updates``.

Emitting from the new state needs each transformation to say how. It says so
in one way: its ``update`` is a :class:`Phases`, an ordinary optax update
function that also carries its ``emit`` (and, for a chain or a wrapper, its
members). Because it is the update function itself, ``_replace``, equality and
pytree flattening of the ``optax.GradientTransformationExtraArgs`` keep it.
Any other transformation is run again on its old state: correct, and free for a
stateless one (``optax.scale``, ``optax.clip_by_global_norm``), but a stateful
one keeps a copy of its state alive across the gate.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import optax

from adamax_optax import _common, _gate
from adamax_optax._gate import Gating, LeafMap

EmitUpdates = Callable[..., optax.Updates]
"""``emit(updates, state, new_state, params, **extra_args) -> updates``."""
UpdateMapped = Callable[..., tuple[optax.Updates, optax.OptState]]
"""``(raw_updates, leaf_map, state, params, **extra_args) -> (updates,
new_state)``: an ``update`` of ``tree.map(leaf_map, raw_updates)`` that applies
the map where XLA fuses it."""


@dataclasses.dataclass(frozen=True, eq=False)
class Phases:
    """An optax ``update`` function that also says how it runs around a gate.

    Attributes:
      update: the ordinary ``update(updates, state, params=None, **extra_args)``.
      emit: the updates of a call that advanced ``state`` to ``new_state``,
        ``emit(updates, state, new_state, params=None, **extra_args)``.
      update_mapped: an ``update`` that takes a pending :class:`LeafMap` (see
        :func:`update_mapped`), or ``None``.
      members: the transformations it is made of (a chain's, a wrapper's).
      gating: the gating a gated wrapper was given explicitly, else ``None``.
      leaf_map: for a transformation that maps every gradient leaf by one
        elementwise function and keeps its state (a fixed loss scale's
        division), that function, which a chain hands on to the next member.
      arguments: the keyword arguments :func:`adamax_optax.adamax` received.
    """

    update: Callable[..., tuple[optax.Updates, optax.OptState]]
    emit: EmitUpdates
    update_mapped: UpdateMapped | None = None
    members: tuple[optax.GradientTransformation, ...] = ()
    gating: Gating | None = None
    leaf_map: LeafMap | None = None
    arguments: Mapping[str, Any] | None = None

    def __call__(self, updates, state, params=None, **extra_args):
        return self.update(updates, state, params, **extra_args)


def phases_of(tx: Any) -> Phases | None:
    """``tx``'s :class:`Phases`, if its update function is one."""
    update = getattr(tx, "update", None)
    return update if isinstance(update, Phases) else None


def transformation(
    init: optax.TransformInitFn,
    update: Callable[..., tuple[optax.Updates, optax.OptState]] | None = None,
    **phases: Any,
) -> optax.GradientTransformationExtraArgs:
    """An optax transformation whose ``update`` is a :class:`Phases` of
    ``update`` and ``phases`` (without ``update``: ``update_mapped`` with no
    map)."""
    if update is None:
        mapped_update = phases["update_mapped"]

        def update(updates, state, params=None, **extra_args):
            return mapped_update(updates, None, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init, Phases(update, **phases))


def from_phases(
    init: optax.TransformInitFn,
    advance: Callable[..., optax.OptState],
    emit: Callable[..., optax.Updates],
) -> optax.GradientTransformationExtraArgs:
    """The transformation whose ``update`` is ``new_state = advance(updates,
    state, params)``, then ``emit(updates, new_state, params)``: a building
    block whose updates are a function of its new state (Adamax's direction of
    the new ``m`` and ``u``), so that it never keeps its old state alive.
    Extra arguments are dropped; Python numbers among the leaves become arrays."""

    def update(updates, state, params=None, **extra_args):
        updates, params = _common.as_arrays(updates), _common.as_arrays(params)
        new_state = advance(updates, state, params)
        return emit(updates, new_state, params), new_state

    def emit_from_new_state(updates, state, new_state, params=None, **extra_args):
        del state  # never read: a closed gate keeps no copy of it
        return emit(_common.as_arrays(updates), new_state, _common.as_arrays(params))

    return transformation(init, update, emit=emit_from_new_state)


def leafwise(
    init: optax.TransformInitFn, leaf_map: LeafMap
) -> optax.GradientTransformationExtraArgs:
    """The transformation that maps every gradient leaf by ``leaf_map`` and
    keeps its state; in a chain the map waits for the next member."""

    def update(updates, state, params=None, **extra_args):
        return _gate.mapped(updates, leaf_map), state

    def emit(updates, state, new_state, params=None, **extra_args):
        return _gate.mapped(updates, leaf_map)

    return transformation(init, update, emit=emit, leaf_map=leaf_map)


def update_mapped(
    tx: optax.GradientTransformation,
    raw_updates: optax.Updates,
    leaf_map: LeafMap | None,
    state: optax.OptState,
    params: optax.Params | None = None,
    **extra_args: Any,
) -> tuple[optax.Updates, optax.OptState]:
    """``tx.update(tree.map(leaf_map, raw_updates), state, params, **extra_args)``.

    A transformation that can (a chain, a gated wrapper) takes the map still
    pending and applies it where XLA fuses it: in the reductions that decide
    its gate and inside the gate, whose operand is then ``raw_updates``, a
    buffer already. Applied here instead, the mapped gradients would be a
    gate's operand, written out in full and read back.
    """
    phases = phases_of(tx)
    if phases is not None and phases.update_mapped is not None:
        return phases.update_mapped(raw_updates, leaf_map, state, params, **extra_args)
    tx = optax.with_extra_args_support(tx)
    return tx.update(_gate.mapped(raw_updates, leaf_map), state, params, **extra_args)


def emit_updates(
    tx: optax.GradientTransformation,
    updates: optax.Updates,
    state: optax.OptState,
    new_state: optax.OptState,
    params: optax.Params | None = None,
    **extra_args: Any,
) -> optax.Updates:
    """The updates of ``tx`` for a call that advanced ``state`` to ``new_state``."""
    phases = phases_of(tx)
    if phases is not None:
        return phases.emit(updates, state, new_state, params, **extra_args)
    tx = optax.with_extra_args_support(tx)
    return tx.update(updates, state, params, **extra_args)[0]


def nested_gating(gating: Gating | None, inner: optax.GradientTransformation) -> Any:
    """The gating of a wrapper around ``inner``: its own, else the one set
    explicitly on a wrapper inside ``inner``; different explicit values are an
    error."""
    _gate.check_gating(gating)
    found, pending = {gating} - {None}, [inner]
    while pending:
        phases = phases_of(pending.pop())
        if phases is not None:
            found |= {phases.gating} - {None}
            pending.extend(phases.members)
    if len(found) > 1:
        raise ValueError(
            "Nested gated wrappers were given different `gating` values: "
            f"{sorted(found)}. Give them one value, or set it on one of them."
        )
    return found.pop() if found else None


class GatedCall(NamedTuple):
    """What a gated wrapper decides on one call (see :func:`gated`).

    Attributes:
      run: whether the wrapped transformation advances on this call.
      state: the wrapper's new state, its ``inner_state`` still the old one.
      gradients: the gradients the wrapped transformation reads, the gate's
        operand (a buffer already).
      leaf_map: a map still pending on ``gradients``, applied inside the gate.
      inside: a function of ``gradients`` applied inside the gate, or ``None``.
    """

    run: jax.Array
    state: Any
    gradients: Any
    leaf_map: LeafMap | None = None
    inside: Callable[[Any], Any] | None = None


def gated(
    inner: optax.GradientTransformation,
    gating: Gating | None,
    *,
    init: Callable[[optax.Params], Any],
    decide: Callable[..., GatedCall],
    emitted: Callable[..., optax.Updates],
    ran: Callable[[Any], jax.Array],
    context: Callable[[], contextlib.AbstractContextManager[Any]] = (
        contextlib.nullcontext
    ),
) -> optax.GradientTransformationExtraArgs:
    """The gated wrapper of ``inner`` that each of accumulation, dynamic loss
    scaling and skipping is.

    ``init(params)`` is the wrapper's state with any ``inner_state``;
    ``decide(raw_updates, leaf_map, state, params, extra_args)`` a
    :class:`GatedCall`; ``emitted(updates, state, new_state, extra_args)`` the
    gradients the emit phase hands ``inner``; ``ran(new_state)`` whether the
    call advanced ``inner``. ``inner`` is initialised, updated and emitted
    inside ``context()``.
    """
    gating = nested_gating(gating, inner)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        own = init(params)
        with context():
            return own._replace(inner_state=inner.init(params))

    def update_mapped_fn(raw_updates, leaf_map, state, params=None, **extra_args):
        call = decide(raw_updates, leaf_map, state, params, extra_args)

        def advance(inner_state: Any, operands: Any) -> Any:
            gradients, current = operands
            if call.inside is not None:
                gradients = call.inside(gradients)
            with context():
                return update_mapped(
                    inner, gradients, call.leaf_map, inner_state, current, **extra_args
                )[1]

        inner_state = _gate.gate(
            call.run, advance, state.inner_state, (call.gradients, params), gating
        )
        new_state = call.state._replace(inner_state=inner_state)
        updates = _gate.mapped(raw_updates, leaf_map)
        return emit(updates, state, new_state, params, **extra_args), new_state

    def emit(updates, state, new_state, params=None, **extra_args):
        gradients = emitted(updates, state, new_state, extra_args)
        with context():
            updates = emit_updates(
                inner,
                gradients,
                state.inner_state,
                new_state.inner_state,
                params,
                **extra_args,
            )
        return _gate.select(ran(new_state), updates)

    return transformation(
        init_fn,
        emit=emit,
        update_mapped=update_mapped_fn,
        members=(inner,),
        gating=gating,
    )
