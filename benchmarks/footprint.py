"""What one donated step holds in XLA's compiled program: its footprint.

The step is ``tx.update`` then ``optax.apply_updates`` under ``jax.jit``, the
parameters and the state donated (:func:`donated`). Its footprint is read from
the compiled program: XLA's peak memory (arguments + outputs - aliased +
temporaries), its temporaries, its copies of a leaf, and the bytes it accesses by
XLA's cost model. The bench's rows (``peak/(p+s+g)``, the in-place table of
``--targets``) and the in-place assertions of ``tests/test_runner.py`` all measure
with these functions, on the two leaves of :data:`SHAPES` for the in-place ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

SHAPES = {"w": (256, 1024), "b": (128, 1024)}
"""Two float32 leaves; the smaller, 512 KiB, is the unit of the in-place table."""
SMALLEST_LEAF_BYTES = 128 * 1024 * 4
GRADIENT_BYTES = (256 + 128) * 1024 * 4
LEAF_COPY = re.compile(r"= f32\[(256|128),1024\]\{[0-9,]*\} copy\(")
"""A copy of a whole leaf of :data:`SHAPES` in the compiled program's text."""


def donated(tx: optax.GradientTransformation) -> Callable[..., Any]:
    """``update`` then ``apply_updates``, params and state donated (any optax tx)."""

    def apply(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(apply, donate_argnums=(0, 1))


def donated_weighted(tx: optax.GradientTransformation) -> Callable[..., Any]:
    """:func:`donated` with a traced accumulation ``weight``: its ``grads``
    argument is ``(grads, weight)``."""

    def apply(params, state, grads_and_weight):
        grads, weight = grads_and_weight
        updates, state = tx.update(grads, state, params, weight=weight)
        return optax.apply_updates(params, updates), state

    return jax.jit(apply, donate_argnums=(0, 1))


def parameters() -> dict[str, jax.Array]:
    """The leaves of :data:`SHAPES`, float32 ones."""
    return {k: jnp.ones(shape) for k, shape in SHAPES.items()}


def compile_step(tx: optax.GradientTransformation) -> Any:
    """The compiled :func:`donated` step of ``tx`` over :func:`parameters`
    (the gradients shaped as the parameters)."""
    params = parameters()
    return donated(tx).lower(params, tx.init(params), params).compile()


def peak_bytes(compiled: Any) -> int | None:
    """XLA's peak: arguments + outputs - aliased + temporaries (None without
    a memory analysis)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
        + analysis.temp_size_in_bytes
    )


def temporary_bytes(compiled: Any) -> int:
    """The bytes of temporaries XLA's buffer assignment holds."""
    return compiled.memory_analysis().temp_size_in_bytes


def leaf_copies(compiled: Any) -> int:
    """How many copies of a leaf of :data:`SHAPES` the program makes."""
    return len(LEAF_COPY.findall(compiled.as_text()))


def gradients_accessed(compiled: Any) -> float:
    """Bytes the program accesses by XLA's cost model, in gradients of
    :data:`SHAPES`. The model counts every branch of a gate as if it ran."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["bytes accessed"]) / GRADIENT_BYTES


def in_place(compiled: Any) -> dict[str, Any]:
    """One cell of the in-place table: temporaries in units of the smallest
    leaf, leaf copies, and bytes accessed in gradients."""
    return dict(
        temporaries=temporary_bytes(compiled) / SMALLEST_LEAF_BYTES,
        copies=leaf_copies(compiled),
        bytes_accessed=gradients_accessed(compiled),
    )
