"""Chains whose members' updates can be emitted after a gate.

``chain`` and ``named_chain`` are ``optax.chain`` and ``optax.named_chain``, the
same states and results, with each member's way of emitting (its
:class:`adamax_optax._runner.Phases`) kept, so that a gated wrapper around the
chain advances each building block's state in place and emits its updates after
the gate. Inside ``optax.chain`` the members are hidden in a closure: a gated
wrapper can only run the whole chain again on its old state, which keeps a copy
of every stateful member's state alive across the gate.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import optax

from adamax_optax import _gate, _runner


def named_chain(
    *transforms: tuple[str, optax.GradientTransformation],
) -> optax.GradientTransformationExtraArgs:
    """``optax.named_chain`` whose members' updates can be emitted after a gate.

    The same state (an ``OrderedDict`` by name) and results as
    ``optax.named_chain``; extra arguments of ``update`` reach every member.
    Under :func:`adamax_optax.accumulate_gradients` and
    :func:`adamax_optax.dynamic_loss_scale` the state of this library's
    building blocks is neither copied nor recomputed. Members from optax work
    in any position: a stateless one (``optax.scale``,
    ``optax.clip_by_global_norm``) or one with scalar state
    (``optax.scale_by_schedule``) costs no copy; one with array state is run
    again on its old state after the gate, which keeps a copy of that state
    (measured, ``optax.trace``: its momentum's bytes in temporaries and four
    leaf copies, on jax 0.10 and 0.12 alike).

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
) -> optax.GradientTransformationExtraArgs:
    """A chain whose state is ``pack([(key, member state), ...])``, read by key."""
    members = [optax.with_extra_args_support(tx) for tx in transforms]

    def init(params: optax.Params) -> Any:
        return pack(
            [(key, tx.init(params)) for key, tx in zip(keys, members, strict=True)]
        )

    def update_mapped_fn(raw_updates, leaf_map, state, params=None, **extra_args):
        if len(state) != len(members):
            raise ValueError(
                f"The chain has {len(members)} members but its state {len(state)}:"
                " was it made by this chain's `init`?"
            )
        updates, new_state = raw_updates, []
        for key, tx in zip(keys, members, strict=True):
            own_map = getattr(_runner.phases_of(tx), "leaf_map", None)
            if own_map is not None:  # it waits for the next member
                leaf_map, new = _gate.then(leaf_map, own_map), state[key]
            else:
                updates, new = _runner.update_mapped(
                    tx, updates, leaf_map, state[key], params, **extra_args
                )
                leaf_map = None
            new_state.append((key, new))
        return _gate.mapped(updates, leaf_map), pack(new_state)

    def emit(updates, state, new_state, params=None, **extra_args):
        for key, tx in zip(keys, members, strict=True):
            updates = _runner.emit_updates(
                tx, updates, state[key], new_state[key], params, **extra_args
            )
        return updates

    return _runner.transformation(
        init, emit=emit, update_mapped=update_mapped_fn, members=tuple(members)
    )
