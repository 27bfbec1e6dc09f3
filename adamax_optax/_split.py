"""Updates split in two phases, so that a skipped call costs nothing.

Gradient accumulation and dynamic loss scaling must sometimes leave the whole
state alone. Written as ``lax.cond(run, update, keep)`` that costs a copy of
every state buffer on a skipped call (a conditional's results get buffers of
their own), and the updates leaving either branch are materialised. The
transformations of this package therefore split ``update`` in two phases:

* ``advance(updates, state, params, gate)``: the new state, every array of it;
* ``emit(updates, state, new_state, params, gate)``: the updates, computed from
  the new state (and only the scalars of the old one).

``update = emit(advance(...))``, as :class:`SplitUpdate` calls them. A
:class:`Gate` asks for a conditional call: ``advance`` then runs inside a
``fori_loop`` of 0 or 1 trips, which updates the state buffers in place and
leaves them untouched when it does not run, and ``emit`` returns
``where(run, updates, 0)``, which XLA fuses into the caller's
``optax.apply_updates``: a skipped call reads and writes the parameters and
nothing else. A gate can also divide the incoming updates by a scalar (a loss
scale); the division then happens inside the loop, never into a gradient-sized
temporary.

Each loop body opens with ``lax.optimization_barrier`` on the loop counter, the
state, the updates and the parameters: without it XLA hoists whatever depends
on the updates or parameters alone (a division, a dtype conversion) out of the
loop, where it runs on every call into fresh full-size buffers.

A transformation not built from this package's blocks is split by running its
``update`` in both phases; its updates are then recomputed from the old state
outside the loop, which is correct but keeps a copy of its state.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adamax_optax import _common

Advance = Callable[..., optax.OptState]
"""``(updates, state, params, **extra_args) -> new_state``."""
Emit = Callable[..., optax.Updates]
"""``(updates, state, new_state, params, **extra_args) -> updates``."""
Update = Callable[..., tuple[optax.Updates, optax.OptState]]
"""``(updates, state, params, **extra_args) -> (updates, new_state)``."""


class Phases(NamedTuple):
    """The ungated phases of a transformation, and both run in one pass.

    ``update`` equals ``emit(advance(...))``; a chain computes each member's
    updates once in it, where ``advance`` and ``emit`` each recompute them (the
    next member's ``advance`` needs them), which doubles what is traced.
    """

    advance: Advance
    emit: Emit
    update: Update


def sequential_update(advance_now: Advance, emit_now: Emit) -> Update:
    """``update`` of two ungated phases: ``advance_now`` then ``emit_now``."""

    def update(updates, state, params=None, **extra_args):
        new_state = advance_now(updates, state, params, **extra_args)
        return emit_now(updates, state, new_state, params, **extra_args), new_state

    return update


class Gate(NamedTuple):
    """Whether a call advances the state, and what the updates are divided by.

    Attributes:
      run: a boolean scalar, or ``None`` for every call.
      divisor: a scalar to divide the incoming updates by, or ``None``.
    """

    run: jax.Array | None = None
    divisor: jax.Array | None = None

    def divide(self, updates: optax.Updates) -> optax.Updates:
        """``updates / divisor`` in each leaf's compute dtype, kept in its dtype."""
        if self.divisor is None:
            return updates
        return jax.tree.map(
            lambda g: _common.divide_in_compute(g, self.divisor), updates
        )

    def select(self, updates: optax.Updates) -> optax.Updates:
        """``updates`` on a call that runs, zeros on one that does not."""
        if self.run is None:
            return updates
        return jax.tree.map(
            lambda u: jnp.where(self.run, u, jnp.zeros([], u.dtype)), updates
        )

    def also(self, run: jax.Array | None = None, divisor: Any = None) -> Gate:
        """This gate with ``run`` and-ed in and ``divisor`` multiplied in."""
        if run is not None and self.run is not None:
            run = self.run & run
        if divisor is not None and self.divisor is not None:
            divisor = self.divisor * divisor
        return Gate(
            self.run if run is None else run,
            self.divisor if divisor is None else divisor,
        )

    def without_divisor(self) -> Gate:
        return Gate(self.run, None)


ALWAYS = Gate()
"""The gate of a plain call: always advance, divide by nothing."""


def trip_count(run: jax.Array) -> jax.Array:
    """``1`` when ``run`` holds, else ``0``, for ``fori_loop``."""
    return jnp.asarray(run).astype(jnp.int32)


def loop_variant(trip: jax.Array, values: Any) -> Any:
    """``values`` tied to the loop counter, so XLA cannot hoist their uses."""
    return jax.lax.optimization_barrier((trip, values))[1]


@dataclasses.dataclass(frozen=True, eq=False)
class SplitUpdate:
    """An optax ``update`` function made of an ``advance`` and an ``emit`` phase.

    Calling it is a plain optax update. ``advance`` and ``emit`` take a
    :class:`Gate` after ``params``; ``ungated`` holds the two phases without one
    (:class:`Phases`) when the transformation has no gating of its own, so that a
    chain of such transformations can run all of them in one loop, and a plain
    call runs them in one pass; ``divisor`` reads, from the
    state, the scalar that this transformation divides its updates by, when that
    is all it does (a static loss scale), so that a chain passes the division on
    to the next transformation's loop instead of computing it.
    """

    advance: Callable[..., optax.OptState]
    emit: Callable[..., optax.Updates]
    ungated: Phases | None = None
    divisor: Callable[[optax.OptState], jax.Array] | None = None

    def __call__(
        self,
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        if self.ungated is not None:
            return self.ungated.update(updates, state, params, **extra_args)
        new_state = self.advance(updates, state, params, ALWAYS, **extra_args)
        new_updates = self.emit(updates, state, new_state, params, ALWAYS, **extra_args)
        return new_updates, new_state


def from_phases(
    advance_now: Advance,
    emit_now: Emit,
    *,
    update_now: Update | None = None,
    divisor: Callable[[optax.OptState], jax.Array] | None = None,
) -> SplitUpdate:
    """A :class:`SplitUpdate` from two ungated phases; gates run them in a loop.

    ``update_now`` runs both in one pass (default: one after the other).
    """
    if update_now is None:
        update_now = sequential_update(advance_now, emit_now)

    def advance(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None,
        gate: Gate,
        **extra_args: Any,
    ) -> optax.OptState:
        if gate.run is None or not jax.tree.leaves(state):
            # A state without arrays carries nothing a skipped call could change.
            return advance_now(gate.divide(updates), state, params, **extra_args)

        def body(trip: jax.Array, state: optax.OptState) -> optax.OptState:
            state, grads, current = loop_variant(trip, (state, updates, params))
            return advance_now(gate.divide(grads), state, current, **extra_args)

        return jax.lax.fori_loop(0, trip_count(gate.run), body, state)

    def emit(
        updates: optax.Updates,
        state: optax.OptState,
        new_state: optax.OptState,
        params: optax.Params | None,
        gate: Gate,
        **extra_args: Any,
    ) -> optax.Updates:
        emitted = emit_now(gate.divide(updates), state, new_state, params, **extra_args)
        return gate.select(emitted)

    return SplitUpdate(
        advance, emit, Phases(advance_now, emit_now, update_now), divisor
    )


def split_transformation(
    init: Callable[[optax.Params], optax.OptState],
    advance_now: Advance,
    emit_now: Emit,
    *,
    update_now: Update | None = None,
    divisor: Callable[[optax.OptState], jax.Array] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """An optax transformation whose update is ``emit_now(advance_now(...))``.

    The phases take no extra arguments; those a caller passes to ``update``
    (``optax.chain`` forwards them to every member) are dropped.
    """
    if update_now is not None:
        update_now = _without_extra_args(update_now)
    return optax.GradientTransformationExtraArgs(
        init,
        from_phases(
            _without_extra_args(advance_now),
            _without_extra_args(emit_now),
            update_now=update_now,
            divisor=divisor,
        ),
    )


def _without_extra_args(phase: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **extra_args: Any) -> Any:
        del extra_args
        return phase(*args)

    return call


def stateless_transformation(
    transform: Callable[[optax.Updates, optax.Params | None], optax.Updates],
    *,
    check_params: Callable[[optax.Params], None] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """A transformation without state: ``updates = transform(updates, params)``.

    ``check_params``, if given, is called on the parameters at ``init``.
    """

    def init(params: optax.Params) -> optax.EmptyState:
        if check_params is not None:
            check_params(params)
        return optax.EmptyState()

    def advance_now(updates, state, params=None):
        del updates, params
        return state

    def emit_now(updates, state, new_state, params=None):
        del state, new_state
        return transform(updates, params)

    return split_transformation(init, advance_now, emit_now)


def split_of(tx: optax.GradientTransformation) -> SplitUpdate:
    """The phases of ``tx``; a foreign transformation runs its update in both."""
    if isinstance(tx.update, SplitUpdate):
        return tx.update
    update = optax.with_extra_args_support(tx).update

    def advance_now(updates, state, params=None, **extra_args):
        return update(updates, state, params, **extra_args)[1]

    def emit_now(updates, state, new_state, params=None, **extra_args):
        del new_state
        return update(updates, state, params, **extra_args)[0]

    return from_phases(advance_now, emit_now)


def map_incoming(
    split: SplitUpdate,
    transform: Callable[[optax.Updates, optax.Params | None], optax.Updates],
) -> SplitUpdate:
    """``split`` that first passes its incoming updates through
    ``transform(updates, params)``, in every phase."""

    def advance(updates, state, params, gate, **extra_args):
        updates = transform(updates, params)
        return split.advance(updates, state, params, gate, **extra_args)

    def emit(updates, state, new_state, params, gate, **extra_args):
        updates = transform(updates, params)
        return split.emit(updates, state, new_state, params, gate, **extra_args)

    inner = split.ungated
    if inner is None:
        return SplitUpdate(advance, emit, None, split.divisor)

    def advance_now(updates, state, params=None, **extra_args):
        updates = transform(updates, params)
        return inner.advance(updates, state, params, **extra_args)

    def emit_now(updates, state, new_state, params=None, **extra_args):
        updates = transform(updates, params)
        return inner.emit(updates, state, new_state, params, **extra_args)

    def update_now(updates, state, params=None, **extra_args):
        updates = transform(updates, params)
        return inner.update(updates, state, params, **extra_args)

    ungated = Phases(advance_now, emit_now, update_now)
    return SplitUpdate(advance, emit, ungated, split.divisor)


def named_chain(
    *transforms: tuple[str, optax.GradientTransformation],
) -> optax.GradientTransformationExtraArgs:
    """``optax.named_chain`` whose update is split (same state, same results).

    When no member gates itself, the chain is one pair of phases and a gate runs
    every member in one loop. Otherwise the gate is passed to each member in
    turn; a member that only divides by a scalar (``SplitUpdate.divisor``) adds
    that scalar to the gate instead of dividing, so the division happens inside
    the next member's loop.
    """
    names = [name for name, _ in transforms]
    if len(names) != len(set(names)):
        raise ValueError(f"Transformation names must be unique, got {names}.")
    members = [(name, tx.init, split_of(tx)) for name, tx in transforms]

    def init(params: optax.Params) -> collections.OrderedDict:
        return collections.OrderedDict(
            (name, init(params)) for name, init, _ in members
        )

    if all(split.ungated is not None for _, _, split in members):
        advance_now, emit_now, update_now = _chained_phases(members)
        return split_transformation(init, advance_now, emit_now, update_now=update_now)

    def advance(updates, state, params, gate, **extra_args):
        new_state = collections.OrderedDict()
        for name, _, split in members:
            if split.divisor is not None:
                new_state[name] = split.advance(
                    updates, state[name], params, ALWAYS, **extra_args
                )
                gate = gate.also(divisor=split.divisor(state[name]))
            else:
                new_state[name] = split.advance(
                    updates, state[name], params, gate, **extra_args
                )
                updates = split.emit(
                    updates, state[name], new_state[name], params, gate, **extra_args
                )
                gate = gate.without_divisor()
        return new_state

    def emit(updates, state, new_state, params, gate, **extra_args):
        for name, _, split in members:
            if split.divisor is not None:
                gate = gate.also(divisor=split.divisor(state[name]))
                continue
            updates = split.emit(
                updates, state[name], new_state[name], params, gate, **extra_args
            )
            gate = gate.without_divisor()
        return updates

    return optax.GradientTransformationExtraArgs(init, SplitUpdate(advance, emit))


def _chained_phases(members: Sequence[tuple[str, Any, SplitUpdate]]) -> Phases:
    """The ungated phases of members that have them, run one after another."""

    def update_now(updates, state, params=None, **extra_args):
        new_state = collections.OrderedDict()
        for name, _, split in members:
            updates, new_state[name] = split.ungated.update(
                updates, state[name], params, **extra_args
            )
        return updates, new_state

    def advance_now(updates, state, params=None, **extra_args):
        new_state = collections.OrderedDict()
        for index, (name, _, split) in enumerate(members):
            new_state[name] = split.ungated.advance(
                updates, state[name], params, **extra_args
            )
            if index + 1 < len(members):  # the last member's updates are not needed
                updates = split.ungated.emit(
                    updates, state[name], new_state[name], params, **extra_args
                )
        return new_state

    def emit_now(updates, state, new_state, params=None, **extra_args):
        for name, _, split in members:
            updates = split.ungated.emit(
                updates, state[name], new_state[name], params, **extra_args
            )
        return updates

    return Phases(advance_now, emit_now, update_now)
