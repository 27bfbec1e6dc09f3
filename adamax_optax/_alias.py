"""``adamax(...)``: the whole Keras ``Adamax`` optimizer as one optax chain."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax
from jax.typing import ArrayLike, DTypeLike

from adamax_optax import _chain, _common, _gate, _grouping, _runner, _validation
from adamax_optax._accumulation import (
    accumulate_gradients,
    check_gradient_accumulation_steps,
)
from adamax_optax._adamax import scale_by_keras_adamax
from adamax_optax._clipping import (
    keras_clipnorm,
    keras_clipvalue,
    keras_global_clipnorm,
)
from adamax_optax._dynamic_loss_scale import (
    DYNAMIC_LOSS_SCALE_DEFAULTS,
)
from adamax_optax._dynamic_loss_scale import (
    dynamic_loss_scale as wrap_dynamic_loss_scale,
)
from adamax_optax._ema import check_ema_overwrite_frequency, parameter_ema
from adamax_optax._learning_rate import (
    LearningRate,
    check_learning_rate,
    scale_by_keras_learning_rate,
)
from adamax_optax._loss_scale import unscale_gradients
from adamax_optax._migration import state_mismatch
from adamax_optax._skip_nonfinite import skip_nonfinite as wrap_skip_nonfinite
from adamax_optax._stochastic_rounding import (
    stochastic_rounding as stochastic_rounding_block,
)
from adamax_optax._weight_decay import (
    ExcludeFromWeightDecay,
    decoupled_weight_decay,
    exclusion_mask,
)


def _clipping(
    clipnorm: ArrayLike | None,
    clipvalue: ArrayLike | None,
    global_clipnorm: ArrayLike | None,
) -> list[tuple[str, optax.GradientTransformation]]:
    if clipnorm is not None:
        return [("clipnorm", keras_clipnorm(clipnorm))]
    if global_clipnorm is not None:
        return [("global_clipnorm", keras_global_clipnorm(global_clipnorm))]
    if clipvalue is not None:
        return [("clipvalue", keras_clipvalue(clipvalue))]
    return []


@_validation.refuse_unknown_keywords
def adamax(
    learning_rate: LearningRate = 0.001,
    beta_1: ArrayLike = 0.9,
    beta_2: ArrayLike = 0.999,
    epsilon: ArrayLike = 1e-7,
    weight_decay: ArrayLike | None = None,
    clipnorm: ArrayLike | None = None,
    clipvalue: ArrayLike | None = None,
    global_clipnorm: ArrayLike | None = None,
    use_ema: bool = False,
    ema_momentum: ArrayLike = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: ArrayLike | None = None,
    gradient_accumulation_steps: int | None = None,
    *,
    exclude_from_weight_decay: ExcludeFromWeightDecay = None,
    state_dtype: DTypeLike | None = None,
    dynamic_loss_scale: bool | Mapping[str, Any] = False,
    ema_warmup: bool = False,
    exclude_from_ema: ExcludeFromWeightDecay = None,
    skip_nonfinite: bool = False,
    skip_norm_above: ArrayLike | None = None,
    quantized_state: bool = False,
    quantized_block_size: int | None = None,
    stochastic_rounding: bool = False,
    rounding_seed: int | None = None,
    gating: _gate.Gating | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Keras' ``Adamax`` optimizer, every option included, as an optax transform.

    Takes the signature of ``keras.optimizers.Adamax`` and reproduces its
    numerics. One call ``update(grads, state, params)`` does, in Keras' order:

    1. ``g = g / loss_scale_factor``;
    2. with ``gradient_accumulation_steps = N``: calls ``1 .. N - 1`` of a group
       only accumulate (zero updates); call ``N`` continues with the mean;
    3. clipping: ``clipnorm`` per leaf, ``global_clipnorm`` or ``clipvalue``;
    4. the Adamax step, with decoupled weight decay and ``t`` the 1-based update
       number::

           m = m + (g - m) * (1 - beta_1)
           u = maximum(beta_2 * u, abs(g))
           w = w - lr * (m / ((1 - beta_1 ** t) * (u + epsilon)) + weight_decay * w)

    5. ``use_ema``: the moving average of the parameters, which replaces them
       every ``ema_overwrite_frequency`` updates.

    With ``skip_nonfinite=True`` (beyond Keras) a call whose gradient, after
    step 1, holds a NaN or an infinity changes nothing and returns zero updates
    (see :func:`skip_nonfinite`). Without it, as in Keras, one NaN element makes
    the infinity norm ``u`` NaN for good.

    Under accumulation, ``update(grads, state, params, weight=w)`` weighs the
    call's gradient by ``w`` in its group's mean, and ``flush=True`` ends the
    group at this call (see :func:`accumulate_gradients`).

    Complex parameters follow optax's convention (pass the conjugate gradient):
    ``abs(g)`` is the modulus and the norms for clipping sum ``|g| ** 2``;
    ``clipvalue`` refuses them.

    The documentation's *Semantics* page (``docs/semantics.md``) is the full
    contract: order of operations, counting, loss scaling, dtypes and the
    departures from Keras.

    The state is an ``optax.named_chain`` state: read it by name, e.g.
    ``state["adamax"].m`` (under accumulation:
    ``state["accumulate"].inner_state["adamax"]``). Each stage is a building block
    of this package usable alone.

    Args:
      learning_rate: a number, an optax schedule, a Keras
        ``LearningRateSchedule`` or a zero-argument callable (see
        :func:`scale_by_keras_learning_rate`). Defaults to 0.001.
      beta_1: decay rate of the first moment, in [0, 1).
      beta_2: decay rate of the infinity norm, in [0, 1).
      epsilon: added to ``u`` before dividing, >= 0.
      weight_decay: decoupled weight decay rate, >= 0, or ``None``.
      clipnorm: clip each leaf to this L2 norm, > 0, or ``None``.
      clipvalue: clip each element to ``[-clipvalue, clipvalue]``, or ``None``.
      global_clipnorm: clip all leaves together to this global L2 norm, or
        ``None``. At most one of the three clipping options may be set.
      use_ema: keep a moving average of the parameters.
      ema_momentum: weight of the old average, in [0, 1].
      ema_overwrite_frequency: overwrite the parameters with their average
        every this many updates, or ``None`` (then use
        :func:`finalize_variable_values` at the end).
      loss_scale_factor: a fixed factor the loss was multiplied by, or ``None``.
      gradient_accumulation_steps: apply one update every this many calls,
        with the mean gradient; an integer >= 2 or ``None``.
      exclude_from_weight_decay: leaves not to decay: regular expressions
        searched in ``"/"``-joined key paths, a pytree of bools (``True`` =
        excluded), or a callable returning one.
      state_dtype: precision of the moments, accumulator and EMA; ``None`` keeps
        each parameter's dtype (as Keras does). A complex parameter keeps complex
        state of that precision, and a real ``u`` (see
        :func:`scale_by_keras_adamax`).
      ema_warmup: beyond Keras, off by default: cap the EMA's momentum at
        ``(1 + c) / (10 + c)`` after ``c`` updates, so that a short run's
        average is not dominated by the starting weights (see
        :func:`parameter_ema`).
      dynamic_loss_scale: ``True``, or a dict of :func:`dynamic_loss_scale`
        settings (``initial_scale``, ``growth_steps``, ``factor``,
        ``min_loss_scale``, ``max_loss_scale``), wraps the whole optimizer in
        dynamic loss scaling, Keras' ``LossScaleOptimizer``: multiply the loss by
        :func:`get_loss_scale` and pass the scaled gradients. Exclusive with
        ``loss_scale_factor``.
      exclude_from_ema: beyond Keras: leaves to keep no moving average of
        (no memory), in the forms of ``exclude_from_weight_decay``; they are
        never overwritten and :func:`finalize_variable_values` returns them
        as they are.
      skip_nonfinite: beyond Keras, off by default: skip a call whose
        gradient (after ``loss_scale_factor``) holds a NaN or an infinity;
        :func:`get_skipped_steps` counts the skipped calls.
      skip_norm_above: with ``skip_nonfinite``, also skip a call whose global
        gradient norm (before clipping) exceeds this, > 0, or ``None``.
      quantized_state: beyond Keras, off by default: hold ``m`` and ``u`` of
        each leaf of 4096 elements or more in 8 bits each, 2 bytes a
        parameter instead of 8 in float32 (see :func:`scale_by_keras_adamax`
        and the documentation's *Memory* page). The accumulator and the EMA
        stay in ``state_dtype``. Real parameters only.
      quantized_block_size: with ``quantized_state``, the most elements along
        a leaf's last axis that share one scale; a positive integer, or
        ``None`` for 256.
      stochastic_rounding: beyond Keras, off by default: round each new
        bfloat16 or float16 parameter up or down at random, so that updates
        below half a unit in its last place still move it on average (see
        :func:`stochastic_rounding`); the update is computed and handed to it
        in float32. Float32 parameters are unaffected.
      rounding_seed: with ``stochastic_rounding``, the seed of its key (kept
        in the state), an integer in ``[0, 2**32)``, or ``None`` for 0.
      gating: an expert setting, for measuring: how a call that leaves the
        state alone (an accumulation micro-step, a skipped step) is compiled:
        ``"loop"``, ``"cond"``, ``"where"`` (computes the inner update and
        selects), or ``None``, the default, which compiles to the form
        measured best on every backend measured. All give the same results;
        see the performance page of the docs.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
      when ``weight_decay``, ``use_ema`` or ``stochastic_rounding`` is set.
      Gradients are cast to their parameter's dtype first, as Keras casts them
      to the variable's, so the updates come back in each parameter's dtype
      (a float32 parameter with bfloat16 gradients gets float32 updates);
      called without ``params``, in the gradients' dtype.

    Raises:
      ValueError, TypeError: for any argument out of range or of the wrong type,
        naming the argument and the value received.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from adamax_optax import adamax
      >>> tx = adamax(learning_rate=0.1, weight_decay=0.01, global_clipnorm=1.0)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> loss = lambda p: jnp.sum(p["w"] ** 2)
      >>> state = tx.init(params)
      >>> for _ in range(100):
      ...     grads = jax.grad(loss)(params)
      ...     updates, state = tx.update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(loss(params) < 1e-2), int(state["adamax"].count)
      (True, 100)
    """
    arguments = dict(locals())
    _validate(arguments)
    _warn_options_without_effect(arguments)
    scaling = _dynamic_loss_scale_settings(dynamic_loss_scale)
    if scaling is not None and loss_scale_factor is not None:
        raise ValueError(
            "Set either `loss_scale_factor` or `dynamic_loss_scale`, not both. "
            f"Received: loss_scale_factor={loss_scale_factor}, "
            f"dynamic_loss_scale={dynamic_loss_scale}"
        )

    update_chain = [
        *_clipping(clipnorm, clipvalue, global_clipnorm),
        (
            "adamax",
            scale_by_keras_adamax(
                beta_1,
                beta_2,
                epsilon,
                state_dtype=state_dtype,
                quantized_state=quantized_state,
                quantized_block_size=quantized_block_size,
                # Stochastic rounding rounds the new parameter itself: the
                # update reaches it unrounded, through decay and the rate.
                full_precision_updates=bool(stochastic_rounding),
            ),
        ),
    ]
    if weight_decay is not None:
        decay = decoupled_weight_decay(
            weight_decay, exclude_from_weight_decay=exclude_from_weight_decay
        )
        update_chain.append(("weight_decay", decay))
    # Under accumulation the schedule counts micro-steps, N taken from the
    # enclosing accumulate_gradients while it traces this chain.
    update_chain.append(("learning_rate", scale_by_keras_learning_rate(learning_rate)))
    if stochastic_rounding:  # before the EMA: it averages the rounded weights
        update_chain.append(
            (
                "stochastic_rounding",
                stochastic_rounding_block(
                    0 if rounding_seed is None else rounding_seed
                ),
            )
        )
    if use_ema:
        ema = parameter_ema(
            ema_momentum,
            ema_overwrite_frequency,
            ema_warmup=ema_warmup,
            state_dtype=state_dtype,
            exclude_from_ema=exclude_from_ema,
        )
        update_chain.append(("ema", ema))

    if gradient_accumulation_steps is not None:
        accumulate = accumulate_gradients(
            _chain.named_chain(*update_chain),
            gradient_accumulation_steps,
            state_dtype=state_dtype,
            gating=gating,
        )
        update_chain = [("accumulate", accumulate)]
    if skip_nonfinite:
        protected = wrap_skip_nonfinite(
            _chain.named_chain(*update_chain),
            skip_norm_above=skip_norm_above,
            gating=gating,
        )
        update_chain = [("skip_nonfinite", protected)]
    chain = []
    if loss_scale_factor is not None:
        chain.append(("loss_scale", unscale_gradients(loss_scale_factor)))
    chain.extend(update_chain)
    optimizer: optax.GradientTransformationExtraArgs = _chain.named_chain(*chain)
    if scaling is not None:
        optimizer = wrap_dynamic_loss_scale(optimizer, **scaling, gating=gating)
    # Small leaves of one shape run stacked (multi-tensor); the exclusions
    # label them, so that a stack is decayed, and averaged, as one.
    masks = {}
    if weight_decay is not None:
        masks["exclude_from_weight_decay"] = exclusion_mask(exclude_from_weight_decay)
    if use_ema:
        masks["exclude_from_ema"] = exclusion_mask(exclude_from_ema, "exclude_from_ema")
    optimizer = _grouping.grouped(optimizer, masks)
    return _cast_on_entry(
        optimizer, arguments, accumulates=gradient_accumulation_steps is not None
    )


def _cast_on_entry(
    optimizer: optax.GradientTransformationExtraArgs,
    arguments: Mapping[str, Any],
    accumulates: bool,
) -> optax.GradientTransformationExtraArgs:
    """``optimizer`` with gradients cast to their parameter's dtype first (the
    arithmetic then runs in the compute dtype), so that updates leave in it. A
    gradient wider than its parameter (float32 for float16) is cast by the
    Adamax step instead, as Keras casts it: after the loss scale's division,
    accumulation and clipping, which a cast on entry could overflow. Without
    accumulation, the group arguments ``weight`` and ``flush`` are refused:
    they would do nothing."""

    def update(updates, state, params=None, **extra_args):
        if not accumulates:
            _refuse_group_arguments(extra_args)
        _common.check_float_gradients(updates, "adamax")
        updates = _common.cast_to_params(updates, params, keep_wider=True)
        params = _common.as_arrays(params)
        try:
            return optimizer.update(updates, state, params, **extra_args)
        except _grouping.LeafMismatchError:
            raise  # names the leaf already
        except (KeyError, AttributeError, TypeError, ValueError) as error:
            # A state of another configuration fails somewhere inside; say
            # which components differ (free on the normal path).
            like = updates if params is None else params
            mismatch = state_mismatch(optimizer, state, like)
            if mismatch is not None:
                raise ValueError(mismatch) from error
            raise

    def emit_updates(updates, state, new_state, params=None, **extra_args):
        updates = _common.cast_to_params(updates, params, keep_wider=True)
        params = _common.as_arrays(params)
        return _runner.emit_updates(
            optimizer, updates, state, new_state, params, **extra_args
        )

    return _runner.transformation(
        optimizer.init,
        update,
        emit=emit_updates,
        members=(optimizer,),
        arguments=arguments,
    )


def _refuse_group_arguments(extra_args: Mapping[str, Any]) -> None:
    given = [name for name in ("weight", "flush") if extra_args.get(name) is not None]
    if given:
        raise TypeError(
            f"`update` received {', '.join(f'`{n}`' for n in given)}, which only "
            "gradient accumulation uses, but this optimizer has "
            "`gradient_accumulation_steps=None`: every call is its own update. "
            "Set `gradient_accumulation_steps`, or drop the argument."
        )


def arguments_of(
    optimizer: optax.GradientTransformation, caller: str = "get_config"
) -> dict[str, Any]:
    """The keyword arguments :func:`adamax` received for ``optimizer``.

    Raises:
      ValueError: if ``optimizer`` was not built by :func:`adamax`.
    """
    arguments = getattr(_runner.phases_of(optimizer), "arguments", None)
    if arguments is None:
        raise ValueError(
            f"`{caller}` needs an optimizer built by `adamax_optax.adamax(...)`; "
            f"received {type(optimizer).__name__}. (An optimizer wrapped by "
            "`optax.inject_hyperparams` or `optax.chain` has no config of its "
            "own: keep the arguments you built it with.)"
        )
    return dict(arguments)


def _validate(arguments: Mapping[str, Any]) -> None:
    """The checks that no building block makes itself (those of ``beta_1``,
    ``epsilon``, ``weight_decay`` and the clipping norms are its stages')."""
    check_learning_rate(arguments["learning_rate"])
    _validation.check_only_one_clip(
        arguments["clipnorm"], arguments["clipvalue"], arguments["global_clipnorm"]
    )
    for flag in ("use_ema", "ema_warmup", "skip_nonfinite", "stochastic_rounding"):
        _validation.check_bool(flag, arguments[flag])
    _validation.check_ema_momentum(arguments["ema_momentum"])
    check_ema_overwrite_frequency(arguments["ema_overwrite_frequency"])
    if arguments["gradient_accumulation_steps"] is not None:
        check_gradient_accumulation_steps(arguments["gradient_accumulation_steps"])
    if arguments["skip_norm_above"] is not None:
        _validation.check_positive("skip_norm_above", arguments["skip_norm_above"])
    _gate.check_gating(arguments["gating"])


# An option that acts only with another: (the option, the one it needs).
_ACTS_ONLY_WITH = (
    ("ema_momentum", "use_ema"),
    ("ema_overwrite_frequency", "use_ema"),
    ("ema_warmup", "use_ema"),
    ("exclude_from_ema", "use_ema"),
    ("skip_norm_above", "skip_nonfinite"),
    ("exclude_from_weight_decay", "weight_decay"),
    ("quantized_block_size", "quantized_state"),
    ("rounding_seed", "stochastic_rounding"),
)


def _is_set(value: Any, default: Any) -> bool:
    """Whether an option was set away from its default: not ``None``, an empty
    mask or an array, and unequal to the default (a NumPy scalar, as Keras
    configs hold them, by its value in its own precision)."""
    if isinstance(value, jax.Array | np.ndarray) or value is None:
        return False
    if isinstance(value, list | tuple | dict) and not value:
        return False
    if isinstance(value, np.number | np.bool_):
        return default is None or bool(value != np.asarray(default, value.dtype))
    return value != default


def _is_off(value: Any) -> bool:
    """Whether an option another needs is off: ``None``, ``False`` or a zero
    number. An array (``optax.inject_hyperparams`` passes one, traced under
    ``jit``) counts as on."""
    if isinstance(value, jax.Array | np.ndarray):
        return False
    return not value


def _warn_options_without_effect(arguments: Mapping[str, Any]) -> None:
    """Warns for each option set away from its default without the one it needs.

    An array counts as unset: ``optax.inject_hyperparams`` passes every numeric
    argument as one, defaults included. Keras' default ``ema_momentum=0.99``, in
    every Keras config, does not warn.
    """
    for option, needed in _ACTS_ONLY_WITH:
        value = arguments[option]
        if _is_set(value, _ADAMAX_DEFAULTS[option]) and _is_off(arguments[needed]):
            requirement = (
                f"`{needed}=True`"
                if _ADAMAX_DEFAULTS[needed] is False
                else f"`{needed}`"
            )
            _common.warn(f"`{option}={value!r}` has no effect without {requirement}.")


def _dynamic_loss_scale_settings(
    dynamic_loss_scale: bool | Mapping[str, Any],
) -> dict[str, Any] | None:
    """``None`` when off, else the full settings with defaults filled in."""
    if isinstance(dynamic_loss_scale, bool | np.bool_):
        return dict(DYNAMIC_LOSS_SCALE_DEFAULTS) if dynamic_loss_scale else None
    if not isinstance(dynamic_loss_scale, Mapping):
        raise TypeError(
            "`dynamic_loss_scale` must be a bool or a dict of settings. "
            f"Received: dynamic_loss_scale={dynamic_loss_scale!r}"
        )
    unknown = set(dynamic_loss_scale) - set(DYNAMIC_LOSS_SCALE_DEFAULTS)
    if unknown:
        raise ValueError(
            f"Unknown `dynamic_loss_scale` settings {sorted(unknown)}; the "
            f"settings are {sorted(DYNAMIC_LOSS_SCALE_DEFAULTS)}."
        )
    return {**DYNAMIC_LOSS_SCALE_DEFAULTS, **dynamic_loss_scale}


_ADAMAX_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(adamax).parameters.items()
}
