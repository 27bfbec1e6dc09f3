"""The gated runner: one in-place form for every composition, on every jax line.

A training step that calls ``tx.update`` and ``optax.apply_updates`` under
``jax.jit`` with the parameters and state donated (the Flax ``TrainState`` and
``nnx.Optimizer`` way) must update every buffer in place: XLA's buffer assignment
holds no copy of a leaf, and temporaries under the smallest leaf's bytes. Two
exceptions may hold one gradient's bytes: loss scaling without accumulation (its
division feeds several kernels on XLA:CPU) and a stateless optax block inside the
composition. ``skip_nonfinite`` under loss scaling holds no such buffer: the
loss scale's division is handed on to it and applied inside its gate.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    ACCUMULATE,
    EVERY_OPTION,
    injected_adamax,
    make_problem,
    run_donated,
)
from footprint import (
    GRADIENT_BYTES,
    SHAPES,
    SMALLEST_LEAF_BYTES,
    compile_step,
    gradients_accessed,
    leaf_copies,
    parameters,
    temporary_bytes,
)

import adamax_optax as ao
from adamax_optax import accumulate_gradients, adamax, dynamic_loss_scale
from adamax_optax._runner import phases_of

# The footprint is measured by the bench's own functions (benchmarks/footprint.py,
# over its two leaves of 256x1024 and 128x1024 float32), as its in-place table is.


def blocks(chain=ao.named_chain, stateless_optax=False):
    """The public blocks of ``adamax(clip, decay, EMA)``, composed by hand."""
    if chain is ao.named_chain:
        members = [
            ("clip", ao.keras_global_clipnorm(1.0)),
            ("adamax", ao.scale_by_keras_adamax()),
            ("decay", ao.decoupled_weight_decay(0.01)),
            ("learning_rate", ao.scale_by_keras_learning_rate(1e-3)),
            ("ema", ao.parameter_ema(0.99, 3)),
        ]
        if stateless_optax:
            members[0] = ("clip", optax.clip_by_global_norm(1.0))
            members.insert(3, ("scale", optax.scale(0.5)))
        return ao.named_chain(*members)
    members = [
        optax.clip_by_global_norm(1.0) if stateless_optax else ao.keras_clipnorm(1.0),
        ao.scale_by_keras_adamax(),
        optax.add_decayed_weights(0.01)
        if stateless_optax
        else ao.decoupled_weight_decay(0.01),
        ao.scale_by_keras_learning_rate(1e-3),
        ao.parameter_ema(0.99),
    ]
    return ao.chain(*members)


# name -> (factory of a transformation for a gating, temporaries allowed)
COMPOSITIONS = {
    "adamax(N=4)": (lambda g: adamax(**ACCUMULATE, gating=g), 0),
    "adamax(every option)": (lambda g: adamax(**EVERY_OPTION, gating=g), 0),
    "adamax(every option, loss_scale_factor)": (
        lambda g: adamax(loss_scale_factor=3.0, **EVERY_OPTION, gating=g),
        0,
    ),
    "adamax(every option, dynamic_loss_scale)": (
        lambda g: adamax(dynamic_loss_scale=True, **EVERY_OPTION, gating=g),
        0,
    ),
    "adamax(dynamic_loss_scale)": (
        lambda g: adamax(dynamic_loss_scale=True, gating=g),
        GRADIENT_BYTES,
    ),
    "adamax(clip, decay, EMA, loss_scale_factor)": (
        lambda g: adamax(
            weight_decay=0.01,
            global_clipnorm=1.0,
            use_ema=True,
            loss_scale_factor=3.0,
            gating=g,
        ),
        GRADIENT_BYTES,
    ),
    "chain(identity, adamax(N=4), scale)": (
        lambda g: optax.chain(
            optax.identity(), adamax(**ACCUMULATE, gating=g), optax.scale(0.5)
        ),
        0,
    ),
    "inject_hyperparams": (lambda g: injected_adamax(**ACCUMULATE, gating=g), 0),
    "accumulate(named_chain(blocks))": (
        lambda g: accumulate_gradients(blocks(), 4, gating=g),
        0,
    ),
    "accumulate(chain(blocks))": (
        lambda g: accumulate_gradients(blocks(ao.chain), 4, gating=g),
        0,
    ),
    "accumulate(named_chain(blocks, optax clip and scale))": (
        lambda g: accumulate_gradients(blocks(stateless_optax=True), 4, gating=g),
        GRADIENT_BYTES,
    ),
    "accumulate(chain(blocks, optax clip and decay))": (
        lambda g: accumulate_gradients(
            blocks(ao.chain, stateless_optax=True), 4, gating=g
        ),
        GRADIENT_BYTES,
    ),
    "dynamic_loss_scale(accumulate(named_chain(blocks)))": (
        lambda g: dynamic_loss_scale(accumulate_gradients(blocks(), 4), gating=g),
        0,
    ),
    "dynamic_loss_scale(named_chain(blocks))": (
        lambda g: dynamic_loss_scale(blocks(), gating=g),
        GRADIENT_BYTES,
    ),
    # 8-bit moments: in place as float moments are.
    "adamax(quantized_state)": (
        lambda g: adamax(quantized_state=True, gating=g),
        0,
    ),
    "adamax(N=4, quantized_state)": (
        lambda g: adamax(quantized_state=True, **ACCUMULATE, gating=g),
        0,
    ),
    "adamax(skip_nonfinite, quantized_state)": (
        lambda g: adamax(quantized_state=True, skip_nonfinite=True, gating=g),
        0,
    ),
    "adamax(skip_nonfinite)": (
        lambda g: adamax(skip_nonfinite=True, gating=g),
        0,
    ),
    "adamax(every option, skip_nonfinite)": (
        lambda g: adamax(skip_nonfinite=True, **EVERY_OPTION, gating=g),
        0,
    ),
    "adamax(every option, skip_nonfinite, skip_norm_above, dynamic_loss_scale)": (
        lambda g: adamax(
            skip_nonfinite=True,
            skip_norm_above=1e3,
            dynamic_loss_scale={"max_loss_scale": 2.0**20},
            **EVERY_OPTION,
            gating=g,
        ),
        0,
    ),
    "adamax(every option, skip_nonfinite, dynamic_loss_scale)": (
        lambda g: adamax(
            skip_nonfinite=True, dynamic_loss_scale=True, **EVERY_OPTION, gating=g
        ),
        0,
    ),
    "adamax(every option, skip_nonfinite, loss_scale_factor)": (
        lambda g: adamax(
            skip_nonfinite=True, loss_scale_factor=3.0, **EVERY_OPTION, gating=g
        ),
        0,
    ),
    "named_chain(unscale_gradients, skip_nonfinite(accumulate(blocks)))": (
        lambda g: ao.named_chain(
            ("unscale", ao.unscale_gradients(3.0)),
            (
                "skip",
                ao.skip_nonfinite(
                    accumulate_gradients(blocks(), 4), skip_norm_above=1e3, gating=g
                ),
            ),
        ),
        0,
    ),
    "skip_nonfinite(accumulate(named_chain(blocks)))": (
        lambda g: ao.skip_nonfinite(accumulate_gradients(blocks(), 4), gating=g),
        0,
    ),
    "skip_nonfinite(named_chain(blocks))": (
        lambda g: ao.skip_nonfinite(blocks(), gating=g),
        0,
    ),
}

# ``where`` advances the state on every call and selects; XLA:CPU keeps it in
# place only while one kernel can compute and select each leaf. Beside Adamax
# alone, the advanced state feeds other kernels (the EMA, the emitted update)
# and is materialised, old and new both alive: measured, 4 to 12 leaves of
# temporaries and up to 8 leaf copies. So it is checked where it holds.
WHERE_IN_PLACE = ("adamax(N=4)", "chain(identity, adamax(N=4), scale)")


def assert_in_place(compiled, allowed_temporary_bytes=0):
    # Scalars aside, an allowed exception may add one gradient's bytes.
    assert temporary_bytes(compiled) < SMALLEST_LEAF_BYTES + allowed_temporary_bytes
    assert leaf_copies(compiled) == 0


@pytest.mark.parametrize("gating", [None, "loop", "cond"])
@pytest.mark.parametrize("name", COMPOSITIONS)
def test_update_compiles_to_in_place_form(name, gating):
    make, allowed = COMPOSITIONS[name]
    assert_in_place(compile_step(make(gating)), allowed)


@pytest.mark.parametrize("gating", [None, "cond"])
def test_quantized_state_with_every_option_holds_two_gradients_at_most(gating):
    # The 8-bit advance runs in a conditional of its own, whose operand, the
    # clipped gradient, is then written out (one gradient's bytes), and whose
    # codes are copied out of the accumulation's conditional (2 bytes a
    # parameter): measured 2.37 MB here, 1.5 gradients.
    tx = adamax(
        quantized_state=True,
        skip_nonfinite=True,
        dynamic_loss_scale=True,
        **EVERY_OPTION,
        gating=gating,
    )
    assert_in_place(compile_step(tx), 2 * GRADIENT_BYTES)


@pytest.mark.parametrize("name", WHERE_IN_PLACE)
def test_where_gating_in_place_for_adamax_alone(name):
    make, allowed = COMPOSITIONS[name]
    assert_in_place(compile_step(make("where")), allowed)


def accessed(tx):
    """Bytes a donated step accesses by XLA's cost model, in gradients. The
    model counts every branch of a gate as if it ran."""
    return gradients_accessed(compile_step(tx))


@pytest.mark.parametrize(
    "options, skip_options, reads",
    [
        ({}, {}, 2),
        ({}, dict(skip_norm_above=1e3), 1),
        (EVERY_OPTION, {}, 2),
        (dict(loss_scale_factor=3.0, **EVERY_OPTION), {}, 2),
        (dict(dynamic_loss_scale=True, **EVERY_OPTION), {}, 1),
    ],
    ids=[
        "defaults",
        "skip_norm_above",
        "every option",
        "loss_scale_factor",
        "dynamic_loss_scale",
    ],
)
def test_skip_nonfinite_adds_one_read_besides_its_gated_exact_check(
    options, skip_options, reads
):
    """``skip_nonfinite`` adds the check's read of the gradient and the exact
    check behind its gate, which runs only when a sum is not finite (2); with
    a norm threshold, the norm's read alone (1); under dynamic loss scaling,
    whose check has read the gradient already, the gated exact check alone
    (1). No buffer of the unscaled gradient (a write and a read more)."""
    skipping = adamax(skip_nonfinite=True, **skip_options, **options)
    added = accessed(skipping) - accessed(adamax(**options))
    assert abs(added - reads) < 0.05


@pytest.mark.parametrize("gating", [None, "loop", "cond"])
@pytest.mark.parametrize(
    "make",
    [
        lambda g: adamax(skip_nonfinite=True, **EVERY_OPTION, gating=g),
        lambda g: accumulate_gradients(blocks(), 4, gating=g),
    ],
    ids=["adamax(every option, skip_nonfinite)", "accumulate(named_chain(blocks))"],
)
def test_weighted_flushed_step_compiles_to_in_place_form(make, gating):
    """``weight`` and ``flush``, traced, add scalars to the step, no copy."""
    tx = make(gating)

    def step(params, state, grads, weight, flush):
        updates, state = tx.update(grads, state, params, weight=weight, flush=flush)
        return optax.apply_updates(params, updates), state

    params = parameters()
    compiled = (
        jax.jit(step, donate_argnums=(0, 1))
        .lower(params, tx.init(params), params, jnp.float32(2.0), jnp.bool_(False))
        .compile()
    )
    assert_in_place(compiled)


def test_flax_train_state_step_compiles_to_in_place_form():
    from flax.training import train_state

    tx = adamax(**EVERY_OPTION)
    params = parameters()
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)

    def step(state, grads):
        return state.apply_gradients(grads=grads)

    assert_in_place(jax.jit(step, donate_argnums=0).lower(state, params).compile())


def test_nnx_optimizer_step_compiles_to_in_place_form():
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones(SHAPES["w"]))
            self.b = nnx.Param(jnp.ones(SHAPES["b"]))

    model = Model()
    optimizer = nnx.Optimizer(model, adamax(**EVERY_OPTION), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def step(state, grads):
        model, optimizer = nnx.merge(graphdef, state)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer))

    grads = nnx.state(model, nnx.Param)
    assert_in_place(jax.jit(step, donate_argnums=0).lower(state, grads).compile())


def assert_trees_close(got, want, rtol=2e-6, atol=1e-7):
    """Same structure, dtypes and values within float32 rounding."""
    chex.assert_trees_all_equal_dtypes(got, want)
    chex.assert_trees_all_close(got, want, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def small_problem():
    params, grads = make_problem(steps=12)
    grads[5] = {k: v * np.inf for k, v in grads[5].items()}  # a step to skip
    return {k: jnp.asarray(v) for k, v in params.items()}, grads


@pytest.mark.parametrize(
    "make",
    [
        lambda g: accumulate_gradients(blocks(stateless_optax=True), 3, gating=g),
        lambda g: dynamic_loss_scale(
            accumulate_gradients(blocks(ao.chain), 3), initial_scale=4.0, gating=g
        ),
        lambda g: adamax(0.01, dynamic_loss_scale=True, gating=g, **EVERY_OPTION),
    ],
    ids=["accumulate", "loss scale of accumulate", "adamax every option"],
)
def test_every_gating_computes_the_same(make, small_problem):
    params, grads = small_problem
    want = run_donated(make("cond"), params, grads)
    for gating in ("loop", "where"):
        assert_trees_close(run_donated(make(gating), params, grads), want)


def test_gatings_equal_optax_multisteps(small_problem):
    """A constant learning rate: the composition, each gating, is MultiSteps."""
    params, grads = small_problem
    grads = [g for g in grads if np.all(np.isfinite(g["out/kernel"]))]
    with jax.numpy_dtype_promotion("standard"):  # optax's own code
        members = phases_of(blocks(ao.chain)).members
        multi = optax.MultiSteps(optax.chain(*members), 3)
        want, _ = run_donated(multi.gradient_transformation(), params, grads)
        for gating in ("loop", "cond", "where"):
            got, _ = run_donated(
                accumulate_gradients(blocks(ao.chain), 3, gating=gating), params, grads
            )
            chex.assert_tree_all_finite(got)
            assert_trees_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("gating", "construct"),
    [("loop", "stablehlo.while"), ("cond", "stablehlo.case"), ("where", None)],
)
def test_each_gating_lowers_to_what_it_says(gating, construct):
    tx = adamax(**ACCUMULATE, dynamic_loss_scale=True, gating=gating)
    params = {"w": jnp.ones(3)}
    text = jax.jit(tx.update).lower(params, tx.init(params), params).as_text()
    found = {
        c for c in ("stablehlo.while", "stablehlo.case", "stablehlo.if") if c in text
    }
    assert found == ({construct} if construct else set())


def test_default_gating_is_cond():
    tx = adamax(**ACCUMULATE)
    params = {"w": jnp.ones(3)}
    text = jax.jit(tx.update).lower(params, tx.init(params), params).as_text()
    assert "stablehlo.case" in text and "stablehlo.while" not in text


def test_nested_wrappers_with_different_gatings_are_an_error():
    inner = accumulate_gradients(blocks(), 2, gating="loop")
    with pytest.raises(ValueError, match=r"different `gating` values.*cond.*loop"):
        dynamic_loss_scale(ao.named_chain(("inner", inner)), gating="cond")
    # One explicit value is taken by the wrappers around it.
    assert phases_of(dynamic_loss_scale(inner)).gating == "loop"
    assert phases_of(dynamic_loss_scale(inner, gating="loop")).gating == "loop"


@pytest.mark.parametrize("bad", ["while", "Cond", 1])
def test_unknown_gating_is_an_error(bad):
    for build in (
        lambda: adamax(gating=bad),
        lambda: accumulate_gradients(optax.sgd(0.1), 2, gating=bad),
        lambda: dynamic_loss_scale(optax.sgd(0.1), gating=bad),
    ):
        with pytest.raises(ValueError, match=f"gating={bad!r}"):
            build()


def test_composition_follows_adamax_schedule_included():
    """Composed by hand under accumulation, the blocks compute what adamax()
    computes: the schedule is evaluated at the micro-step index k*N + N - 1
    without being told N."""
    params, grads = make_problem(steps=40)
    params = {k: jnp.asarray(v) for k, v in params.items()}
    schedule = optax.linear_schedule(0.01, 0.0, 40)
    with jax.numpy_dtype_promotion("standard"):
        want, want_state = run_donated(
            adamax(schedule, gradient_accumulation_steps=4, weight_decay=0.01),
            params,
            grads,
        )
        composed = accumulate_gradients(
            ao.named_chain(
                ("adamax", ao.scale_by_keras_adamax()),
                ("weight_decay", ao.decoupled_weight_decay(0.01)),
                ("learning_rate", ao.scale_by_keras_learning_rate(schedule)),
            ),
            4,
        )
        got, got_state = run_donated(composed, params, grads)
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
    assert float(ao.get_learning_rate(got_state)) == pytest.approx(
        float(ao.get_learning_rate(want_state))
    )


def test_learning_rate_told_another_count_is_an_error():
    inner = ao.named_chain(
        ("adamax", ao.scale_by_keras_adamax()),
        ("learning_rate", ao.scale_by_keras_learning_rate(0.1, steps_per_update=2)),
    )
    tx = accumulate_gradients(inner, 4)
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"steps_per_update=2.*4 steps"):
        tx.update(params, tx.init(params), params)


def test_how_a_transformation_emits_survives_replace_equality_and_flattening():
    """Equinox and others flatten a transformation, users ``_replace`` a field:
    how it emits after a gate is its update function, so both keep it."""
    scaled_skip = ao.chain(
        ao.unscale_gradients(2.0), ao.skip_nonfinite(ao.scale_by_keras_adamax())
    )
    for tx in (
        ao.scale_by_keras_adamax(),
        adamax(**EVERY_OPTION),
        ao.unscale_gradients(2.0),
        scaled_skip,
    ):
        leaves, treedef = jax.tree.flatten(tx)
        again = jax.tree.unflatten(treedef, leaves)
        replaced = tx._replace(init=tx.init)
        assert again == tx and replaced == tx
        assert phases_of(again) is phases_of(tx) is phases_of(replaced) is not None
        if tx is scaled_skip:  # still takes a pending leaf map
            assert phases_of(again).update_mapped is not None
        params = {"w": jnp.ones(3)}
        state = again.init(params)
        np.testing.assert_array_equal(
            again.update(params, state, params)[0]["w"],
            tx.update(params, state, params)[0]["w"],
        )
    # Another update function is another transformation, with no phases.
    other = ao.scale_by_keras_adamax()._replace(update=optax.identity().update)
    assert phases_of(other) is None and other != ao.scale_by_keras_adamax()


def test_gating_is_kept_by_configs():
    tx = adamax(gradient_accumulation_steps=2, gating="loop")
    config = ao.get_config(tx)
    assert config["gating"] == "loop"
    again = ao.from_config(config)
    params = {"w": jnp.ones(3)}
    text = jax.jit(again.update).lower(params, again.init(params), params).as_text()
    assert "stablehlo.while" in text
