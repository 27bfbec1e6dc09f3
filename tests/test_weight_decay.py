"""Decoupled weight decay and its exclusions."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from adamax_optax import decoupled_weight_decay

PARAMS = {
    "params": {
        "Dense_0": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)},
        "LayerNorm_0": {"scale": jnp.full((2,), 2.0)},
    }
}


def decayed(exclude):
    tx = decoupled_weight_decay(0.5, exclude_from_weight_decay=exclude)
    zeros = {
        "params": {
            k: {n: jnp.zeros_like(v) for n, v in d.items()}
            for k, d in PARAMS["params"].items()
        }
    }
    updates, _ = tx.update(zeros, tx.init(PARAMS), PARAMS)
    return {
        f"{layer}/{name}": float(np.asarray(leaf).ravel()[0])
        for layer, leaves in updates["params"].items()
        for name, leaf in leaves.items()
    }


def test_no_exclusion_adds_rate_times_weight():
    assert decayed(None) == {
        "Dense_0/kernel": 1.0,
        "Dense_0/bias": 1.0,
        "LayerNorm_0/scale": 1.0,
    }


@pytest.mark.parametrize(
    ("exclude", "kept"),
    [
        (["bias"], {"Dense_0/kernel", "LayerNorm_0/scale"}),
        ("bias", {"Dense_0/kernel", "LayerNorm_0/scale"}),
        (["bias", "LayerNorm"], {"Dense_0/kernel"}),
        (["^params/Dense_0/kernel$"], {"Dense_0/bias", "LayerNorm_0/scale"}),
        ([], {"Dense_0/kernel", "Dense_0/bias", "LayerNorm_0/scale"}),
    ],
)
def test_patterns_are_searched_in_slash_joined_key_paths(exclude, kept):
    out = decayed(exclude)
    assert {k for k, v in out.items() if v == 1.0} == kept
    assert {k for k, v in out.items() if v == 0.0} == set(out) - kept


def test_mask_pytree_marks_excluded_leaves():
    mask = {
        "params": {
            "Dense_0": {"kernel": False, "bias": True},
            "LayerNorm_0": {"scale": True},
        }
    }
    out = decayed(mask)
    assert out == {"Dense_0/kernel": 1.0, "Dense_0/bias": 0.0, "LayerNorm_0/scale": 0.0}


def test_callable_builds_the_mask_from_params():
    def exclude_vectors(params):
        return {
            "params": {
                k: {n: v.ndim == 1 for n, v in d.items()}
                for k, d in params["params"].items()
            }
        }

    out = decayed(exclude_vectors)
    assert out == {"Dense_0/kernel": 1.0, "Dense_0/bias": 0.0, "LayerNorm_0/scale": 0.0}


def test_bf16_updates_stay_bf16():
    tx = decoupled_weight_decay(0.1)
    params = jnp.ones(3, jnp.bfloat16)
    updates, _ = tx.update(jnp.zeros(3, jnp.bfloat16), tx.init(params), params)
    assert updates.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(updates, np.float32), 0.1, rtol=1e-2)
