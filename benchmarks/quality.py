"""What 8-bit state costs in training quality: float32, bfloat16 and quantized
state, trained from the same weights on the same batches, three seeds.

* ``digits``: the demo's Flax MLP (64-128-128-10) on scikit-learn's digits,
  30 epochs of batches of 64, ``adamax`` with a cosine schedule from 0.01;
  final training loss (mean of the last epoch) and test accuracy.
* ``mlp``: the benchmarks' 1000-leaf MLP (500 tanh layers of width 64) fitting
  its own input, 300 steps at 1e-3 (each seed draws its own batch); final loss.

Two controls. How far a final loss moves when nothing but the starting weights
changes, each weight multiplied by ``1 + 1e-6 n`` (``n`` standard normal; a
weight that starts at zero, a bias, stays zero), ``--perturbed K`` such starts
a seed and a state besides the unperturbed one (default 4: five runs of each,
about 9 minutes on 2 CPU cores). And how far it moves under a small
perturbation of every step: float32 state whose gradients are each
multiplied by ``1 + 0.01 n`` (a new ``n`` every element and step, from a key
of the seed and the start), a hundredth of each gradient, where the 8-bit
codes round ``u`` by up to 6% and ``m / u`` by up to 1/127. A gap between
two states is only evidence where it is larger than each state's distance
from itself and than the noisy gradients' distance from float32 state.

Run ``python benchmarks/quality.py [--plot PATH] [--perturbed K]``; it prints
the tables and writes ``bench_results_quality.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

import models  # noqa: E402

from adamax_optax import adamax  # noqa: E402

STATES: dict[str, dict[str, Any]] = {
    "float32 state": dict(state_dtype=jnp.float32),
    "bfloat16 state": dict(state_dtype=jnp.bfloat16),
    "quantized state": dict(quantized_state=True),
}
NOISY = "float32, 1% noise"
"""The control: float32 state with each gradient times ``1 + 0.01 n``."""
GRADIENT_NOISE = 0.01
SEEDS = (0, 1, 2)
NAMES = (*STATES, NOISY)
PERTURBATION = 1e-6
"""The relative size of a perturbed start's change to the initial weights."""


def perturbed(params: Any, seed: int, start: int) -> Any:
    """``params``, each weight times ``1 + PERTURBATION * n`` with ``n`` a
    standard normal draw of ``(seed, start)``; start 0 is ``params`` itself."""
    if start == 0:
        return params
    rng = np.random.default_rng((seed, start))
    return jax.tree.map(
        lambda w: (
            w * (1 + PERTURBATION * jnp.asarray(rng.normal(size=w.shape), w.dtype))
        ),
        params,
    )


def gradient_noise(relative: float, seed: int) -> optax.GradientTransformation:
    """Each gradient element times ``1 + relative * n``, ``n`` standard
    normal, new for every element and step (a key in the state)."""

    def init(params: Any) -> jax.Array:
        del params
        return jax.random.key(seed)

    def update(updates: Any, key: jax.Array, params: Any = None) -> tuple[Any, Any]:
        del params
        key, draw = jax.random.split(key)
        leaves, tree = jax.tree.flatten(updates)
        # One draw for every leaf, cut into theirs: a draw per leaf compiles
        # for minutes on the 1000-leaf MLP.
        sizes = [g.size for g in leaves]
        n = jax.random.normal(draw, (sum(sizes),), jnp.float32)
        cuts = np.cumsum(sizes)[:-1].tolist()
        noisy = [
            (g.astype(jnp.float32) * (1 + relative * part.reshape(g.shape))).astype(
                g.dtype
            )
            for g, part in zip(leaves, jnp.split(n, cuts), strict=True)
        ]
        return jax.tree.unflatten(tree, noisy), key

    return optax.GradientTransformation(init, update)


def optimizer(
    name: str, learning_rate: Any, seed: int, start: int
) -> optax.GradientTransformation:
    """The run's optimizer: ``adamax`` in the state ``name``, or the control."""
    if name == NOISY:
        noise = gradient_noise(GRADIENT_NOISE, 1000 * seed + start)
        return optax.chain(noise, adamax(learning_rate))
    return adamax(learning_rate, **STATES[name])


def train(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    tx: optax.GradientTransformation,
    batches: list[tuple[Any, ...]],
    step_cache: dict[str, Any],
    key: str,
) -> tuple[Any, list[float]]:
    """``params`` after one step per batch, and each step's loss."""
    if key not in step_cache:

        def step(params, state, *batch):
            loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        step_cache[key] = jax.jit(step, donate_argnums=(0, 1))
    step = step_cache[key]
    state = tx.init(params)
    params = jax.tree.map(jnp.copy, params)
    losses = []
    for batch in batches:
        params, state, loss = step(params, state, *batch)
        losses.append(loss)
    return params, [float(x) for x in losses]


def digits_runs(starts: int = 1) -> list[dict[str, Any]]:
    from train_digits import Digits, build_mlp, loss_of, make_evaluate

    model = build_mlp()
    loss_fn, evaluate = loss_of(model), make_evaluate(model)
    epochs, batch_size = 30, 64
    rows, cache = [], {}
    for seed in SEEDS:
        data = Digits.load(seed)
        rng = np.random.default_rng(seed)
        batches = [
            (jnp.asarray(x), jnp.asarray(y))
            for _ in range(epochs)
            for x, y in data.batches(batch_size, rng)
        ]
        per_epoch = len(batches) // epochs
        init = model.init(jax.random.key(seed), jnp.zeros((1, 64)))["params"]
        schedule = optax.cosine_decay_schedule(0.01, len(batches))
        for start, name in itertools.product(range(starts), NAMES):
            tx = optimizer(name, schedule, seed, start)
            first = perturbed(init, seed, start)
            params, losses = train(loss_fn, first, tx, batches, cache, name)
            _, accuracy = evaluate(params, data.x_test, data.y_test)
            epoch_losses = [
                float(np.mean(losses[i : i + per_epoch]))
                for i in range(0, len(losses), per_epoch)
            ]
            rows.append(
                dict(
                    task="digits",
                    state=name,
                    seed=seed,
                    start=start,
                    final_loss=epoch_losses[-1],
                    test_accuracy=float(accuracy),
                    curve=epoch_losses,
                )
            )
    return rows


def mlp_runs(steps: int = 300, starts: int = 1) -> list[dict[str, Any]]:
    params, _, loss_fn = models.mlp()
    rows, cache = [], {}
    for seed in SEEDS:
        x = jnp.asarray(
            np.random.default_rng(100 + seed).normal(size=(32, 64)), jnp.float32
        )
        batches = [(x,)] * steps
        for start, name in itertools.product(range(starts), NAMES):
            tx = optimizer(name, 1e-3, seed, start)
            first = perturbed(params, seed, start)
            _, losses = train(loss_fn, first, tx, batches, cache, name)
            rows.append(
                dict(
                    task="mlp",
                    state=name,
                    seed=seed,
                    start=start,
                    final_loss=losses[-1],
                    test_accuracy=None,
                    curve=losses[:: max(1, steps // 60)],
                )
            )
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task and state: mean final loss and accuracy, and their gaps to
    float32 state (loss: relative, accuracy: in points), seed by seed; one
    run of each (the unperturbed starts)."""
    out = []
    for task in sorted({r["task"] for r in rows}):
        reference = {
            r["seed"]: r
            for r in rows
            if r["task"] == task and r["state"] == "float32 state"
        }
        for name in NAMES:
            mine = [r for r in rows if r["task"] == task and r["state"] == name]
            if not mine:
                continue
            loss_gaps = [
                r["final_loss"] / reference[r["seed"]]["final_loss"] - 1 for r in mine
            ]
            entry = dict(
                task=task,
                state=name,
                final_loss=float(np.mean([r["final_loss"] for r in mine])),
                worst_loss_gap=float(max(loss_gaps, key=abs)),
            )
            if mine[0]["test_accuracy"] is not None:
                gaps = [
                    100 * (r["test_accuracy"] - reference[r["seed"]]["test_accuracy"])
                    for r in mine
                ]
                entry["test_accuracy"] = float(
                    np.mean([r["test_accuracy"] for r in mine])
                )
                entry["worst_accuracy_gap_points"] = float(min(gaps))
            out.append(entry)
    return out


def spread(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task, seed and state, over its starts: the final losses' median
    and range, and how far a perturbed start ends from the unperturbed one
    (the largest relative distance, ``self_gap``), against the gap of the
    unperturbed run to float32 state's (``gap_to_float32``)."""
    out = []
    for task, seed in sorted({(r["task"], r["seed"]) for r in rows}):
        runs = {
            name: {
                r["start"]: r["final_loss"]
                for r in rows
                if (r["task"], r["seed"], r["state"]) == (task, seed, name)
            }
            for name in NAMES
        }
        runs = {name: losses for name, losses in runs.items() if losses}
        reference = runs["float32 state"][0]
        for name, losses in runs.items():
            values = list(losses.values())
            out.append(
                dict(
                    task=task,
                    seed=seed,
                    state=name,
                    starts=len(values),
                    median=float(np.median(values)),
                    low=float(min(values)),
                    high=float(max(values)),
                    self_gap=float(max((v / losses[0] - 1 for v in values), key=abs)),
                    gap_to_float32=float(losses[0] / reference - 1),
                )
            )
    return out


def print_rows(rows: list[dict[str, Any]], summaries: list[dict[str, Any]]) -> None:
    print(f"{'task':7} {'state':18} {'seed':>4} {'final loss':>11} {'test acc':>9}")
    for r in rows:
        accuracy = (
            "" if r["test_accuracy"] is None else f"{100 * r['test_accuracy']:8.2f}%"
        )
        print(
            f"{r['task']:7} {r['state']:18} {r['seed']:4d} "
            f"{r['final_loss']:11.5f} {accuracy:>9}"
        )
    print()
    print(
        f"{'task':7} {'state':18} {'mean loss':>10} "
        f"{'worst loss gap':>15} {'worst acc gap':>14}"
    )
    for s in summaries:
        gap = s.get("worst_accuracy_gap_points")
        shown = "" if gap is None else f"{gap:+.2f} pt"
        print(
            f"{s['task']:7} {s['state']:18} {s['final_loss']:10.5f} "
            f"{100 * s['worst_loss_gap']:+14.2f}% {shown:>14}"
        )


def print_spread(spreads: list[dict[str, Any]]) -> None:
    print(
        f"{'task':7} {'seed':>4} {'state':18} {'starts':>6} {'median loss':>12} "
        f"{'range':>19} {'self gap':>9} {'gap to float32':>15}"
    )
    for s in spreads:
        print(
            f"{s['task']:7} {s['seed']:4d} {s['state']:18} {s['starts']:6d} "
            f"{s['median']:12.5f} {s['low']:9.5f}-{s['high']:.5f} "
            f"{100 * s['self_gap']:+8.2f}% {100 * s['gap_to_float32']:+14.2f}%"
        )


def plot(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6))
    colours = dict(
        zip(NAMES, ("black", "tab:blue", "tab:orange", "tab:gray"), strict=True)
    )
    for axis, task in zip(np.atleast_1d(axes), tasks, strict=True):
        for r in rows:
            if r["task"] == task:
                label = r["state"] if r["seed"] == 0 else None
                axis.plot(
                    r["curve"], color=colours[r["state"]], lw=1, alpha=0.8, label=label
                )
        axis.set_yscale("log")
        axis.set_title(f"{task}: training loss, 3 seeds")
        axis.set_xlabel("epoch" if task == "digits" else "step / 5")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", type=pathlib.Path, default=None)
    parser.add_argument(
        "--json", type=pathlib.Path, default=pathlib.Path("bench_results_quality.json")
    )
    parser.add_argument("--mlp-steps", type=int, default=300)
    parser.add_argument(
        "--perturbed",
        type=int,
        default=4,
        help="perturbed starts a seed and a state, besides the unperturbed one",
    )
    args = parser.parse_args(argv)
    starts = 1 + args.perturbed
    rows = digits_runs(starts) + mlp_runs(args.mlp_steps, starts)
    unperturbed = [r for r in rows if r["start"] == 0]
    summaries, spreads = summary(unperturbed), spread(rows)
    print_rows(unperturbed, summaries)
    print()
    print_spread(spreads)
    args.json.write_text(
        json.dumps(
            dict(
                jax=jax.__version__,
                perturbation=PERTURBATION,
                runs=rows,
                summary=summaries,
                spread=spreads,
            ),
            indent=1,
        )
    )
    if args.plot is not None:
        plot(unperturbed, args.plot)
    return rows


if __name__ == "__main__":
    main()
