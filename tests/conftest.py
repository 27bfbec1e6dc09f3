"""Test-wide settings: Keras on JAX, strict promotion, shared helpers."""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import settings

from adamax_optax import adamax

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The benchmarks and the examples are scripts beside the package, run from a
# clone; their tests import them as modules.
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

# As in equinox: any silent upcast of a bf16 state or mixed-rank broadcast fails.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config: pytest.Config) -> None:
    """One persistent XLA compilation cache for the run, shared by the xdist
    workers and the scripts that tests start (they inherit the environment):
    many tests compile the same step, the same options over the same shapes,
    and each compiles once. It lives in a fresh directory, removed at the end
    (or in ``JAX_COMPILATION_CACHE_DIR``, where that is set, left in place)."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        directory = tempfile.mkdtemp(prefix="adamax-optax-xla-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
        config.add_cleanup(lambda: shutil.rmtree(directory, ignore_errors=True))
    # Every computation, however quick to compile or small.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
    jax.config.update(
        "jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"]
    )
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs",
        float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
    )
    jax.config.update(
        "jax_persistent_cache_min_entry_size_bytes",
        int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]),
    )


# The modules whose tests run for tens of seconds (scripts in fresh processes:
# the demo, 8-device meshes, two processes) start first, so that neither xdist
# worker is left running one at the end while the other waits.
LONG_FIRST = (
    "test_sharding.py",
    "test_readme.py",
    "test_demo.py",
    "test_multiprocess.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in LONG_FIRST)  # stable


settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

SHAPES = {"dense/kernel": (4, 3), "dense/bias": (3,), "out/kernel": (3, 2)}


def tolerance(reference: np.ndarray) -> float:
    """The parity tolerance: ``1e-6 * (1 + max|w_ref|)``."""
    return 1e-6 * (1.0 + float(np.max(np.abs(reference))))


def assert_parity(ours: dict, reference: dict) -> None:
    """Every leaf within the parity tolerance of the reference."""
    assert ours.keys() == reference.keys()
    for key in reference:
        wide = np.complex128 if np.iscomplexobj(reference[key]) else np.float64
        ref = np.asarray(reference[key]).astype(wide)
        got = np.asarray(ours[key]).astype(wide)
        assert got.shape == ref.shape, key
        error = float(np.max(np.abs(got - ref)))
        assert error <= tolerance(ref), f"{key}: max error {error:.3g}"


def make_problem(
    seed: int = 0, steps: int = 50, scale: float = 3.0, shapes: dict | None = None
):
    """Initial params and a sequence of random gradients over ``shapes``
    (default ``SHAPES``)."""
    shapes = SHAPES if shapes is None else shapes
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [
        {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}
        for _ in range(steps)
    ]
    return params, grads


ACCUMULATE = dict(gradient_accumulation_steps=4)
EVERY_OPTION = dict(
    gradient_accumulation_steps=4,
    weight_decay=0.01,
    global_clipnorm=1.0,
    use_ema=True,
    ema_overwrite_frequency=3,
)
"""Every option that shapes a gated step: accumulation, clipping, decay, EMA."""


def injected_adamax(**options):
    """``adamax`` under ``optax.inject_hyperparams``, its integers static."""
    return optax.inject_hyperparams(
        adamax, static_args=("gradient_accumulation_steps", "gating")
    )(learning_rate=1e-3, **options)


def donated_step(tx: optax.GradientTransformation):
    """``tx.update`` then ``optax.apply_updates`` under ``jax.jit``, the
    parameters and the state donated: the training step users write."""

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def run_donated(tx: optax.GradientTransformation, params: Any, grads: list):
    """Feeds ``grads`` through :func:`donated_step`; returns the final
    parameters and state (``params`` itself is left intact)."""
    step = donated_step(tx)
    params = jax.tree.map(jnp.array, params)
    state = tx.init(params)
    for g in grads:
        params, state = step(params, state, g)
    return params, state


def run_ours(
    tx: optax.GradientTransformation, params: Any, grads: list, jit=True, state=None
):
    """Feeds ``grads`` to ``tx`` from ``state`` (``tx.init(params)`` if not
    given); returns the final params and state."""
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params) if state is None else state
    update = jax.jit(tx.update) if jit else tx.update
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.fixture
def problem():
    return make_problem()
