"""Exponential moving average of the parameters: Keras' ``use_ema``."""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike, DTypeLike

from adamax_optax import _common, _grouping, _runner, _validation
from adamax_optax._weight_decay import (
    ExcludeFromWeightDecay,
    exclusion_mask,
    warn_unmatched_patterns,
)


class ParameterEMAState(NamedTuple):
    """State of :func:`parameter_ema`.

    Attributes:
      count: number of updates seen (int32).
      ema: the moving average of the parameters, in the state dtype. Before the
        first update it holds the initial parameters. A leaf excluded by
        ``exclude_from_ema`` holds an ``optax.MaskedNode()``: no array.
    """

    count: jax.Array
    ema: optax.Params


def check_ema_overwrite_frequency(value: Any) -> None:
    """``None`` or an integer >= 1, with Keras' message."""
    if value is not None:
        _validation.check_integer_at_least(
            "ema_overwrite_frequency",
            value,
            1,
            "`ema_overwrite_frequency` must be an integer >= 1 or None.",
        )


def is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _initial_average(param: Any, state_dtype: DTypeLike | None) -> jax.Array:
    """A copy of ``param`` in the state dtype, never the parameter's own buffer:
    a training step that donates both the parameters and the state must not
    donate one buffer twice. An abstract parameter (``jax.ShapeDtypeStruct``, as
    an orbax restore target) gets zeros of its shape, dtype and sharding."""
    dtype = _common.state_dtype_of(param, state_dtype)
    if isinstance(param, jax.ShapeDtypeStruct):
        return jnp.zeros_like(param, dtype=dtype)
    return jnp.array(param, dtype=dtype)


def parameter_ema(
    ema_momentum: ArrayLike = 0.99,
    ema_overwrite_frequency: int | None = None,
    *,
    ema_warmup: bool = False,
    state_dtype: DTypeLike | None = None,
    exclude_from_ema: ExcludeFromWeightDecay = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Tracks a moving average of the parameters; can overwrite them with it.

    Put it last in a chain, so that ``w_new = params + updates`` are the
    parameters after this update. With ``k`` the 1-based number of this update::

        ema = w_new                                           if k == 1
        ema = ema_momentum * ema + (1 - ema_momentum) * w_new otherwise

    ``ema_warmup=True`` (beyond Keras, off by default) caps the momentum of
    update ``k > 1`` at ``(k) / (9 + k)``, i.e. ``(1 + c) / (10 + c)`` with
    ``c = k - 1`` the updates before it::

        momentum = minimum(ema_momentum, (1 + c) / (10 + c))

    so that a short run's average is not dominated by its first weights: the
    momentum is 0.18 on the second update, 0.5 on the ninth, 0.9 from the 81st,
    and reaches 0.99 only after about 900 updates.

    If ``ema_overwrite_frequency = F`` and ``k % F == 0`` the parameters become
    the average: the block emits ``updates = ema - params``. Read the average
    with :func:`finalize_variable_values` (Keras'
    ``optimizer.finalize_variable_values``).

    ``exclude_from_ema`` (beyond Keras) leaves some parameters out, in the
    forms of ``exclude_from_weight_decay``: regular expressions searched in
    ``"/"``-joined key paths, a pytree of bools (``True`` = excluded) or a
    callable returning one. An excluded leaf keeps no average in the state
    (an ``optax.MaskedNode``, no memory), is never overwritten, and
    :func:`finalize_variable_values` returns it as it is: large embeddings or
    frozen towers need no average.

    Args:
      ema_momentum: weight of the old average, in [0, 1].
      ema_overwrite_frequency: overwrite the parameters with the average every
        this many updates; ``None`` never does.
      ema_warmup: cap the momentum at ``(1 + c) / (10 + c)`` after ``c``
        updates (TensorFlow's ``ExponentialMovingAverage(num_updates=...)``).
      state_dtype: dtype of the average; ``None`` keeps each parameter's dtype.
      exclude_from_ema: leaves to keep no average of, or ``None``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` that needs ``params``, and
      a block (see :func:`block`) that emits from its new average.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from adamax_optax import finalize_variable_values, parameter_ema
      >>> tx = optax.chain(optax.sgd(1.0), parameter_ema(0.5))
      >>> params = jnp.array([0.0])
      >>> state = tx.init(params)
      >>> for _ in range(2):
      ...     updates, state = tx.update(jnp.array([-1.0]), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> params, finalize_variable_values(params, state)  # ema = (1 + 2) / 2
      (Array([2.], dtype=float32), Array([1.5], dtype=float32))
    """
    _validation.check_ema_momentum(ema_momentum)
    _validation.check_bool("ema_warmup", ema_warmup)
    check_ema_overwrite_frequency(ema_overwrite_frequency)
    _validation.check_state_dtype(state_dtype)

    excluded = exclusion_mask(exclude_from_ema, "exclude_from_ema")

    def init_fn(params: optax.Params) -> ParameterEMAState:
        if not jax.tree.leaves(params):  # optax's placeholder (`map_params`)
            return ParameterEMAState(count=jnp.zeros([], jnp.int32), ema=params)
        warn_unmatched_patterns(exclude_from_ema, params, "exclude_from_ema")
        ema = jax.tree.map(
            lambda out, p: (
                optax.MaskedNode() if out else _initial_average(p, state_dtype)
            ),
            excluded(params),
            params,
        )
        return ParameterEMAState(count=jnp.zeros([], jnp.int32), ema=ema)

    def advance(
        updates: optax.Updates,
        state: ParameterEMAState,
        params: optax.Params | None = None,
    ) -> ParameterEMAState:
        _common.require_params(params, "parameter_ema", updates, "gradients")
        first = state.count == 0

        @_common.per_dtype
        def momentum_in(dtype: np.dtype) -> jax.Array:
            momentum = jnp.asarray(
                _common.as_compute_scalar(ema_momentum, dtype), dtype
            )
            if ema_warmup:
                c = state.count.astype(dtype)
                momentum = jnp.minimum(momentum, (1 + c) / (10 + c))
            return jnp.where(first, jnp.zeros([], dtype), momentum)

        def average(e: Any, w: jax.Array, u: jax.Array) -> Any:
            if is_masked(e):
                return e
            # The parameters the caller's ``optax.apply_updates`` will produce
            # from the updates this optimizer emits (in the parameter's dtype).
            new_w = _common.by_parts(lambda w, u: w + u, w, u.astype(w.dtype))
            new_w = _common.sharded_like(new_w, e)
            dtype = _common.compute_dtype(e.dtype, new_w.dtype)
            momentum = momentum_in(_common.real_dtype(dtype))
            average = _common.by_parts(
                lambda e, w: momentum * e + (1 - momentum) * w,
                e.astype(dtype),
                new_w.astype(dtype),
            )
            return average.astype(e.dtype)

        return ParameterEMAState(
            count=optax.safe_increment(state.count),
            ema=jax.tree.map(average, state.ema, params, updates, is_leaf=is_masked),
        )

    def emit(
        updates: optax.Updates,
        new_state: ParameterEMAState,
        params: optax.Params | None = None,
    ) -> optax.Updates:
        if ema_overwrite_frequency is None:
            return updates
        _common.require_params(params, "parameter_ema", updates, "gradients")
        overwrite = new_state.count % ema_overwrite_frequency == 0

        def overwritten(e: Any, u: jax.Array, w: jax.Array) -> jax.Array:
            if is_masked(e):
                return u
            e = _common.sharded_like(e, w)
            dtype = _common.compute_dtype(e.dtype, w.dtype)
            jump = (e.astype(dtype) - w.astype(dtype)).astype(u.dtype)
            return jnp.where(overwrite, jump, u)

        return jax.tree.map(
            overwritten, new_state.ema, updates, params, is_leaf=is_masked
        )

    return _runner.from_phases(init_fn, advance, emit)


def finalize_variable_values(params: optax.Params, opt_state: optax.OptState) -> Any:
    """The parameters to keep at the end of training (Keras' method of that name).

    With EMA on, returns the moving average held in ``opt_state``, cast to the
    parameters' dtypes; with EMA off, returns ``params`` unchanged. ``opt_state``
    may be the state of :func:`adamax`, of any chain holding
    :func:`parameter_ema`, or anything containing one (an
    ``optax.inject_hyperparams`` state, a Flax ``TrainState``, an
    ``nnx.Optimizer``). Flax NNX ``Variable`` leaves are read through, so
    ``nnx.update(model, finalize_variable_values(nnx.state(model, nnx.Param),
    optimizer))`` loads the EMA into an NNX model.

    Args:
      params: the current parameters.
      opt_state: an optimizer state, possibly nested.

    Returns:
      The final parameters.

    Raises:
      ValueError: if the state holds more than one EMA.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from adamax_optax import adamax, finalize_variable_values
      >>> tx = adamax(0.1, use_ema=True, ema_momentum=0.5)
      >>> params = jnp.array([1.0])
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jnp.array([1.0]), state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> bool(jnp.all(finalize_variable_values(params, state) == params))
      True
    """
    found = _common.find_states(opt_state, ParameterEMAState)
    if not found:
        return params
    params = _common.unwrap_variables(params)
    if len(found) > 1:
        raise ValueError(
            f"The optimizer state holds {len(found)} parameter EMAs; "
            "`finalize_variable_values` needs exactly one."
        )
    ema = _common.unwrap_variables(_grouping.ungroup(found[0].ema))
    # An excluded leaf's value is the parameter itself. Unlike the parameters,
    # the map fails and ``check_tree_match`` says where.
    with contextlib.suppress(ValueError, TypeError):
        ema = jax.tree.map(
            lambda e, p: p if is_masked(e) else e, ema, params, is_leaf=is_masked
        )
    try:
        _common.check_tree_match(
            params, ema, "params", "EMA", "finalize_variable_values"
        )
    except ValueError as error:
        if "flax" in type(params).__module__:  # an NNX state, filtered or not
            raise ValueError(
                f"{error} An NNX model's state holds more than its parameters "
                "(BatchNorm statistics, RNG counts): pass "
                "`nnx.state(model, nnx.Param)`."
            ) from None
        raise
    return optax.tree_utils.tree_cast_like(ema, params)
