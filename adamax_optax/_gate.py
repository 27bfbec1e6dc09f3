"""Gates: a call that may leave a state alone, and the checks that decide it.

A gated wrapper (accumulation, a dynamic loss scale, skipping) advances the
state it wraps only on some calls. :func:`gate` compiles that choice so that
the state's buffers stay in place and are left untouched when the gate is
closed; :func:`all_finite` is the predicate of the gates that skip a step.

A gate's operands are buffers: a gradient computed outside a gate and read
inside it (divided by a loss scale, for instance) would be written out in full
and read back. So an elementwise map of the gradients is kept as a
:class:`LeafMap`, still pending, and applied inside the gate and in the
reductions that decide it, where XLA fuses it.
"""

from __future__ import annotations

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
