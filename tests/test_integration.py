"""adamax_optax inside real training loops: Flax linen, Flax NNX, Equinox, optax.chain.

Each loop must bring a regression loss down, and the EMA read back through
``finalize_variable_values`` must equal the average of the parameters the loop
actually produced, computed here in NumPy (a documented departure: the EMA starts at the
first updated parameters, then ``ema = m * ema + (1 - m) * w``).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx
from flax.training import train_state

import adamax_optax

MOMENTUM = 0.9
STEPS = 60


@pytest.fixture(autouse=True)
def user_promotion_rules():
    """Training loops are user code: they run under JAX's default promotion."""
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    w = rng.normal(size=(4, 1)).astype(np.float32)
    y = np.tanh(x @ w) + 0.05 * rng.normal(size=(64, 1)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def optimizer(**options) -> optax.GradientTransformation:
    return adamax_optax.adamax(
        0.02,
        weight_decay=1e-3,
        global_clipnorm=1.0,
        use_ema=True,
        ema_momentum=MOMENTUM,
        exclude_from_weight_decay=["bias"],
        **options,
    )


class EMAReference:
    """NumPy EMA over the parameter trees a training loop hands it, one per update."""

    def __init__(self, momentum: float = MOMENTUM):
        self.momentum, self.average = momentum, None

    def observe(self, params) -> None:
        leaves = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(params)]
        if self.average is None:
            self.average = leaves
        else:
            m, pairs = self.momentum, zip(self.average, leaves, strict=True)
            self.average = [m * a + (1 - m) * w for a, w in pairs]

    def assert_matches(self, ema_params) -> None:
        ours = jax.tree.leaves(ema_params)
        assert len(ours) == len(self.average)
        for got, want in zip(ours, self.average, strict=True):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def assert_learned(losses: list[float]) -> None:
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


def test_flax_linen_train_state(data):
    x, y = data

    class MLP(linen.Module):
        @linen.compact
        def __call__(self, x):
            return linen.Dense(1)(linen.tanh(linen.Dense(16)(x)))

    model = MLP()
    params = model.init(jax.random.key(0), x)["params"]
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=params, tx=optimizer()
    )

    def loss_fn(params):
        return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)

    @jax.jit
    def step(state):
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    reference, losses = EMAReference(), []
    for _ in range(STEPS):
        state, loss = step(state)
        reference.observe(state.params)
        losses.append(float(loss))
    assert_learned(losses)
    assert int(adamax_optax.get_iterations(state)) == STEPS == int(state.step)
    ema = adamax_optax.finalize_variable_values(state.params, state)
    assert jax.tree.structure(ema) == jax.tree.structure(state.params)
    reference.assert_matches(ema)
    assert loss_fn(ema) < losses[0]


def test_flax_nnx_optimizer(data):
    x, y = data

    class MLP(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.hidden = nnx.Linear(4, 16, rngs=rngs)
            self.out = nnx.Linear(16, 1, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.hidden(x)))

    model = MLP(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optimizer(gradient_accumulation_steps=2), wrt=nnx.Param)

    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    reference, losses = EMAReference(), []
    for i in range(STEPS):
        losses.append(float(step(model, opt)))
        if i % 2 == 1:  # the EMA moves once per real update (a departure)
            reference.observe(nnx.state(model, nnx.Param))
    assert_learned(losses)
    assert int(adamax_optax.get_iterations(opt)) == STEPS // 2
    ema = adamax_optax.finalize_variable_values(nnx.state(model, nnx.Param), opt)
    reference.assert_matches(ema)
    nnx.update(model, ema)  # load the average into the model, as Keras does
    reference.assert_matches(nnx.state(model, nnx.Param))
    assert float(loss_fn(model)) < losses[0]


def test_equinox_filtered_training(data):
    x, y = data
    model = eqx.nn.MLP(
        4, 1, width_size=16, depth=1, activation=jnp.tanh, key=jax.random.key(0)
    )
    tx = optimizer()
    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))

    def loss_fn(model, x, y):
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    @eqx.filter_jit
    def step(model, opt_state):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = tx.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state, loss

    reference, losses = EMAReference(), []
    for _ in range(STEPS):
        model, opt_state, loss = step(model, opt_state)
        reference.observe(eqx.filter(model, eqx.is_inexact_array))
        losses.append(float(loss))
    assert_learned(losses)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    ema = adamax_optax.finalize_variable_values(params, opt_state)
    reference.assert_matches(ema)
    ema_model = eqx.combine(ema, static)
    assert float(loss_fn(ema_model, x, y)) < losses[0]


def test_optax_chain_with_transforms_before_and_after(data):
    """Clipping before; a frozen layer and the EMA after, which must come last."""
    x, y = data
    rng = np.random.default_rng(1)
    params = {
        "hidden": {
            "kernel": jnp.asarray(rng.normal(size=(4, 16)), jnp.float32) / 2,
            "bias": jnp.zeros(16),
        },
        "out": {
            "kernel": jnp.asarray(rng.normal(size=(16, 1)), jnp.float32) / 4,
            "bias": jnp.zeros(1),
        },
    }
    frozen = {
        "hidden": {"kernel": False, "bias": True},
        "out": {"kernel": False, "bias": False},
    }
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        adamax_optax.adamax(0.02, weight_decay=1e-3),
        optax.masked(optax.set_to_zero(), frozen),
        adamax_optax.parameter_ema(MOMENTUM),
    )

    def loss_fn(p):
        hidden = jnp.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
        return jnp.mean((hidden @ p["out"]["kernel"] + p["out"]["bias"] - y) ** 2)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    reference, losses, start = EMAReference(), [], params
    for _ in range(STEPS):
        params, opt_state, loss = step(params, opt_state)
        reference.observe(params)
        losses.append(float(loss))
    assert_learned(losses)
    np.testing.assert_array_equal(params["hidden"]["bias"], start["hidden"]["bias"])
    assert int(adamax_optax.get_iterations(opt_state)) == STEPS
    ema = adamax_optax.finalize_variable_values(params, opt_state)
    reference.assert_matches(ema)
    np.testing.assert_array_equal(ema["hidden"]["bias"], start["hidden"]["bias"])


def test_nnx_state_with_batch_statistics_gets_a_hint():
    """The EMA covers the parameters; a whole NNX state (BatchNorm statistics
    too) is refused with the filter to use, not a raw tree error."""
    from flax import nnx

    model = nnx.Sequential(
        nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.BatchNorm(4, rngs=nnx.Rngs(0))
    )
    optimizer = nnx.Optimizer(model, adamax_optax.adamax(use_ema=True), wrt=nnx.Param)
    with pytest.raises(ValueError, match=r"nnx.state\(model, nnx.Param\)"):
        adamax_optax.finalize_variable_values(nnx.state(model), optimizer)
    final = adamax_optax.finalize_variable_values(
        nnx.state(model, nnx.Param), optimizer
    )
    assert len(jax.tree.leaves(final)) == len(
        jax.tree.leaves(nnx.state(model, nnx.Param))
    )
