"""Whole training steps of three models: compile time and step time.

Each step is ``value_and_grad`` of the model's loss, the optimizer's ``update`` and
``optax.apply_updates``, jitted with the parameters and the optimizer state donated
(the form of a Flax ``TrainState`` step). Ours against the optax equivalents:

* ``adamax()`` against ``optax.adamax``;
* ``adamax(global_clipnorm, weight_decay, use_ema)`` against the chain
  ``clip_by_global_norm``, ``scale_by_adamax``, ``add_decayed_weights``,
  ``scale`` with a parameter EMA kept beside it;
* both with ``gradient_accumulation_steps=4`` against ``optax.MultiSteps`` of the
  chain.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from models import MODELS
from peers import FULL_OPTIONS, optax_chain, with_ema

from adamax_optax import adamax

OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "sgd (the model's own step)": lambda: optax.sgd(0.01),
    "optax.adamax": lambda: optax.adamax(1e-3),
    "adamax_optax defaults": lambda: adamax(),
    "optax chain clip+decay+EMA": lambda: with_ema(optax_chain()),
    "adamax_optax clip+decay+EMA": lambda: adamax(**FULL_OPTIONS),
    "optax.MultiSteps(chain), N=4": lambda: with_ema(
        optax.MultiSteps(optax_chain(), 4).gradient_transformation()
    ),
    "adamax_optax clip+decay+EMA, N=4": lambda: adamax(
        **FULL_OPTIONS, gradient_accumulation_steps=4
    ),
}
PEERS = {
    "adamax_optax defaults": "optax.adamax",
    "adamax_optax clip+decay+EMA": "optax chain clip+decay+EMA",
    "adamax_optax clip+decay+EMA, N=4": "optax.MultiSteps(chain), N=4",
}


def train_step(tx: optax.GradientTransformation, loss_fn: Callable[..., Any]):
    def step(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def run_model(name: str, repeats: int) -> list[dict[str, Any]]:
    """Compile and time every optimizer on one model."""
    params, batch, loss_fn = MODELS[name]()
    leaves = len(jax.tree.leaves(params))
    size = sum(x.size for x in jax.tree.leaves(params))
    rows = []
    for label, make in OPTIMIZERS.items():
        tx = make()
        fresh = jax.tree.map(jnp.array, params)
        state = tx.init(fresh)
        start = time.perf_counter()
        compiled = train_step(tx, loss_fn).lower(fresh, state, batch).compile()
        compile_s = time.perf_counter() - start
        ops = sum(1 for line in compiled.as_text().splitlines() if " = " in line)
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            fresh, state, loss = compiled(fresh, state, batch)
            jax.block_until_ready((fresh, state, loss))
            times.append(time.perf_counter() - start)
        rows.append(
            dict(
                model=name,
                leaves=leaves,
                parameters=int(size),
                case=label,
                compile_s=compile_s,
                hlo_ops=ops,
                step_ms=float(np.median(times[1:])) * 1e3,
            )
        )
        del fresh, state, compiled
    by_case = {row["case"]: row for row in rows}
    for row in rows:
        peer = PEERS.get(row["case"])
        if peer in by_case:
            row["peer"] = peer
            row["compile_over_peer"] = row["compile_s"] / by_case[peer]["compile_s"]
            row["step_over_peer"] = row["step_ms"] / by_case[peer]["step_ms"]
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'model':7s} {'case':34s} {'compile s':>9s} {'x peer':>7s} "
        f"{'HLO ops':>8s} {'step ms':>9s} {'x peer':>7s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        cpeer = f"{r['compile_over_peer']:.2f}" if "compile_over_peer" in r else ""
        speer = f"{r['step_over_peer']:.2f}" if "step_over_peer" in r else ""
        print(
            f"{r['model']:7s} {r['case']:34s} {r['compile_s']:9.1f} {cpeer:>7s} "
            f"{r['hlo_ops']:8d} {r['step_ms']:9.1f} {speer:>7s}"
        )
