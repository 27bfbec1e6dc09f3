"""The gated runner: a call that may leave the state alone, compiled without copies.

Gradient accumulation and dynamic loss scaling each decide, per call, whether
the transformation they wrap advances. Written as
``lax.cond(run, inner.update, keep)``, the updates leaving the conditional are
materialised (zeros on a skipped call) and, on older XLA, the state is copied.
This module runs such a call in two phases instead:

1. **advance** the inner state under a gate (:func:`gate`), which keeps the
   state buffers in place and leaves them untouched when the gate is closed;
2. **emit** the updates outside the gate, from the new state
   (:func:`emit_updates`), selected to zero by ``where(run, updates, 0)``, which
   XLA fuses into the caller's ``optax.apply_updates``.

Emitting from the new state needs each transformation to say how. Three kinds:

* a :class:`Block` (an ordinary optax transformation with an ``emit``) computes
  its updates from its new state; ``emit`` is never given the old state, so a
  block cannot keep it alive by mistake;
* a :class:`Composite` (:func:`chain`, :func:`named_chain` and the gated
  wrappers) emits through its members;
* any other transformation is run again on its old state: correct, and free for
  a stateless one (``optax.scale``, ``optax.clip_by_global_norm``), but a stateful
  one keeps a copy of its state alive across the gate.

A gate's operands are buffers: a gradient computed outside a gate and read
inside it (divided by a loss scale, for instance) is written out in full and
read back. So an elementwise map of the gradients (a :class:`Leafwise`
transformation, a dynamic loss scale's division) is handed on, still pending,
to the transformation that reads the gradients (:func:`update_mapped`); a gated
wrapper applies it inside its gate and in the reductions that decide the gate,
where XLA fuses it.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from adamax_optax import _common

Gating = Literal["loop", "cond", "where"]
"""How a gate is compiled: ``"loop"``, a ``fori_loop`` of 0 or 1 trips;
``"cond"``, a ``lax.cond``; ``"where"``, branch-free (advance, then select)."""

GATINGS: tuple[Gating, ...] = ("loop", "cond", "where")

Emit = Callable[..., optax.Updates]
"""A block's ``emit(updates, new_state, params, **extra_args) -> updates``."""
EmitUpdates = Callable[..., optax.Updates]
"""A composite's ``(updates, state, new_state, params, **extra_args) -> updates``."""
UpdateMapped = Callable[..., tuple[optax.Updates, optax.OptState]]
"""A composite's ``(raw_updates, leaf_map, state, params, **extra_args) ->
(updates, new_state)``: its ``update`` of ``tree.map(leaf_map, raw_updates)``."""


@dataclasses.dataclass(frozen=True, eq=False)
class LeafMap:
    """An elementwise function of a gradient leaf, not yet applied; it keeps
    each leaf's shape and dtype.

    ``keeps_finite`` (a bool, possibly traced) says that ``fn`` maps finite
    elements to finite ones, as a division by at least 1 does: a check of the
    mapped leaves can then check the leaves themselves. ``finite_input`` says
    that the leaves it will be applied to are known to be finite wherever its
    result is kept: a dynamic loss scale applies its division behind its own
    check of them (with ``gating="where"`` it applies it to any gradient, and
    discards everything computed from a non-finite one).
    """

    fn: Callable[[jax.Array], jax.Array]
    keeps_finite: jax.Array | bool = False
    finite_input: bool = False

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fn(x)


def division_by(divisor: ArrayLike, *, finite_input: bool = False) -> LeafMap:
    """``g / divisor`` in ``g``'s compute dtype, returned in its dtype (a loss
    scale's unscaling); it keeps finite elements finite when ``divisor >= 1``."""
    if isinstance(divisor, int | float):
        keeps_finite: jax.Array | bool = divisor >= 1
    else:  # an array: compared on the device, with no wait for its value
        keeps_finite = jnp.asarray(divisor) >= 1
    return LeafMap(
        lambda g: _common.divide_in_compute(g, divisor), keeps_finite, finite_input
    )


def then(first: LeafMap | None, second: LeafMap) -> LeafMap:
    """The leaf map ``second(first(x))``."""
    if first is None:
        return second
    return LeafMap(
        lambda x: second.fn(first.fn(x)),
        first.keeps_finite & second.keeps_finite,
        first.finite_input,
    )


def check_gating(gating: Any) -> None:
    """``None`` or one of :data:`GATINGS`, else a ``ValueError`` naming it."""
    if gating is not None and gating not in GATINGS:
        raise ValueError(
            f"`gating` must be one of {GATINGS} or None. Received: gating={gating!r}"
        )


def default_gating() -> Gating:
    """The construct ``gating=None`` compiles to.

    ``"cond"`` on every backend and jax line: on CPU it is copy-free and keeps a
    micro-step at its floor on jax 0.10 and 0.12 alike; on GPU, not yet
    measured, it is the construct with the fewest host waits (one per gated
    call) that never computes a skipped update. See ``docs/performance.md``.
    """
    return "cond"


def gate(
    run: jax.Array,
    advance: Callable[[Any, Any], Any],
    state: Any,
    operands: Any,
    gating: Gating | None,
) -> Any:
    """``advance(state, operands)`` where ``run`` holds, else ``state`` itself.

    ``operands`` are the arrays ``advance`` reads besides the state. The loop
    form ties them to the loop counter with an ``optimization_barrier``, so that
    XLA cannot hoist what depends on them alone (a division, a dtype conversion)
    out of the loop into fresh full-size buffers.
    """
    if not jax.tree.leaves(state):  # nothing that a closed gate could keep
        return advance(state, operands)
    gating = gating or default_gating()
    if gating == "where":
        new_state = advance(state, operands)
        return jax.tree.map(lambda n, o: jnp.where(run, n, o), new_state, state)
    if gating == "cond":
        return jax.lax.cond(run, advance, lambda s, _: s, state, operands)

    def body(trip: jax.Array, state: Any) -> Any:
        _, state, current = jax.lax.optimization_barrier((trip, state, operands))
        return advance(state, current)

    return jax.lax.fori_loop(0, jnp.asarray(run).astype(jnp.int32), body, state)


def all_finite(
    tree: Any, gating: Gating | None = None, leaf_map: LeafMap | None = None
) -> jax.Array:
    """``True`` when every element of every leaf is finite: the predicate of
    the gates that skip a step.

    First ``isfinite(sum(x))`` per leaf, one read at full speed: a finite sum
    proves every element finite. Only when a sum is not finite (a NaN, an
    infinity, or an overflow of large finite elements) is the exact check run,
    behind a gate: ``isfinite(sum(x - x))``, which is 0 for finite elements
    and never overflows. Neither squares (a global norm's ``g ** 2`` overflows
    float32 above about 1.8e19). With ``leaf_map``, the leaves checked are
    ``leaf_map(x)``, checked as the leaves ``x`` themselves where the map keeps
    finite elements finite (and not read at all where they are known finite);
    otherwise the exact check runs, behind its gate, with the map applied
    inside it (its operands are ``tree``'s leaves, so no mapped leaf is ever a
    buffer).
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.asarray(True)

    def checked(values: list[jax.Array]) -> list[jax.Array]:
        return [_common.in_compute_dtype(x) for x in mapped(values, leaf_map)]

    def finite_sums(values: list[jax.Array]) -> jax.Array:
        return jnp.all(jnp.stack([jnp.isfinite(jnp.sum(x)) for x in values]))

    def exactly(_: jax.Array, values: list[jax.Array]) -> jax.Array:
        return finite_sums([x - x for x in checked(values)])

    if leaf_map is not None and leaf_map.finite_input:
        fast = jnp.asarray(leaf_map.keeps_finite)
    else:
        fast = finite_sums([_common.in_compute_dtype(x) for x in leaves])
        if leaf_map is not None:
            fast = fast & leaf_map.keeps_finite
    return gate(jnp.logical_not(fast), exactly, fast, leaves, gating)


def mapped(updates: Any, leaf_map: LeafMap | None) -> Any:
    """``leaf_map`` applied to every leaf of ``updates`` (``None``: as they are)."""
    return updates if leaf_map is None else jax.tree.map(leaf_map, updates)


def select(run: jax.Array, updates: optax.Updates) -> optax.Updates:
    """``updates`` where ``run`` holds, else zeros of each leaf's dtype."""
    return jax.tree.map(lambda u: jnp.where(run, u, jnp.zeros([], u.dtype)), updates)


class Block(optax.GradientTransformationExtraArgs):
    """The type of a :func:`block`: an optax transformation with an ``emit``."""

    emit: Emit

    def __new__(cls, init: Any, update: Any, emit: Emit) -> Block:
        block = super().__new__(cls, init, update)
        block.emit = emit
        return block

    @classmethod
    def from_phases(
        cls,
        init: Callable[[optax.Params], optax.OptState],
        advance: Callable[..., optax.OptState],
        emit: Callable[..., optax.Updates],
    ) -> Block:
        """The block whose ``update`` is ``advance(updates, state, params)``, then
        ``emit(updates, new_state, params)``; extra arguments are dropped and
        Python numbers among the leaves become arrays."""

        def update(updates, state, params=None, **extra_args):
            updates, params = _common.as_arrays(updates), _common.as_arrays(params)
            new_state = advance(updates, state, params)
            return emit(updates, new_state, params), new_state

        def emit_dropping_extra_args(updates, new_state, params=None, **extra_args):
            return emit(
                _common.as_arrays(updates), new_state, _common.as_arrays(params)
            )

        return cls(init, update, emit_dropping_extra_args)


def block(
    init: optax.TransformInitFn,
    update: Callable[..., tuple[optax.Updates, optax.OptState]],
    emit: Emit,
) -> optax.GradientTransformationExtraArgs:
    """An optax transformation that can also emit its updates from its new state.

    ``update`` is an ordinary optax ``update(updates, state, params=None,
    **extra_args)``. ``emit(updates, new_state, params=None, **extra_args)``
    returns the updates that ``update`` returns, computed from the state that
    ``update`` returned (for Adamax, the direction read from the new ``m`` and
    ``u``); it is never given the old state. Under :func:`accumulate_gradients`
    and :func:`dynamic_loss_scale`, composed with :func:`chain` or
    :func:`named_chain`, a block's state is advanced in place behind the gate
    and its updates emitted after it, so a skipped call neither copies nor
    recomputes its state.

    Example (a running sum of the updates, emitted as the updates):
      >>> import jax.numpy as jnp
      >>> from adamax_optax import accumulate_gradients, block
      >>> def update(g, state, params=None, **extra_args):
      ...     return state + g, state + g
      >>> def emit(g, new_state, params=None, **extra_args):  # from the new state
      ...     return new_state
      >>> tx = accumulate_gradients(block(jnp.zeros_like, update, emit), 2)
      >>> state = tx.init(jnp.zeros(2))
      >>> for g in (jnp.ones(2), 3 * jnp.ones(2), jnp.ones(2), jnp.ones(2)):
      ...     updates, state = tx.update(g, state)
      >>> updates  # the sum of the two group means, 2 + 1
      Array([3., 3.], dtype=float32)
    """
    return Block(init, update, emit)


class Composite(optax.GradientTransformationExtraArgs):
    """A transformation made of others (a chain, a gated wrapper).

    ``emit_updates(updates, state, new_state, params, **extra_args)`` emits its
    updates through its ``members``, handing the old ``state`` on only to the
    members that are neither blocks nor composites; ``gating`` is the one a
    gated wrapper was given explicitly, else ``None``. ``update_mapped``, when
    given, is its ``update`` of gradients with a leaf map still pending (see
    :func:`update_mapped`); ``update`` is then ``update_mapped`` with none.
    """

    emit_updates: EmitUpdates
    members: tuple[optax.GradientTransformation, ...]
    gating: Gating | None
    update_mapped: UpdateMapped | None

    def __new__(
        cls,
        init: Any,
        update: Any,
        emit_updates: EmitUpdates,
        members: tuple[optax.GradientTransformation, ...] = (),
        gating: Gating | None = None,
        update_mapped: UpdateMapped | None = None,
    ) -> Composite:
        composite = super().__new__(cls, init, update)
        composite.emit_updates = emit_updates
        composite.members, composite.gating = tuple(members), gating
        composite.update_mapped = update_mapped
        return composite

    @classmethod
    def from_update_mapped(
        cls,
        init: Any,
        update_mapped: UpdateMapped,
        emit_updates: EmitUpdates,
        members: tuple[optax.GradientTransformation, ...] = (),
        gating: Gating | None = None,
    ) -> Composite:
        """The composite whose ``update`` is ``update_mapped`` with no leaf map."""

        def update(
            updates: optax.Updates,
            state: optax.OptState,
            params: optax.Params | None = None,
            **extra_args: Any,
        ) -> tuple[optax.Updates, optax.OptState]:
            return update_mapped(updates, None, state, params, **extra_args)

        return cls(init, update, emit_updates, members, gating, update_mapped)


class Leafwise(optax.GradientTransformationExtraArgs):
    """A transformation that maps every gradient leaf by one elementwise
    function, ``leaf_map``, and never changes its state (a fixed loss scale's
    division). In :func:`chain` and :func:`named_chain` the map is handed on to
    the next member (see :func:`update_mapped`)."""

    leaf_map: LeafMap

    def __new__(cls, init: Any, leaf_map: LeafMap) -> Leafwise:
        def update(
            updates: optax.Updates,
            state: optax.OptState,
            params: optax.Params | None = None,
            **extra_args: Any,
        ) -> tuple[optax.Updates, optax.OptState]:
            del params, extra_args
            return mapped(updates, leaf_map), state

        leafwise = super().__new__(cls, init, update)
        leafwise.leaf_map = leaf_map
        return leafwise


# All are NamedTuples of (init, update); flattened, they keep what they add.
jax.tree_util.register_pytree_node(
    Block, lambda b: ((b.init, b.update, b.emit), None), lambda _, c: Block(*c)
)
jax.tree_util.register_pytree_node(
    Composite,
    lambda c: (
        (c.init, c.update, c.emit_updates, c.update_mapped),
        (c.members, c.gating),
    ),
    lambda aux, c: Composite(c[0], c[1], c[2], *aux, update_mapped=c[3]),
)
jax.tree_util.register_pytree_node(
    Leafwise, lambda t: ((t.init, t.leaf_map), None), lambda _, c: Leafwise(*c)
)


def update_mapped(
    tx: optax.GradientTransformation,
    raw_updates: optax.Updates,
    leaf_map: LeafMap | None,
    state: optax.OptState,
    params: optax.Params | None = None,
    **extra_args: Any,
) -> tuple[optax.Updates, optax.OptState]:
    """``tx.update(tree.map(leaf_map, raw_updates), state, params, **extra_args)``.

    A composite that can (a chain, :func:`adamax_optax.skip_nonfinite`) takes
    the map still pending and applies it where XLA fuses it: in the reductions
    that decide its gate and inside the gate, whose operand is then
    ``raw_updates``, a buffer already. Applied here instead, the mapped
    gradients would be a gate's operand, written out in full and read back.
    """
    if isinstance(tx, Composite) and tx.update_mapped is not None:
        return tx.update_mapped(raw_updates, leaf_map, state, params, **extra_args)
    tx = optax.with_extra_args_support(tx)
    return tx.update(mapped(raw_updates, leaf_map), state, params, **extra_args)


def emit_updates(
    tx: optax.GradientTransformation,
    updates: optax.Updates,
    state: optax.OptState,
    new_state: optax.OptState,
    params: optax.Params | None = None,
    **extra_args: Any,
) -> optax.Updates:
    """The updates of ``tx`` for a call that advanced ``state`` to ``new_state``."""
    if isinstance(tx, Composite):
        return tx.emit_updates(updates, state, new_state, params, **extra_args)
    if isinstance(tx, Block):
        return tx.emit(updates, new_state, params, **extra_args)
    tx = optax.with_extra_args_support(tx)
    return tx.update(updates, state, params, **extra_args)[0]


def nested_gating(gating: Gating | None, inner: optax.GradientTransformation) -> Any:
    """The gating of a wrapper around ``inner``: its own, else the one set
    explicitly on a wrapper inside ``inner``; different explicit values are an
    error."""
    check_gating(gating)
    found, pending = {gating} - {None}, [inner]
    while pending:
        tx = pending.pop()
        if isinstance(tx, Composite):
            found |= {tx.gating} - {None}
            pending.extend(tx.members)
    if len(found) > 1:
        raise ValueError(
            "Nested gated wrappers were given different `gating` values: "
            f"{sorted(found)}. Give them one value, or set it on one of them."
        )
    return found.pop() if found else None


def named_chain(
    *transforms: tuple[str, optax.GradientTransformation],
) -> optax.GradientTransformationExtraArgs:
    """``optax.named_chain`` whose members' updates can be emitted after a gate.

    The same state (an ``OrderedDict`` by name) and results as
    ``optax.named_chain``; extra arguments of ``update`` reach every member.
    Under :func:`accumulate_gradients` and :func:`dynamic_loss_scale` its blocks'
    state is neither copied nor recomputed. Members from optax work in any
    position: a stateless one (``optax.scale``, ``optax.clip_by_global_norm``)
    or one with scalar state (``optax.scale_by_schedule``) costs no copy; one
    with array state is run again on its old state after the gate, which keeps a
    copy of that state (measured, ``optax.trace``: its momentum's bytes in
    temporaries and four leaf copies, on jax 0.10 and 0.12 alike).

    Example:
      >>> import jax.numpy as jnp
      >>> from adamax_optax import named_chain, scale_by_keras_adamax
      >>> from adamax_optax import scale_by_keras_learning_rate
      >>> tx = named_chain(("adamax", scale_by_keras_adamax()),
      ...                  ("learning_rate", scale_by_keras_learning_rate(0.1)))
      >>> updates, state = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
      >>> bool(jnp.allclose(updates, -0.1)), int(state["adamax"].count)
      (True, 1)
    """
    names = [name for name, _ in transforms]
    if len(names) != len(set(names)):
        raise ValueError(f"Transformation names must be unique, got {names}.")
    return _chain(names, [tx for _, tx in transforms], collections.OrderedDict)


def chain(
    *transforms: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """``optax.chain`` whose members' updates can be emitted after a gate.

    The same state (a tuple) and results as ``optax.chain``; see
    :func:`named_chain`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from adamax_optax import accumulate_gradients, chain, scale_by_keras_adamax
      >>> blocks = chain(scale_by_keras_adamax(), optax.scale(-0.1))
      >>> tx = accumulate_gradients(blocks, 2)
      >>> state = tx.init(jnp.zeros(2))
      >>> for g in (jnp.ones(2), 3 * jnp.ones(2)):
      ...     updates, state = tx.update(g, state)
      >>> bool(jnp.allclose(updates, -0.1))  # one step of lr, on the mean 2
      True
    """
    keys = list(range(len(transforms)))
    return _chain(keys, list(transforms), lambda pairs: tuple(s for _, s in pairs))


def _chain(
    keys: list[Any],
    transforms: list[optax.GradientTransformation],
    pack: Callable[[list[tuple[Any, Any]]], Any],
) -> Composite:
    """A chain whose state is ``pack([(key, member state), ...])``, read by key."""
    members = [optax.with_extra_args_support(tx) for tx in transforms]

    def init(params: optax.Params) -> Any:
        return pack(
            [(key, tx.init(params)) for key, tx in zip(keys, members, strict=True)]
        )

    def update_mapped_fn(
        raw_updates: optax.Updates,
        leaf_map: LeafMap | None,
        state: Any,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, Any]:
        if len(state) != len(members):
            raise ValueError(
                f"The chain has {len(members)} members but its state {len(state)}:"
                " was it made by this chain's `init`?"
            )
        updates, new_state = raw_updates, []
        for key, tx in zip(keys, members, strict=True):
            if isinstance(tx, Leafwise):  # its map waits for the next member
                leaf_map, new = then(leaf_map, tx.leaf_map), state[key]
            else:
                updates, new = update_mapped(
                    tx, updates, leaf_map, state[key], params, **extra_args
                )
                leaf_map = None
            new_state.append((key, new))
        return mapped(updates, leaf_map), pack(new_state)

    def emit(updates, state, new_state, params=None, **extra_args):
        for key, tx in zip(keys, members, strict=True):
            updates = emit_updates(
                tx, updates, state[key], new_state[key], params, **extra_args
            )
        return updates

    return Composite.from_update_mapped(init, update_mapped_fn, emit, tuple(members))
