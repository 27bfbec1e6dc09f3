"""Complex parameters: ``|g|`` is the modulus, ``u`` is real, the rest complex.

Checked against the NumPy reference (complex128) and against the invariant that
a complex parameter whose imaginary parts stay zero moves exactly as the real
one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SHAPES, assert_parity, run_ours
from reference import ReferenceAdamax

from adamax_optax import adamax, finalize_variable_values, keras_clipvalue

OPTIONS = [
    dict(learning_rate=0.01),
    dict(
        learning_rate=0.01,
        global_clipnorm=1.0,
        weight_decay=0.05,
        use_ema=True,
        ema_momentum=0.9,
        ema_overwrite_frequency=3,
    ),
    dict(learning_rate=0.01, clipnorm=0.5, gradient_accumulation_steps=3),
    dict(learning_rate=0.01, loss_scale_factor=8.0),
]


def complex_problem(seed: int = 0, steps: int = 12):
    rng = np.random.default_rng(seed)

    def draw(shape, scale=1.0):
        real, imag = rng.normal(size=(2, *shape)) * scale
        return (real + 1j * imag).astype(np.complex64)

    params = {k: draw(s) for k, s in SHAPES.items()}
    grads = [{k: draw(s, 3.0) for k, s in SHAPES.items()} for _ in range(steps)]
    return params, grads


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o)[14:] or "lr")
def test_complex_matches_the_numpy_reference(options):
    params, grads = complex_problem()
    ours, state = run_ours(adamax(**options), params, grads)
    reference = ReferenceAdamax(params, **options)
    for g in grads:
        reference.step(g)
    assert_parity(ours, reference.params)
    assert all(leaf.dtype == jnp.complex64 for leaf in jax.tree.leaves(ours))
    if options.get("use_ema"):
        assert_parity(finalize_variable_values(ours, state), reference.ema)


def test_state_dtypes_of_a_complex_parameter():
    params = {"z": jnp.zeros(3, jnp.complex64)}
    state = adamax(use_ema=True, gradient_accumulation_steps=2).init(params)
    inner = state["accumulate"].inner_state
    assert state["accumulate"].accumulator["z"].dtype == jnp.complex64
    assert inner["adamax"].m["z"].dtype == jnp.complex64
    assert inner["adamax"].u["z"].dtype == jnp.float32  # a modulus: real
    assert inner["ema"].ema["z"].dtype == jnp.complex64
    with jax.enable_x64(True):  # state_dtype: the precision; the parameter: the kind
        wide = adamax(state_dtype=jnp.float64).init(params)
        assert wide["adamax"].m["z"].dtype == jnp.complex128
        assert wide["adamax"].u["z"].dtype == jnp.float64


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o)[14:] or "lr")
def test_zero_imaginary_parts_move_exactly_as_the_real_parameter(options):
    """Bit for bit, op by op. Under ``jit`` XLA may contract a multiply and an
    add into one fused multiply-add in one program and not in the other, which
    moves the last bit: there the two agree to float32 rounding."""
    rng = np.random.default_rng(1)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [
        {k: (3 * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}
        for _ in range(9)
    ]
    as_complex = lambda tree: {k: v.astype(np.complex64) for k, v in tree.items()}  # noqa: E731
    complex_grads = [as_complex(g) for g in grads]
    for jit in (False, True):
        real, _ = run_ours(adamax(**options), params, grads, jit=jit)
        cplx, _ = run_ours(
            adamax(**options), as_complex(params), complex_grads, jit=jit
        )
        for key in real:
            if jit:
                np.testing.assert_allclose(np.real(cplx[key]), real[key], rtol=1e-6)
            else:
                np.testing.assert_array_equal(np.real(cplx[key]), real[key])
            np.testing.assert_array_equal(np.imag(cplx[key]), 0.0)


def test_state_dtype_without_a_complex_counterpart_is_refused():
    with pytest.raises(TypeError, match=r"state_dtype=bfloat16.*complex64"):
        adamax(state_dtype=jnp.bfloat16).init({"z": jnp.zeros(2, jnp.complex64)})


def test_clipvalue_refuses_complex_updates_naming_the_leaf():
    tx = keras_clipvalue(1.0)
    grads = {"z": jnp.ones(2, jnp.complex64)}
    with pytest.raises(TypeError, match=r"`clipvalue`.*'z'.*complex64"):
        jax.jit(tx.update)(grads, tx.init(grads))
