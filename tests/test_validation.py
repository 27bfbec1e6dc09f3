"""Every bad argument raises at construction, naming the argument and the value."""

from __future__ import annotations

import inspect
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamax_optax
from adamax_optax import adamax

BAD_ARGUMENTS = [
    # (keyword arguments, exception, text the message must contain)
    (
        {"learning_rate": -0.1},
        ValueError,
        "`learning_rate` must be >= 0. Received: learning_rate=-0.1",
    ),
    ({"learning_rate": "fast"}, TypeError, "learning_rate='fast'"),
    ({"learning_rate": True}, TypeError, "learning_rate=True"),
    ({"learning_rate": float("nan")}, ValueError, "learning_rate=nan"),
    ({"learning_rate": np.ones(2)}, ValueError, "`learning_rate` must be a scalar"),
    (
        {"beta_1": 1.0},
        ValueError,
        "`beta_1` must be in the range [0, 1). Received: beta_1=1.0",
    ),
    ({"beta_1": -0.1}, ValueError, "beta_1=-0.1"),
    ({"beta_2": 1.5}, ValueError, "beta_2=1.5"),
    ({"beta_2": None}, TypeError, "beta_2=None"),
    (
        {"epsilon": -1e-7},
        ValueError,
        "`epsilon` must be >= 0. Received: epsilon=-1e-07",
    ),
    ({"weight_decay": -0.01}, ValueError, "weight_decay=-0.01"),
    ({"clipnorm": 0.0}, ValueError, "`clipnorm` must be > 0. Received: clipnorm=0.0"),
    ({"clipnorm": -1.0}, ValueError, "clipnorm=-1.0"),
    ({"clipvalue": -1.0}, ValueError, "clipvalue=-1.0"),
    ({"global_clipnorm": 0}, ValueError, "global_clipnorm=0"),
    (
        {"clipnorm": 1.0, "clipvalue": 1.0},
        ValueError,
        "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. "
        "Received: clipnorm=1.0, clipvalue=1.0, global_clipnorm=None",
    ),
    ({"clipnorm": 1.0, "global_clipnorm": 1.0}, ValueError, "Only one of"),
    ({"use_ema": "yes"}, TypeError, "use_ema='yes'"),
    (
        {"use_ema": True, "ema_momentum": 1.5},
        ValueError,
        "`ema_momentum` must be in the range [0, 1]. Received: ema_momentum=1.5",
    ),
    (
        {"use_ema": True, "ema_overwrite_frequency": 0},
        ValueError,
        "`ema_overwrite_frequency` must be an integer >= 1 or None. "
        "Received: ema_overwrite_frequency=0",
    ),
    (
        {"use_ema": True, "ema_overwrite_frequency": 2.5},
        TypeError,
        "ema_overwrite_frequency=2.5",
    ),
    ({"loss_scale_factor": 0.0}, ValueError, "loss_scale_factor=0.0"),
    ({"loss_scale_factor": float("inf")}, ValueError, "loss_scale_factor=inf"),
    (
        {"gradient_accumulation_steps": 1},
        ValueError,
        "`gradient_accumulation_steps` must be an integer >= 2. "
        "Received: gradient_accumulation_steps=1",
    ),
    (
        {"gradient_accumulation_steps": 2**31},
        ValueError,
        "`gradient_accumulation_steps` must be at most 2**31 - 1",
    ),
    (
        {"use_ema": True, "ema_overwrite_frequency": 2**31},
        ValueError,
        "`ema_overwrite_frequency` must be at most 2**31 - 1",
    ),
    (
        {"dynamic_loss_scale": {"growth_steps": 2**31}},
        ValueError,
        "`growth_steps` must be at most 2**31 - 1",
    ),
    (
        {"gradient_accumulation_steps": 2.0},
        TypeError,
        "gradient_accumulation_steps=2.0",
    ),
    (
        {"gradient_accumulation_steps": True},
        TypeError,
        "gradient_accumulation_steps=True",
    ),
    ({"state_dtype": jnp.int32}, ValueError, "state_dtype=int32"),
    ({"state_dtype": "not-a-dtype"}, TypeError, "state_dtype='not-a-dtype'"),
    (
        {"weight_decay": 0.1, "exclude_from_weight_decay": ["("]},
        ValueError,
        "invalid regular expression",
    ),
    (
        {"weight_decay": 0.1, "exclude_from_weight_decay": ["bias", 3]},
        TypeError,
        "exclude_from_weight_decay",
    ),
    (
        {"weight_decay": 0.1, "exclude_from_weight_decay": {"w": 1}},
        TypeError,
        "must hold Python bools",
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    BAD_ARGUMENTS,
    ids=[str(kwargs) for kwargs, _, _ in BAD_ARGUMENTS],
)
def test_bad_argument_raises_at_construction(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        adamax(**kwargs)


@pytest.mark.parametrize(
    ("factory", "kwargs", "name"),
    [
        (adamax_optax.scale_by_keras_adamax, {"beta_1": 2.0}, "beta_1"),
        (adamax_optax.keras_clipnorm, {"clipnorm": 0.0}, "clipnorm"),
        (adamax_optax.keras_clipvalue, {"clipvalue": -2.0}, "clipvalue"),
        (
            adamax_optax.keras_global_clipnorm,
            {"global_clipnorm": -1.0},
            "global_clipnorm",
        ),
        (adamax_optax.decoupled_weight_decay, {"weight_decay": -1.0}, "weight_decay"),
        (
            adamax_optax.unscale_gradients,
            {"loss_scale_factor": -1.0},
            "loss_scale_factor",
        ),
        (adamax_optax.parameter_ema, {"ema_momentum": 2.0}, "ema_momentum"),
        (
            adamax_optax.scale_by_keras_learning_rate,
            {"learning_rate": -1.0},
            "learning_rate",
        ),
    ],
)
def test_building_blocks_validate_their_own_arguments(factory, kwargs, name):
    with pytest.raises(ValueError, match=f"{name}="):
        factory(**kwargs)


def test_accumulation_block_validates_steps():
    with pytest.raises(ValueError, match="gradient_accumulation_steps=0"):
        adamax_optax.accumulate_gradients(optax.sgd(1.0), 0)


def test_numpy_and_concrete_jax_values_are_validated():
    with pytest.raises(ValueError, match=re.escape("beta_1=1.0")):
        adamax(beta_1=np.float32(1.0))
    with pytest.raises(ValueError, match=re.escape("beta_2=1.0")):
        adamax(beta_2=jnp.asarray(1.0))
    adamax(beta_1=np.float32(0.5), gradient_accumulation_steps=np.int64(3))


def test_traced_hyperparameters_are_not_validated_inside_jit():
    """Tracers cannot be checked without leaving the trace: they pass through."""

    @jax.jit
    def step(beta_1, grads):
        tx = adamax(0.1, beta_1=beta_1)
        return tx.update(grads, tx.init(grads))[0]

    updates = step(jnp.float32(0.5), jnp.ones(3))
    np.testing.assert_allclose(updates, -0.1 * np.ones(3), rtol=1e-5)


@pytest.mark.parametrize("block", ["weight_decay", "use_ema"])
def test_update_without_params_is_a_clear_error(block):
    tx = adamax(weight_decay=0.1) if block == "weight_decay" else adamax(use_ema=True)
    params = jnp.ones(3)
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(params, tx.init(params))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(ema_overwrite_frequency=5),
            r"`ema_overwrite_frequency=5` has no effect without `use_ema=True`",
        ),
        (
            dict(exclude_from_weight_decay=["bias"]),
            r"`exclude_from_weight_decay=\['bias'\]` has no effect without "
            r"`weight_decay`",
        ),
    ],
)
def test_an_option_without_effect_warns_naming_it(kwargs, message):
    with pytest.warns(UserWarning, match=message):
        adamax(**kwargs)


def test_an_exclusion_pattern_matching_no_leaf_warns_at_init():
    tx = adamax(weight_decay=0.1, exclude_from_weight_decay=["bias", "bais"])
    params = {"dense": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}}
    with pytest.warns(UserWarning, match=r"pattern 'bais' matches no parameter") as w:
        tx.init(params)
    assert len(w) == 1  # "bias" matches and does not warn
    assert "'dense/kernel'" in str(w[0].message)


def test_options_with_effect_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tx = adamax(
            weight_decay=0.1,
            exclude_from_weight_decay=["bias"],
            use_ema=True,
            ema_overwrite_frequency=5,
        )
        tx.init({"dense": {"bias": jnp.ones(2)}})


def test_ema_warmup_without_ema_warns():
    with pytest.warns(UserWarning, match=r"`ema_warmup=True` has no effect"):
        adamax(ema_warmup=True)


def test_ema_momentum_without_use_ema_warns_but_keras_defaults_do_not():
    with pytest.warns(UserWarning, match=r"`ema_momentum=0.9` has no effect"):
        adamax(ema_momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adamax(ema_momentum=0.99)  # Keras' default, in every Keras config
        adamax(ema_momentum=0.9, use_ema=True)
        adamax(ema_momentum=jnp.asarray(0.9))  # inject_hyperparams passes arrays


def test_numpy_scalar_options_are_compared_by_value():
    """NumPy scalars, as Keras configs hold them, build; one set without the
    option it needs warns, and one equal to the default does not."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adamax(
            use_ema=True,
            ema_momentum=np.float32(0.9),
            ema_overwrite_frequency=np.int64(3),
        )
        adamax(skip_nonfinite=True, skip_norm_above=np.float32(10.0))
        adamax(quantized_state=True, quantized_block_size=np.int64(128))
        adamax(ema_momentum=np.float32(0.99))  # Keras' default
    with pytest.warns(UserWarning, match=r"`ema_momentum=(np\.float32\()?0\.9\)?` has"):
        adamax(ema_momentum=np.float32(0.9))
    for text in (np.str_("0.9"), np.bool_(True)):
        with pytest.raises(TypeError, match="`ema_momentum` must be a number"):
            adamax(use_ema=True, ema_momentum=text)


def test_warnings_point_at_the_users_line():
    """However many wrappers an option goes through, its warning names the
    line that built or initialised the optimizer."""
    params = {"w": jnp.ones(3)}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        adamax(ema_warmup=True)
        adamax(stochastic_rounding=True).init(params)
        adamax(weight_decay=0.1, exclude_from_weight_decay=["x"]).init(params)
        adamax(
            use_ema=True, exclude_from_ema=["x"], gradient_accumulation_steps=2
        ).init(params)
        jax.eval_shape(
            adamax(stochastic_rounding=True, skip_nonfinite=True).init, params
        )
    users = [w for w in record if issubclass(w.category, UserWarning)]
    assert len(users) == 5
    assert {w.filename for w in users} == {__file__}


@pytest.mark.parametrize("option", ["exclude_from_weight_decay", "exclude_from_ema"])
def test_a_mask_of_another_structure_names_the_argument(option):
    tx = adamax(weight_decay=0.1, use_ema=True, **{option: {"w": True}})
    with pytest.raises(ValueError, match=f"`{option}`: the tree of bools must have"):
        tx.init({"w": jnp.ones(3), "b": jnp.ones(3)})


def test_a_beta_rounded_to_one_by_low_precision_says_so():
    """``optax.inject_hyperparams`` gives the hyperparameters the parameters'
    dtype: in bfloat16, 0.999 is 1.0."""
    tx = optax.inject_hyperparams(adamax)(0.1)
    with pytest.raises(
        ValueError,
        match=r"beta_2=1.0 \(bfloat16 rounds it there.*"
        r"hyperparam_dtype=jnp.float32",
    ):
        tx.init(jnp.ones(3, jnp.bfloat16))
    tx = optax.inject_hyperparams(adamax, hyperparam_dtype=jnp.float32)(0.1)
    tx.init(jnp.ones(3, jnp.bfloat16))
    with pytest.raises(ValueError, match=r"Received: beta_2=1.0$"):
        adamax(beta_2=1.0)  # no hint where nothing rounded it


def test_a_traced_rounding_seed_must_be_static():
    injected = optax.inject_hyperparams(adamax, hyperparam_dtype=jnp.float32)(
        0.1, stochastic_rounding=True, rounding_seed=3
    )
    params = jnp.ones(2, jnp.bfloat16)
    state = injected.init(params)
    with pytest.raises(TypeError, match=r"static_args=\('rounding_seed',\)"):
        jax.jit(injected.update)(params, state, params)


@pytest.mark.parametrize("options", [dict(use_ema=True), dict(weight_decay=0.1)])
def test_params_unlike_the_state_name_the_leaf(options):
    tx = adamax(**options)
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    state = tx.init(params)
    with pytest.raises(
        ValueError,
        match=r"params do not match the gradients: the params have no leaf 'b' "
        r"\(the gradients: 2 leaves, the params: 1\)",
    ):
        tx.update(params, state, {"a": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"leaf 'b' has shape \(4,\) in the params"):
        jax.jit(tx.update)(params, state, {"a": jnp.ones(3), "b": jnp.ones(4)})


def test_gradients_unlike_the_state_name_the_leaf_and_the_state():
    tx = adamax()
    state = tx.init({"a": jnp.ones(3), "b": jnp.ones(2)})
    with pytest.raises(
        ValueError,
        match=r"gradients do not match the optimizer state: the gradients have no "
        r"leaf 'b'; the gradients have leaf 'c' that the optimizer state lacks",
    ):
        tx.update({"a": jnp.ones(3), "c": jnp.ones(2)}, state)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=1e-3), r"`lr` \(tf.keras' name of `learning_rate`\)"),
        (dict(decay=1e-4), r"`decay` \(tf.keras' time-based decay .*InverseTimeDecay"),
        (dict(eps=1e-8), r"`eps` \(optax's name of `epsilon`\)"),
        (dict(weight_decya=0.1), r"`weight_decya` \(did you mean `weight_decay`\?\)"),
        (dict(use_emma=True), r"`use_emma` \(did you mean `use_ema`\?\)"),
        (dict(zzz=1), r"unknown keyword argument\(s\) `zzz`\.$"),
    ],
)
def test_an_unknown_keyword_names_it_and_the_argument_meant(kwargs, message):
    with pytest.raises(TypeError, match=message):
        adamax(**kwargs)


def test_refusing_unknown_keywords_keeps_the_signature():
    assert list(inspect.signature(adamax).parameters)[:2] == ["learning_rate", "beta_1"]
    state = adamax(0.1).init(jnp.ones(2))  # positional arguments still bind
    np.testing.assert_allclose(state["learning_rate"].learning_rate, 0.1)
