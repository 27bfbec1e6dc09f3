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

import argparse
import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from harness import cpu_description
from models import MODELS
from peers import FULL_OPTIONS, optax_chain, with_ema

from adamax_optax import adamax

ACCUMULATION_STEPS = 4
"""``N`` of the accumulating rows; a round times whole groups of ``N`` calls."""

OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "sgd (the model's own step)": lambda: optax.sgd(0.01),
    "optax.adamax": lambda: optax.adamax(1e-3),
    "adamax_optax defaults": lambda: adamax(),
    "optax chain clip+decay+EMA": lambda: with_ema(optax_chain()),
    "adamax_optax clip+decay+EMA": lambda: adamax(**FULL_OPTIONS),
    "optax.MultiSteps(chain), N=4": lambda: with_ema(
        optax.MultiSteps(optax_chain(), ACCUMULATION_STEPS).gradient_transformation()
    ),
    "adamax_optax clip+decay+EMA, N=4": lambda: adamax(
        **FULL_OPTIONS, gradient_accumulation_steps=ACCUMULATION_STEPS
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


def run_model(
    name: str, rounds: int = 5, steps: int = 4, compile_rounds: int = 3
) -> list[dict[str, Any]]:
    """Compile and time every optimizer on one model, interleaved.

    Each round compiles (or runs) every optimizer once, in turn, so that a slow
    spell of the machine falls on all of them; a row gives the median over the
    rounds and, for its ratios to the model's own SGD step and to its optax
    peer, the median and the range of the ratios taken within each round.

    A round's time is the mean of ``steps`` consecutive calls, a whole number of
    accumulation groups (:data:`ACCUMULATION_STEPS` calls each): under
    accumulation most calls are micro-steps, so the median of single calls
    would time a micro-step alone.
    """
    if steps % ACCUMULATION_STEPS:
        raise ValueError(
            f"`steps` must be a multiple of {ACCUMULATION_STEPS} (whole "
            f"accumulation groups). Received: steps={steps}"
        )
    params, batch, loss_fn = MODELS[name]()
    leaves = len(jax.tree.leaves(params))
    size = sum(x.size for x in jax.tree.leaves(params))
    optimizers = {label: make() for label, make in OPTIMIZERS.items()}
    compile_s: dict[str, list[float]] = {label: [] for label in optimizers}
    compiled: dict[str, Any] = {}
    for _ in range(compile_rounds):
        for label, tx in optimizers.items():
            state = jax.eval_shape(tx.init, params)
            start = time.perf_counter()
            compiled[label] = (
                train_step(tx, loss_fn).lower(params, state, batch).compile()
            )
            compile_s[label].append(time.perf_counter() - start)
    step_ms: dict[str, list[float]] = {label: [] for label in optimizers}
    for _ in range(rounds):
        for label, tx in optimizers.items():
            fresh = jax.tree.map(jnp.array, params)
            state = tx.init(fresh)
            for _ in range(ACCUMULATION_STEPS):  # warm-up: one whole group
                fresh, state, loss = compiled[label](fresh, state, batch)
            jax.block_until_ready((fresh, state, loss))
            start = time.perf_counter()
            for _ in range(steps):
                fresh, state, loss = compiled[label](fresh, state, batch)
            jax.block_until_ready((fresh, state, loss))
            step_ms[label].append((time.perf_counter() - start) / steps * 1e3)
            del fresh, state, loss
    sgd = next(iter(OPTIMIZERS))
    rows = []
    for label, exe in compiled.items():
        row = dict(
            model=name,
            leaves=leaves,
            parameters=int(size),
            case=label,
            command=f"python benchmarks/train_steps.py {name}",
            compile_s=float(np.median(compile_s[label])),
            hlo_ops=sum(1 for line in exe.as_text().splitlines() if " = " in line),
            step_ms=float(np.median(step_ms[label])),
            step_over_sgd=_ratio(step_ms[label], step_ms[sgd]),
            compile_added_over_sgd=_ratio(
                np.subtract(compile_s[label], compile_s[sgd]), compile_s[sgd]
            ),
        )
        peer = PEERS.get(label)
        if peer is not None:
            row["peer"] = peer
            row["step_over_peer"] = _ratio(step_ms[label], step_ms[peer])
            row["compile_over_peer"] = _ratio(compile_s[label], compile_s[peer])
        rows.append(row)
    return rows


def _ratio(values: Any, references: Any) -> dict[str, float]:
    """The ratios of paired measurements (one pair a round): median and range."""
    ratios = np.asarray(values, float) / np.asarray(references, float)
    return dict(
        median=float(np.median(ratios)),
        low=float(np.min(ratios)),
        high=float(np.max(ratios)),
    )


def _show(ratio: dict[str, float] | None) -> str:
    if ratio is None:
        return ""
    return f"{ratio['median']:.2f} [{ratio['low']:.2f}, {ratio['high']:.2f}]"


def print_rows(rows: list[dict[str, Any]]) -> None:
    """The table: medians over the rounds; ratios as median [low, high]."""
    header = (
        f"{'model':6s} {'case':33s} {'step ms':>8s} {'x sgd':>18s} {'x peer':>18s} "
        f"{'compile s':>9s} {'added x sgd':>18s} {'x peer':>18s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:6s} {r['case']:33s} {r['step_ms']:8.1f} "
            f"{_show(r['step_over_sgd']):>18s} {_show(r.get('step_over_peer')):>18s} "
            f"{r['compile_s']:9.1f} {_show(r['compile_added_over_sgd']):>18s} "
            f"{_show(r.get('compile_over_peer')):>18s}"
        )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/train_steps.py",
        description="Whole training steps of the benchmark models: step and "
        "compile time of each optimizer, as ratios to the model's own SGD step "
        "and to the optax peer, interleaved rounds in one process.",
    )
    parser.add_argument("models", nargs="+", choices=sorted(MODELS))
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds")
    parser.add_argument(
        "--steps",
        type=int,
        default=ACCUMULATION_STEPS,
        help=f"calls timed a round (a multiple of {ACCUMULATION_STEPS})",
    )
    parser.add_argument("--compile-rounds", type=int, default=3)
    parser.add_argument("--json", default="train_steps.json")
    args = parser.parse_args(argv)
    cpu = cpu_description()
    print(
        f"jax {jax.__version__}, optax {optax.__version__}, {jax.devices()[0]}, {cpu}"
    )
    rows = []
    for name in args.models:
        rows += run_model(name, args.rounds, args.steps, args.compile_rounds)
        print_rows([row for row in rows if row["model"] == name])
    result = dict(
        jax=jax.__version__,
        device=str(jax.devices()[0]),
        cpu=cpu,
        rows=rows,
    )
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
