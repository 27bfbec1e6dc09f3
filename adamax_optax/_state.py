"""Reading an optimizer state: Keras' ``iterations``, ``learning_rate`` and friends.

Each accessor finds its piece by type anywhere inside the state, so it works on the
state of :func:`adamax`, on one nested in ``optax.chain``, ``optax.named_chain`` or
``optax.inject_hyperparams``, on a Flax ``TrainState`` and on an ``nnx.Optimizer``
(all pytrees; NNX variables are read through).
"""

from __future__ import annotations

from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import optax

from adamax_optax._accumulation import AccumulateGradientsState
from adamax_optax._adamax import ScaleByKerasAdamaxState
from adamax_optax._common import find_states
from adamax_optax._dynamic_loss_scale import DynamicLossScaleState
from adamax_optax._learning_rate import ScaleByKerasLearningRateState
from adamax_optax._loss_scale import UnscaleGradientsState
from adamax_optax._skip_nonfinite import SkipNonfiniteState

State = TypeVar("State")

SKIP_COUNTERS = (SkipNonfiniteState, DynamicLossScaleState)
"""The states that count skipped calls in a ``skipped_steps`` field."""


def find_one(tree: Any, kind: type[State], accessor: str) -> State:
    """The single ``kind`` node inside ``tree``, or a clear error."""
    found = find_states(tree, kind)
    if len(found) != 1:
        raise ValueError(
            f"`{accessor}` needs an optimizer state holding exactly one "
            f"{kind.__name__}; this one holds {len(found)}."
        )
    return found[0]


def get_iterations(opt_state: optax.OptState) -> jax.Array:
    """The number of updates applied so far, as Keras' ``optimizer.iterations``.

    Micro-steps of gradient accumulation and steps skipped by dynamic loss
    scaling do not count (Keras' ``iterations`` is also the number of real
    updates under accumulation).

    Example:
      >>> import jax.numpy as jnp
      >>> from adamax_optax import adamax, get_iterations
      >>> tx = adamax(gradient_accumulation_steps=2)
      >>> state = tx.init(jnp.zeros(1))
      >>> for _ in range(5):
      ...     _, state = tx.update(jnp.ones(1), state)
      >>> int(get_iterations(state))
      2
    """
    return find_one(opt_state, ScaleByKerasAdamaxState, "get_iterations").count


def has_updated(opt_state: optax.OptState) -> jax.Array:
    """Whether the last call applied an update (a bool scalar), as
    ``optax.MultiSteps.has_updated``: ``False`` after an accumulation
    micro-step, a skipped call or a group of zero weight, and before the first
    update; ``True`` after a call that moved the parameters' optimizer (the
    last micro-step of a group, a ``flush=True``, any call without
    accumulation).

    Unlike ``optax.MultiSteps.has_updated``, which reads only its two
    counters, a call skipped right after an update reads ``False``: the skip
    states record it.

    Example:
      >>> import jax.numpy as jnp
      >>> from adamax_optax import adamax, has_updated
      >>> tx = adamax(gradient_accumulation_steps=2, skip_nonfinite=True)
      >>> state = tx.init(jnp.zeros(1))
      >>> seen = []
      >>> for g in (1.0, 1.0, jnp.nan, 1.0):
      ...     _, state = tx.update(jnp.array([g]), state)
      ...     seen.append(bool(has_updated(state)))
      >>> seen  # micro-step, update, skipped, micro-step
      [False, True, False, False]
    """
    adamax = find_one(opt_state, ScaleByKerasAdamaxState, "has_updated")
    updated = adamax.count > 0
    for group in find_states(opt_state, AccumulateGradientsState):
        updated &= (group.micro_step == 0) & (group.weight_sum > 0)
    for state in _skip_states(opt_state):
        updated &= ~state.last_skipped
    return updated


def get_learning_rate(opt_state: optax.OptState) -> jax.Array:
    """The learning rate the next update will use (float32).

    For a schedule this is its value at the next update's step. Under
    ``optax.inject_hyperparams`` it is the injected ``learning_rate``
    hyperparameter as optax stores it: a value set in the state is what the
    next update uses, but a schedule given to ``inject_hyperparams`` is stored
    as evaluated for the update that ran last (optax evaluates it when an
    update runs), so the rate read is that update's. Give the schedule to
    :func:`adamax` itself to read the next update's.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from adamax_optax import adamax, get_learning_rate
      >>> tx = adamax(optax.linear_schedule(1.0, 0.0, 10))
      >>> state = tx.init(jnp.zeros(1))
      >>> _, state = tx.update(jnp.ones(1), state)
      >>> round(float(get_learning_rate(state)), 6)
      0.9
    """
    for injected in find_states(opt_state, optax.InjectStatefulHyperparamsState):
        if "learning_rate" in injected.hyperparams:
            return jnp.asarray(injected.hyperparams["learning_rate"], jnp.float32)
    found = find_one(opt_state, ScaleByKerasLearningRateState, "get_learning_rate")
    return found.learning_rate


def get_loss_scale(opt_state: optax.OptState) -> jax.Array:
    """The factor to multiply the next loss by (float32); 1 without loss scaling.

    Reads a dynamic loss scale if there is one, else the static
    ``loss_scale_factor``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adamax_optax import adamax, get_loss_scale
      >>> float(get_loss_scale(adamax(dynamic_loss_scale=True).init(jnp.zeros(1))))
      32768.0
      >>> float(get_loss_scale(adamax(loss_scale_factor=8.0).init(jnp.zeros(1))))
      8.0
      >>> float(get_loss_scale(adamax().init(jnp.zeros(1))))
      1.0
    """
    found = find_states(opt_state, DynamicLossScaleState) + find_states(
        opt_state, UnscaleGradientsState
    )
    if len(found) > 1:
        raise ValueError(
            f"`get_loss_scale` found {len(found)} loss scales in the optimizer "
            "state; it needs at most one."
        )
    return found[0].loss_scale if found else jnp.ones([], jnp.float32)


def get_skipped_steps(opt_state: optax.OptState) -> jax.Array:
    """The number of calls skipped so far (int32).

    Counts the calls :func:`skip_nonfinite` (``adamax(skip_nonfinite=True)``)
    skipped for a non-finite or too large gradient, and those
    :func:`dynamic_loss_scale` skipped for a non-finite scaled gradient. A
    skipped accumulation micro-step counts once, like any call.

    Raises:
      ValueError: if the state has neither a skip counter nor a dynamic loss
        scale, so that nothing could have been skipped.

    Example:
      >>> import jax.numpy as jnp
      >>> from adamax_optax import adamax, get_iterations, get_skipped_steps
      >>> tx = adamax(skip_nonfinite=True)
      >>> state = tx.init(jnp.zeros(2))
      >>> for g in ([1.0, jnp.nan], [1.0, 1.0], [jnp.inf, 0.0]):
      ...     _, state = tx.update(jnp.array(g), state)
      >>> int(get_skipped_steps(state)), int(get_iterations(state))
      (2, 1)
    """
    found = _skip_states(opt_state)
    if not found:
        raise ValueError(
            "`get_skipped_steps` needs an optimizer state with a skip counter: "
            "build the optimizer with `skip_nonfinite=True` or "
            "`dynamic_loss_scale=True` (or wrap it in `skip_nonfinite`)."
        )
    return sum((state.skipped_steps for state in found), jnp.zeros([], jnp.int32))


def _skip_states(tree: Any) -> list[Any]:
    """Every skip state in ``tree``, those nested in another included
    (``find_states`` stops at the outermost match)."""
    found = find_states(tree, SKIP_COUNTERS)
    return found + [
        nested for state in found for nested in _skip_states(state.inner_state)
    ]
