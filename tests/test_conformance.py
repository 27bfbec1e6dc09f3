"""optax's generic optimizer checks and Keras' own optimizer tests, on ``adamax``.

Part 1 ports the checks that optax runs on every optax optimizer
(``optax/_src/alias_test.py``: convergence on its parabola and Rosenbrock
problems under ``jit`` without recompiling, extra arguments,
``inject_hyperparams``, dtype preservation, state shape / dtype / sharding
stability, ``MultiSteps``), plus ``optax.masked``, ``apply_if_finite`` and
abstract ``init``. Part 2 ports Keras' tests (``keras/src/optimizers/
adamax_test.py``, ``optimizer_test.py``, ``loss_scale_optimizer_test.py``) with
Keras' expected values; where Keras' test uses ``SGD`` the same block of this
package is chained after ``optax.sgd``. The documented departures from Keras
are pinned in ``test_departure_*``.
"""

from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adamax_optax import (
    accumulate_gradients,
    adamax,
    dynamic_loss_scale,
    finalize_variable_values,
    get_iterations,
    get_loss_scale,
    keras_clipnorm,
    keras_clipvalue,
    keras_global_clipnorm,
    parameter_ema,
    unscale_gradients,
)

# --------------------------------------------------------------------------
# Part 1: optax's generic checks
# --------------------------------------------------------------------------

CONFIGS = {
    "defaults": dict(learning_rate=0.1),
    "accumulation": dict(learning_rate=0.1, gradient_accumulation_steps=2),
    "clip+EMA": dict(learning_rate=0.1, global_clipnorm=10.0, use_ema=True),
}
EVERY_OPTION = dict(
    learning_rate=0.1,
    global_clipnorm=1.0,
    weight_decay=1e-3,
    use_ema=True,
    ema_overwrite_frequency=3,
    gradient_accumulation_steps=2,
    dynamic_loss_scale=True,
)
DTYPES = [
    jnp.float16,
    jnp.bfloat16,
    jnp.float32,
    jnp.float64,
    jnp.complex64,
    jnp.complex128,
]


def abs_sq(x):
    return jnp.real(x * jnp.conj(x))


def parabola(dtype):
    """optax's ``_setup_parabola``."""
    initial = jnp.array([-1.0, 10.0, 1.0], dtype=dtype)
    final = jnp.array([1.0, -1.0, 1.0], dtype=dtype)
    if jnp.iscomplexobj(initial):
        final = final * (1 + 1j)
    return initial, final, lambda p: jnp.sum(abs_sq(p - final))


def rosenbrock(dtype):
    """optax's ``_setup_rosenbrock``."""
    a = 1.0 + 1.0j if jnp.issubdtype(dtype, jnp.complexfloating) else 1.0
    initial = jnp.array([0.0, 0.0], dtype=dtype)
    final = jnp.array([a, a**2], dtype=dtype)

    def objective(p):
        return abs_sq(a - p[0]) + 100.0 * abs_sq(p[1] - p[0] ** 2)

    return initial, final, objective


class CompileCounter:
    """Counts traces of a jitted function."""

    def __init__(self, fn):
        self.traces = 0

        def counted(*args):
            self.traces += 1
            return fn(*args)

        self.jitted = jax.jit(counted)

    def __call__(self, *args):
        return self.jitted(*args)


def optax_step(tx, objective):
    def step(params, state):
        grads = jax.grad(objective)(params)
        # optax's convention: conjugate complex gradients before the update.
        grads = jax.tree.map(jnp.conj, grads)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("target", [parabola, rosenbrock], ids=lambda t: t.__name__)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.complex64], ids=str)
def test_optimization_converges_without_recompiling(config, target, dtype):
    """optax's ``test_optimization``: 10000 jitted steps reach the optimum
    within 3e-2, ``tree.map_params`` works, the step compiles once."""
    tx = adamax(**CONFIGS[config])
    initial, final, objective = target(dtype)
    step = CompileCounter(optax_step(tx, objective))
    params, state = initial, tx.init(initial)
    state = optax.tree.map_params(tx, lambda v: v, state)
    for _ in range(10_000):
        params, state = step(params, state)
    assert step.traces == 1
    np.testing.assert_allclose(params, final, rtol=3e-2, atol=3e-2)


def test_update_accepts_extra_arguments():
    tx = adamax(**EVERY_OPTION)
    params = jnp.array([1.0, 2.0])
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, unexpected_extra_arg=1))
    state = tx.init(params)
    for _ in range(2):
        updates, state = update(params, state, params)
        params = optax.apply_updates(params, updates)
    assert int(get_iterations(state)) == 1


@pytest.mark.parametrize(
    "kwargs",
    [CONFIGS["defaults"], dict(EVERY_OPTION, dynamic_loss_scale=False)],
    ids=["defaults", "every option"],
)
def test_inject_hyperparams_gives_the_same_updates_and_state(kwargs):
    static = ("gradient_accumulation_steps", "ema_overwrite_frequency")
    injected = optax.inject_hyperparams(adamax, static_args=static)(**kwargs)
    plain = adamax(**kwargs)
    params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
    grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]
    s_plain, s_inject = jax.jit(plain.init)(params), jax.jit(injected.init)(params)
    for _ in range(3):
        u_plain, s_plain = jax.jit(plain.update)(grads, s_plain, params)
        u_inject, s_inject = jax.jit(injected.update)(grads, s_inject, params)
        # optax's tolerances: injected hyperparameters are float32 arrays where
        # the plain optimizer folds Python floats into its constants.
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3), u_inject, u_plain
        )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4),
        s_inject.inner_state,
        s_plain,
    )


def test_an_injected_weight_decay_with_exclusions_runs_under_jit():
    # The check for options without effect reads `weight_decay`, traced here.
    injected = optax.inject_hyperparams(adamax)(
        learning_rate=0.1, weight_decay=0.1, exclude_from_weight_decay=["bias"]
    )
    params = {"bias": jnp.ones(3), "kernel": jnp.ones(3)}
    grads = {"bias": jnp.ones(3), "kernel": jnp.ones(3)}
    updates, _ = jax.jit(injected.update)(grads, injected.init(params), params)
    # The first step moves by lr; the decay by lr * wd * w, the bias excluded.
    np.testing.assert_allclose(updates["bias"], -0.1, rtol=1e-5)
    np.testing.assert_allclose(updates["kernel"], -0.1 - 0.1 * 0.1, rtol=1e-5)


def test_inject_hyperparams_integer_arguments_must_be_static():
    injected = optax.inject_hyperparams(adamax)(0.1, gradient_accumulation_steps=2)
    params = jnp.ones(2)
    state = injected.init(params)
    with pytest.raises(
        TypeError, match=r"static_args=\('gradient_accumulation_steps',\)"
    ):
        jax.jit(injected.update)(params, state, params)


def test_inject_hyperparams_state_is_donatable_and_does_not_recompile():
    """Every option, integers static, through a step that donates the
    parameters and the state; a new learning rate of the same dtype reuses the
    compiled step; the result equals the plain optimizer's."""
    static = ("gradient_accumulation_steps", "ema_overwrite_frequency")
    kwargs = dict(EVERY_OPTION, learning_rate=0.5)
    injected = optax.inject_hyperparams(adamax, static_args=static)(**kwargs)
    plain = adamax(**kwargs)
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = {"w": jnp.array([0.5, 0.25, -1.0])}

    def step(tx):
        def apply(params, state):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return CompileCounter(apply), jax.jit(apply, donate_argnums=(0, 1))

    counted, donated = step(injected)
    p_inject, s_inject = jax.tree.map(jnp.array, params), injected.init(params)
    p_plain, s_plain = params, plain.init(params)
    for _ in range(4):
        p_inject, s_inject = donated(p_inject, s_inject)
        p_plain, s_plain = jax.jit(step(plain)[0].jitted)(p_plain, s_plain)
    np.testing.assert_allclose(p_inject["w"], p_plain["w"], rtol=1e-6, atol=1e-6)
    for rate in (0.5, 0.25):
        s_inject.hyperparams["learning_rate"] = jnp.asarray(rate, jnp.float32)
        counted(p_inject, s_inject)
    assert counted.traces == 1


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=str)
def test_updates_keep_the_gradients_dtype(dtype):
    """optax's ``test_preserve_dtype``."""
    tx = adamax(**EVERY_OPTION)
    params = jnp.array([1.0, 2.0], dtype=dtype)
    grads = jax.grad(lambda x: jnp.sum(x**2))(params)
    updates, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
    assert updates.dtype == grads.dtype


def test_updates_come_in_the_parameters_dtype_when_gradients_differ():
    """float32 parameters, bfloat16 gradients: the gradients are cast to the
    parameters' dtype (as Keras does): float32 updates, equal to those of the
    bfloat16 gradients widened (exactly) to float32."""
    tx = adamax(**EVERY_OPTION)
    params = {"w": jnp.linspace(-1.0, 1.0, 5)}
    grads = {"w": jnp.linspace(2.0, -3.0, 5).astype(jnp.bfloat16)}
    state = tx.init(params)
    for _ in range(2):  # a micro-step, then an update
        updates, _ = jax.jit(tx.update)(grads, state, params)
        wide, state = jax.jit(tx.update)(
            jax.tree.map(lambda g: g.astype(jnp.float32), grads), state, params
        )
        assert updates["w"].dtype == jnp.float32
        np.testing.assert_array_equal(updates["w"], wide["w"])
    assert np.abs(updates["w"]).max() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_state_shape_dtype_and_sharding_are_stable(dtype):
    """optax's ``test_state_shape_dtype_shard_stability``: a ``lax.cond``
    between the old and the new state needs both to match exactly."""
    wide = jnp.dtype(dtype).itemsize == 8 or dtype == jnp.complex128
    with jax.enable_x64(wide):
        tx = adamax(**EVERY_OPTION)
        initial, _, objective = parabola(dtype)

        @jax.jit
        def step(params, state):
            grads = jax.tree.map(jnp.conj, jax.grad(objective)(params))
            run = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
            updates, state = jax.lax.cond(
                run, lambda: tx.update(grads, state, params), lambda: (params, state)
            )
            return optax.apply_updates(params, updates), state

        params, state = initial, tx.init(initial)
        for _ in range(2):
            params, new_state = step(params, state)
            assert params.dtype == jnp.dtype(dtype)
            run = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
            state = jax.lax.cond(run, lambda: state, lambda: new_state)  # noqa: B023
        for old, new in zip(
            jax.tree.leaves(state), jax.tree.leaves(new_state), strict=True
        ):
            assert (old.shape, old.dtype) == (new.shape, new.dtype)
            assert old.sharding == new.sharding


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=str)
def test_multisteps_first_call_is_zero(dtype):
    """optax's ``test_gradient_accumulation``, and MultiSteps then updating."""
    tx = optax.MultiSteps(adamax(0.1), every_k_schedule=4)
    params = jnp.array([1.0, 2.0], dtype=dtype)
    grads = jax.grad(lambda x: jnp.sum(x**2))(params)
    state = jax.jit(tx.init)(params)
    with jax.numpy_dtype_promotion("standard"):  # MultiSteps is not strict-clean
        updates, state = jax.jit(tx.update)(grads, state, params)
        np.testing.assert_array_equal(updates, jnp.zeros_like(grads))
        for _ in range(3):
            updates, state = jax.jit(tx.update)(grads, state, params)
    # The fourth call applies Keras' first Adamax step on the mean gradient:
    # lr * m / ((1 - b1) * (|g| + eps)) = 0.1 * sign(g), up to epsilon.
    np.testing.assert_allclose(updates.astype(jnp.float32), [-0.1, -0.1], rtol=1e-2)


def test_masked_with_masked_nodes():
    """Under ``optax.masked`` the masked-out leaves reach ``adamax`` as
    ``MaskedNode``s: they get no state and keep their updates."""
    params = {"w": jnp.array([1.0, -2.0]), "frozen": jnp.array([3.0])}
    mask = {"w": True, "frozen": False}
    tx = optax.masked(adamax(0.5, weight_decay=0.1, use_ema=True), mask)
    state = tx.init(params)
    grads = {"w": jnp.array([1.0, -1.0]), "frozen": jnp.array([7.0])}
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert all(
        isinstance(x, optax.MaskedNode)
        for x in [state.inner_state["adamax"].m["frozen"]]
    )
    np.testing.assert_array_equal(updates["frozen"], [7.0])  # passed through
    # w: one Keras step with decay, -lr * (sign(g) + wd * w), up to epsilon.
    np.testing.assert_allclose(updates["w"], [-0.5 * 1.1, 0.5 * 1.2], rtol=1e-5)


def test_apply_if_finite_skips_a_nan_step_and_keeps_the_state():
    tx = optax.apply_if_finite(adamax(0.5, gradient_accumulation_steps=2), 3)
    params = jnp.array([1.0, 2.0])
    state = tx.init(params)
    good = jnp.array([1.0, -1.0])
    updates, state = jax.jit(tx.update)(good, state, params)
    before = state.inner_state
    updates, state = jax.jit(tx.update)(jnp.array([jnp.nan, 1.0]), state, params)
    np.testing.assert_array_equal(updates, [0.0, 0.0])
    assert int(state.notfinite_count) == 1
    jax.tree.map(np.testing.assert_array_equal, state.inner_state, before)
    updates, state = jax.jit(tx.update)(good, state, params)  # ends the group
    np.testing.assert_allclose(updates, [-0.5, 0.5], rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs", [CONFIGS["defaults"], EVERY_OPTION], ids=["defaults", "every option"]
)
def test_init_on_abstract_inputs(kwargs):
    """``init`` takes ``jax.ShapeDtypeStruct``s (orbax restore targets) and runs
    under ``jax.eval_shape``, with the concrete state's structure and dtypes."""
    tx = adamax(**kwargs)
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2, jnp.bfloat16)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    concrete = tx.init(params)
    signature = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    assert signature(tx.init(abstract)) == signature(concrete)
    assert signature(jax.eval_shape(tx.init, params)) == signature(concrete)
    assert signature(jax.eval_shape(tx.init, abstract)) == signature(concrete)


# --------------------------------------------------------------------------
# Part 2: Keras' own tests, with Keras' expected values
# --------------------------------------------------------------------------


def apply_once(tx, grads, params):
    updates, state = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates), state


def test_keras_single_step():
    new, _ = apply_once(
        adamax(0.5), jnp.array([1.0, 6.0, 7.0, 2.0]), jnp.array([1.0, 2.0, 3.0, 4.0])
    )
    np.testing.assert_allclose(new, [0.5, 1.5, 2.5, 3.5], rtol=1e-4, atol=1e-4)


def test_keras_weight_decay():
    """Keras' test steps ``var1`` with three fresh optimizers, then checks it
    and an excluded variable."""
    params = {"var1": jnp.array(2.0), "exclude": jnp.array(2.0)}
    grads = {"var1": jnp.array(0.0), "exclude": jnp.array(0.0)}
    for _ in range(3):
        tx = adamax(1.0, weight_decay=0.004, exclude_from_weight_decay=["exclude"])
        params, _ = apply_once(tx, grads, params)
    np.testing.assert_allclose(params["var1"], 1.9760959, atol=1e-6)
    np.testing.assert_allclose(params["exclude"], 2.0, atol=1e-6)


def test_keras_correctness_with_golden():
    tx = adamax(learning_rate=0.2, beta_1=0.85, beta_2=0.95, epsilon=1e-6)
    x = jnp.ones(10)
    grads = jnp.arange(1, 11, dtype=jnp.float32) / 10
    golden = np.array(
        [
            [0.8] * 10,
            [
                0.6827,
                0.6873,
                0.6888,
                0.6896,
                0.6901,
                0.6904,
                0.6906,
                0.6908,
                0.6909,
                0.691,
            ],
            [
                0.5333,
                0.5407,
                0.5431,
                0.5444,
                0.5451,
                0.5456,
                0.546,
                0.5462,
                0.5464,
                0.5466,
            ],
            [
                0.368,
                0.3773,
                0.3804,
                0.382,
                0.3829,
                0.3835,
                0.384,
                0.3843,
                0.3846,
                0.3848,
            ],
            [
                0.1933,
                0.204,
                0.2076,
                0.2094,
                0.2105,
                0.2112,
                0.2117,
                0.2121,
                0.2124,
                0.2126,
            ],
        ]
    )
    state = tx.init(x)
    updates, state = tx.update(jnp.full(10, 0.01), state, x)
    x = optax.apply_updates(x, updates)
    for row in golden:
        np.testing.assert_allclose(x, row, rtol=5e-4, atol=5e-4)
        updates, state = tx.update(grads, state, x)
        x = optax.apply_updates(x, updates)


@pytest.mark.parametrize(
    "block, expected",
    [
        (keras_clipnorm(1.0), [2**0.5 / 2, 2**0.5 / 2]),
        (keras_clipvalue(1.0), [1.0, 1.0]),
    ],
    ids=["clipnorm", "clipvalue"],
)
def test_keras_clipping(block, expected):
    grads = jnp.array([100.0, 100.0])
    clipped, _ = block.update(grads, block.init(grads))
    np.testing.assert_allclose(clipped, expected, rtol=1e-6)


def test_keras_global_clip_norm():
    grads = np.array([50.0, 100.0], dtype=np.float32)
    block = keras_global_clipnorm(1.0)
    clipped, _ = block.update(jnp.asarray(grads), block.init(grads))
    np.testing.assert_allclose(clipped, grads / np.linalg.norm(grads), rtol=1e-6)


def test_keras_clip_arguments_are_exclusive():
    with pytest.raises(ValueError, match="Only one of `clipnorm`, `clipvalue`"):
        adamax(clipnorm=0.1, clipvalue=0.1)
    with pytest.raises(ValueError, match="Only one of `clipnorm`, `clipvalue`"):
        adamax(clipnorm=0.1, global_clipnorm=0.1)


def test_keras_ema():
    """Keras' ``test_ema`` (SGD, lr 1, momentum 0.9, overwrite every 3)."""
    tx = optax.chain(optax.sgd(1.0), parameter_ema(0.9, 3))
    v = jnp.array([[3.0, 4.0], [5.0, 6.0]])
    grads = jnp.ones((2, 2))
    state = tx.init(v)
    expected = [
        ([[2.0, 3.0], [4.0, 5.0]], [[2.0, 3.0], [4.0, 5.0]]),
        ([[1.0, 2.0], [3.0, 4.0]], [[1.9, 2.9], [3.9, 4.9]]),
        ([[1.71, 2.71], [3.71, 4.71]], [[1.71, 2.71], [3.71, 4.71]]),
    ]
    for params, average in expected:
        updates, state = tx.update(grads, state, v)
        v = optax.apply_updates(v, updates)
        np.testing.assert_allclose(v, params, rtol=1e-6)
        np.testing.assert_allclose(
            finalize_variable_values(v, state), average, rtol=1e-6
        )


def test_keras_static_loss_scaling():
    tx = optax.chain(unscale_gradients(1024.0), optax.sgd(1.0))
    v = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    new, _ = apply_once(tx, v * 1024.0, v)
    np.testing.assert_allclose(new, np.zeros((2, 2)), atol=1e-6)


def test_keras_gradient_accumulation_and_iterations():
    """Keras' ``test_gradient_accumulation`` (SGD, lr 1, 3 steps). Keras zeroes
    its accumulator after an update; ours is not zeroed (a departure pinned in
    ``test_departure_accumulator_is_not_zeroed_after_an_update``)."""
    tx = accumulate_gradients(optax.sgd(1.0), 3)
    v = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    grads = jnp.ones((2, 2))
    state = tx.init(v)
    expected = [  # parameters, then Keras' _iterations modulo the group size
        ([[1.0, 2.0], [3.0, 4.0]], 1),
        ([[1.0, 2.0], [3.0, 4.0]], 2),
        ([[0.0, 1.0], [2.0, 3.0]], 0),
        ([[0.0, 1.0], [2.0, 3.0]], 1),
    ]
    for params, micro_step in expected:
        updates, state = tx.update(grads, state, v)
        v = optax.apply_updates(v, updates)
        np.testing.assert_allclose(v, params)
        assert int(state.micro_step) == micro_step
    np.testing.assert_allclose(state.accumulator, np.ones((2, 2)))  # as Keras'


def test_keras_gradient_accumulation_with_weight_decay():
    """Keras' test: 3 accumulated micro-steps equal one step on their mean."""
    rng = np.random.default_rng(0)
    one, three = (
        adamax(weight_decay=0.05),
        adamax(weight_decay=0.05, gradient_accumulation_steps=3),
    )
    v1 = v3 = jnp.array([[0.9], [0.5]])
    s1, s3 = one.init(v1), three.init(v3)
    for _ in range(8):
        grads = rng.random((3, 2, 1)).astype(np.float32)
        u1, s1 = one.update(jnp.asarray(grads.mean(axis=0)), s1, v1)
        v1 = optax.apply_updates(v1, u1)
        for batch in grads:
            u3, s3 = three.update(jnp.asarray(batch), s3, v3)
            v3 = optax.apply_updates(v3, u3)
    np.testing.assert_allclose(v1, v3, rtol=1e-5, atol=1e-6)


def test_keras_iterations_counter():
    tx = adamax(1.0)
    v = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    state = tx.init(v)
    assert int(get_iterations(state)) == 0
    for count in (1, 2):
        _, state = tx.update(jnp.ones((2, 2)), state, v)
        assert int(get_iterations(state)) == count


LSO_GRADS = jnp.array([1.0, 6.0, 7.0, 2.0])
LSO_VARS = jnp.array([1.0, 2.0, 3.0, 4.0])


def test_keras_loss_scale_finite_step():
    tx = dynamic_loss_scale(optax.sgd(0.5))
    state = tx.init(LSO_VARS)
    updates, state = tx.update(LSO_GRADS * get_loss_scale(state), state, LSO_VARS)
    new = optax.apply_updates(LSO_VARS, updates)
    np.testing.assert_allclose(new, [0.5, -1.0, -0.5, 3.0], rtol=1e-4, atol=1e-4)


def test_keras_loss_scale_infinite_step():
    tx = dynamic_loss_scale(optax.sgd(0.5))
    new, _ = apply_once(tx, jnp.full(4, jnp.inf), LSO_VARS)
    np.testing.assert_allclose(new, LSO_VARS)


def test_keras_loss_scale_downscaling():
    tx = dynamic_loss_scale(optax.sgd(0.5), initial_scale=400.0)
    state = tx.init(LSO_VARS)
    for _ in range(4):
        _, state = tx.update(jnp.full(4, jnp.inf), state, LSO_VARS)
    np.testing.assert_allclose(get_loss_scale(state), 25.0)


def test_keras_loss_scale_upscaling():
    tx = dynamic_loss_scale(optax.sgd(0.5), initial_scale=2.0, growth_steps=2)
    state = tx.init(LSO_VARS)
    for _ in range(8):
        _, state = tx.update(LSO_GRADS, state, LSO_VARS)
    np.testing.assert_allclose(get_loss_scale(state), 32.0)


def test_keras_loss_scale_iterations_update():
    tx = adamax(0.5, dynamic_loss_scale=True)
    state = tx.init(LSO_VARS)
    assert int(get_iterations(state)) == 0
    for i in range(3):
        _, state = tx.update(LSO_GRADS, state, LSO_VARS)
        assert int(get_iterations(state)) == i + 1


# --------------------------------------------------------------------------
# The documented departures, each pinned
# --------------------------------------------------------------------------


def test_departure_integer_parameters_are_refused():
    """Keras and optax step integer variables by rounding; we refuse them."""
    with pytest.raises(TypeError, match="floating-point"):
        adamax().init({"steps": jnp.zeros(2, jnp.int32)})


def test_departure_transforms_are_not_picklable():
    """Keras optimizers pickle; optax transforms hold closures and do not. Keep
    the configuration instead (``get_config`` / ``from_config``)."""
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps(adamax())


def test_departure_accumulator_is_not_zeroed_after_an_update():
    """The first micro-step of a group overwrites the accumulator, so zeroing it
    after the update would be a wasted write; Keras writes zeros."""
    tx = adamax(1.0, gradient_accumulation_steps=2)
    v = jnp.ones(2)
    state = tx.init(v)
    for g in (1.0, 3.0):
        _, state = tx.update(jnp.full(2, g), state, v)
    # The finished group's mean, (1 + 3) / 2, where Keras holds zeros.
    np.testing.assert_array_equal(state["accumulate"].accumulator, [2.0, 2.0])


def test_departure_static_and_dynamic_loss_scale_are_refused_together():
    """Keras' ``LossScaleOptimizer`` ignores an inner ``loss_scale_factor``;
    we refuse the pair rather than silently drop one."""
    with pytest.raises(ValueError, match="either `loss_scale_factor` or"):
        adamax(loss_scale_factor=100.0, dynamic_loss_scale=True)


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(
            use_ema=True,
            weight_decay=0.1,
            global_clipnorm=10.0,
            gradient_accumulation_steps=2,
            dynamic_loss_scale=True,
        ),
    ],
    ids=["defaults", "every wrapper"],
)
def test_python_number_leaves(options):
    """optax accepts Python numbers as leaves (its test_combine_extra_args): they
    move as float32 arrays would, and the first Adamax step is -lr * sign(g)."""
    tx = optax.chain(adamax(1e-3, **options), optax.identity())
    numbers = {"a": 1.0, "b": -2.0}
    arrays = {k: jnp.asarray(v, jnp.float32) for k, v in numbers.items()}
    got_state, want_state = tx.init(numbers), tx.init(arrays)
    for _ in range(2):
        got, got_state = tx.update(numbers, got_state, numbers)
        want, want_state = tx.update(arrays, want_state, arrays)
    for key in numbers:
        assert got[key].dtype == jnp.float32
        np.testing.assert_array_equal(got[key], want[key])
    if not options:
        np.testing.assert_allclose(got["a"], -1e-3, rtol=1e-5)
        np.testing.assert_allclose(got["b"], 1e-3, rtol=1e-5)


def test_integer_leaves_are_refused_at_init_naming_the_leaf():
    """optax steps integer parameters with rounding; we refuse them clearly."""
    with pytest.raises(TypeError, match=r"leaf 'b' has dtype int32"):
        adamax(1e-3).init({"a": 1.0, "b": 2})
