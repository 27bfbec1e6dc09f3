"""The main job: a Flax MLP trained on scikit-learn's digits (shipped, no download).

``python examples/train_digits.py`` trains the same network from the same initial
weights on the same batches three times, with the same Keras options:

* ``adamax_optax``: :func:`adamax_optax.adamax`, in a jit-compiled Flax
  ``TrainState`` step;
* ``Keras``: Keras 3's ``keras.optimizers.Adamax`` (JAX backend), driven through
  its ``stateless_apply`` on the same parameter arrays: the reference;
* ``optax``: the nearest optax setup, ``optax.MultiSteps`` of
  ``optax.chain(optax.clip_by_global_norm, optax.adamaxw(...))`` with the
  parameter EMA kept beside it by ``optax.incremental_update`` (optax has none).

Beside them, Keras and the optax setup run once more, each with its own state and
weights but fed adamax_optax's gradients at every step: that is where the parity
shows, Keras within ``2e-7 * (1 + max|w|)`` of adamax_optax after the first epoch
(the tests' tolerance is ``1e-6 * (1 + max|w|)`` after 50 updates), the optax setup
about 1e-2 away. The two round each update differently in its last bit, and over
the whole run those differences add up as a random walk does (about 1e-6 after 660
updates). The free runs drift apart further, as float32 runs on their own
gradients do. It prints a short table per
epoch (mean training loss, test accuracy, the largest parameter differences) and
draws the curves. Its dependencies (Flax, Keras,
scikit-learn, tqdm, matplotlib) are the ``demo`` extra.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import os
import pathlib
import re
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamax_optax import adamax, finalize_variable_values

FEATURES = ("clip", "decay", "ema", "accumulation")
"""The Keras options the demo can switch on: ``--features clip,ema`` picks some."""

PEAK_LEARNING_RATE = 0.01
ACCUMULATION_STEPS = 2
EMA_MOMENTUM = 0.9
"""The EMA's momentum. The first update replaces the average with its weights
(momentum 0); after ``k`` updates they keep ``0.9 ** (k - 1)`` of it, under 1%
after 45 updates, about two epochs of 22 (0.99 would need about 460)."""


def require(module: str) -> Any:
    """Imports a ``demo`` extra dependency, or exits with the command to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:  # pragma: no cover - depends on the extra
        raise SystemExit(
            f"The demo needs {module.split('.')[0]}: in the clone, "
            'python -m pip install -e ".[demo]"'
        ) from error


def parse_features(text: str) -> tuple[str, ...]:
    """``"all"``, ``"none"`` or a comma-separated subset of :data:`FEATURES`."""
    if text == "all":
        return FEATURES
    if text == "none":
        return ()
    chosen = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = sorted(set(chosen) - set(FEATURES))
    if unknown:
        raise ValueError(
            f"`features` must be 'all', 'none' or a comma-separated subset of "
            f"{', '.join(FEATURES)}; got unknown {unknown}."
        )
    return chosen


@dataclasses.dataclass(frozen=True)
class Digits:
    """8x8 digit images scaled to [0, 1], split 80/20 with a seeded permutation."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @classmethod
    def load(cls, seed: int) -> Digits:
        datasets = require("sklearn.datasets")
        digits = datasets.load_digits()
        x = (digits.data / 16.0).astype(np.float32)
        y = digits.target.astype(np.int32)
        order = np.random.default_rng(seed).permutation(len(x))
        split = int(0.8 * len(x))
        return cls(
            x[order[:split]], y[order[:split]], x[order[split:]], y[order[split:]]
        )

    def batches(self, batch_size: int, rng: np.random.Generator):
        """One epoch of shuffled training batches (the last partial one dropped)."""
        order = rng.permutation(len(self.x_train))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            yield self.x_train[index], self.y_train[index]


def build_mlp(hidden: Sequence[int] = (128, 128)) -> Any:
    """A Flax linen MLP: Dense + ReLU layers, then 10 logits."""
    nn = require("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            for width in hidden:
                x = nn.relu(nn.Dense(width)(x))
            return nn.Dense(10)(x)

    return MLP()


def accumulation_steps(features: Sequence[str]) -> int:
    """Micro-steps per update: :data:`ACCUMULATION_STEPS` with accumulation on."""
    return ACCUMULATION_STEPS if "accumulation" in features else 1


def build_optimizer(
    features: Sequence[str], total_batches: int
) -> optax.GradientTransformation:
    """``adamax(...)`` with the chosen Keras options and a cosine schedule."""
    steps = accumulation_steps(features)
    return adamax(
        # A schedule sees Keras' micro-step counter, so it spans every batch.
        learning_rate=schedule_of(total_batches),
        global_clipnorm=1.0 if "clip" in features else None,
        weight_decay=1e-3 if "decay" in features else None,
        exclude_from_weight_decay=["bias"] if "decay" in features else None,
        use_ema="ema" in features,
        **({"ema_momentum": EMA_MOMENTUM} if "ema" in features else {}),
        gradient_accumulation_steps=steps if steps > 1 else None,
    )


def schedule_of(total_batches: int) -> optax.Schedule:
    """The learning rate: a cosine from the peak over every batch (micro-step)."""
    return optax.cosine_decay_schedule(PEAK_LEARNING_RATE, total_batches)


def not_bias(params: Any) -> Any:
    """``True`` for every leaf but the biases: the leaves that decay."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "bias" not in jax.tree_util.keystr(path), params
    )


def build_baseline(
    features: Sequence[str], total_batches: int
) -> optax.GradientTransformation:
    """The nearest optax setup: ``optax.adamaxw`` (optax's Adamax rule, decoupled
    decay) after ``optax.clip_by_global_norm``, in ``optax.MultiSteps`` when
    accumulation is on, its rate on the same schedule evaluated (like Keras') at
    the last micro-step of each group. Its EMA is kept by the training step."""
    steps = accumulation_steps(features)
    schedule = schedule_of(total_batches)
    chain = optax.chain(
        *([optax.clip_by_global_norm(1.0)] if "clip" in features else []),
        optax.adamaxw(
            lambda update: schedule(update * steps + steps - 1),
            weight_decay=1e-3 if "decay" in features else 0.0,
            mask=not_bias,
        ),
    )
    return optax.MultiSteps(chain, steps) if steps > 1 else chain


@dataclasses.dataclass
class KerasRun:
    """Keras' ``Adamax`` on the flattened parameters, through ``stateless_apply``."""

    optimizer: Any
    variables: list[Any]
    treedef: Any

    def values(self) -> list[jax.Array]:
        return [v.value for v in self.optimizer.variables]

    def finalized(self, trainable: list[jax.Array], state: list[jax.Array]) -> Any:
        """The parameters Keras' ``finalize_variable_values`` gives (its EMA)."""
        for variable, value in zip(self.optimizer.variables, state, strict=True):
            variable.assign(value)
        for variable, value in zip(self.variables, trainable, strict=True):
            variable.assign(value)
        self.optimizer.finalize_variable_values(self.variables)
        return jax.tree.unflatten(self.treedef, [v.value for v in self.variables])


def build_keras(features: Sequence[str], total_batches: int, params: Any) -> KerasRun:
    """``keras.optimizers.Adamax`` with the same options, built on ``params``."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = require("keras")
    if keras.backend.backend() != "jax":
        raise SystemExit("The demo needs Keras on JAX: set KERAS_BACKEND=jax.")
    steps = accumulation_steps(features)
    optimizer = keras.optimizers.Adamax(
        learning_rate=keras.optimizers.schedules.CosineDecay(
            PEAK_LEARNING_RATE, total_batches
        ),
        global_clipnorm=1.0 if "clip" in features else None,
        weight_decay=1e-3 if "decay" in features else None,
        use_ema="ema" in features,
        ema_momentum=EMA_MOMENTUM,
        gradient_accumulation_steps=steps if steps > 1 else None,
    )
    if "decay" in features:
        optimizer.exclude_from_weight_decay(var_names=["bias"])
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    variables = [
        keras.Variable(value, name=re.sub(r"\W+", "_", jax.tree_util.keystr(path)))
        for path, value in leaves
    ]
    optimizer.build(variables)
    return KerasRun(optimizer, variables, treedef)


def describe_runs(
    features: Sequence[str], batch_size: int, updates: int, compare: bool
) -> dict[str, str]:
    """One line per run saying what it is: optimizer, options, batch, updates."""
    steps = accumulation_steps(features)
    common = (
        f"lr cosine from {PEAK_LEARNING_RATE} over every batch, batch {batch_size}"
        f"{f', {steps} accumulation steps' if steps > 1 else ''}, {updates} updates"
    )
    options = [
        *(["global_clipnorm 1.0"] if "clip" in features else []),
        *(["weight_decay 1e-3 (not biases)"] if "decay" in features else []),
        *([f"EMA momentum {EMA_MOMENTUM}"] if "ema" in features else []),
    ]
    listed = ", ".join(options) or "no options"
    lines = {"adamax_optax": f"adamax({listed}); {common}"}
    if compare:
        lines["Keras"] = f"keras.optimizers.Adamax({listed}); {common}"
        wrapper = f"optax.MultiSteps(·, {steps}) of " if steps > 1 else ""
        clip = "clip_by_global_norm + " if "clip" in features else ""
        ema = ", EMA by optax.incremental_update" if "ema" in features else ""
        lines["optax"] = f"{wrapper}{clip}optax.adamaxw{ema}; {common}"
    return lines


def loss_of(model: Any):
    def loss_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss_fn


def make_train_step(model: Any):
    """The jit-compiled Flax step: loss and gradients, then ``apply_gradients``;
    the gradients are returned too, for the runs fed the same gradients."""
    loss_fn = loss_of(model)

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, ...]:
        loss, grads = jax.value_and_grad(loss_fn)(state.params, x, y)
        return state.apply_gradients(grads=grads), loss, grads

    return train_step


def make_keras_apply(run: KerasRun):
    """Keras' ``stateless_apply`` of given gradients to its own weights."""

    @jax.jit
    def apply(carry: Any, grads: Any) -> Any:
        trainable, state = carry
        return run.optimizer.stateless_apply(state, jax.tree.leaves(grads), trainable)

    return apply


def make_optax_apply(tx: optax.GradientTransformation):
    """The optax setup's update of its own weights with given gradients."""

    @jax.jit
    def apply(carry: Any, grads: Any) -> Any:
        params, state = carry
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return apply


def make_optax_step(model: Any, tx: optax.GradientTransformation, ema: bool):
    """The optax run's step: update, apply, then the EMA on real updates."""
    loss_fn = loss_of(model)

    @jax.jit
    def step(carry: Any, x: jax.Array, y: jax.Array) -> tuple[Any, jax.Array]:
        params, state, average = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        if ema:
            updated = getattr(state, "mini_step", 0) == 0  # MultiSteps: group done
            moved = optax.incremental_update(params, average, 1 - EMA_MOMENTUM)
            average = jax.tree.map(
                lambda m, a: jnp.where(updated, m, a), moved, average
            )
        return (params, state, average), loss

    return step


def make_keras_step(model: Any, run: KerasRun):
    """Keras' step: the same loss and gradients, then ``stateless_apply``."""
    loss_fn = loss_of(model)

    @jax.jit
    def step(carry: Any, x: jax.Array, y: jax.Array) -> tuple[Any, jax.Array]:
        trainable, state = carry
        params = jax.tree.unflatten(run.treedef, trainable)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        trainable, state = run.optimizer.stateless_apply(
            state, jax.tree.leaves(grads), trainable
        )
        return (trainable, state), loss

    return step


def make_evaluate(model: Any):
    """Test loss and accuracy of a parameter tree, jit-compiled."""

    @jax.jit
    def evaluate(params: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, ...]:
        logits = model.apply({"params": params}, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == y)

    return evaluate


def largest_difference(ours: Any, reference: Any) -> float:
    """``max|w_ours - w_ref| / (1 + max|w_ref|)``: under 1e-6 is Keras parity."""
    worst = 0.0
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        b = np.asarray(b, np.float64)
        error = np.max(np.abs(np.asarray(a, np.float64) - b)) / (1 + np.max(np.abs(b)))
        worst = max(worst, float(error))
    return worst


def train(
    epochs: int = 30,
    batch_size: int = 32,
    seed: int = 0,
    features: Sequence[str] = FEATURES,
    compare: bool = True,
    plot: str | pathlib.Path | None = "adamax_demo.png",
    progress: bool = True,
) -> dict[str, Any]:
    """Trains with ``adamax(...)`` (and Keras and optax to compare); returns history.

    The result maps each run name (``"adamax_optax"``, ``"Keras"``, ``"optax"``,
    and ``"... EMA"`` for their moving averages when EMA is on) to per-epoch
    lists of ``train_loss`` (raw runs), ``test_loss`` and ``test_accuracy``;
    ``keras_difference`` holds, per epoch, the largest difference between the
    parameters of adamax_optax and Keras relative to ``1 + max|w|`` (and
    ``keras_ema_difference`` their EMAs', without accumulation, where Keras
    moves its EMA once per update too; ``optax_difference`` the same against
    the optax run); ``same_gradients`` maps ``"Keras"`` and ``"optax"`` to the
    same difference for the runs fed adamax_optax's gradients. Also
    ``features``, ``runs`` (what each run is), ``updates``, ``seconds`` and
    ``plot`` (the PNG written, or None).
    The progress bar shows only when stderr is a terminal.
    """
    train_state = require("flax.training.train_state")
    tqdm = require("tqdm").tqdm
    data = Digits.load(seed)
    model = build_mlp()
    params = model.init(jax.random.key(seed), data.x_train[:1])["params"]
    batches_per_epoch = len(data.x_train) // batch_size
    total_batches = epochs * batches_per_epoch
    steps = accumulation_steps(features)
    ema = "ema" in features
    ours_state = train_state.TrainState.create(  # its own copy: its step donates it
        apply_fn=model.apply,
        params=jax.tree.map(jnp.array, params),
        tx=build_optimizer(features, total_batches),
    )
    ours_step, evaluate = make_train_step(model), make_evaluate(model)
    runs: dict[str, Any] = {}  # name -> (step, carry) of the comparison runs
    if compare:
        keras_run = build_keras(features, total_batches, params)
        runs["Keras"] = [
            make_keras_step(model, keras_run),
            (jax.tree.leaves(params), keras_run.values()),
        ]
        baseline = build_baseline(features, total_batches)
        runs["optax"] = [
            make_optax_step(model, baseline, ema),
            (params, baseline.init(params), jax.tree.map(jnp.array, params)),
        ]
        fed = {  # name -> (apply, carry): fed adamax_optax's gradients
            "Keras": [
                make_keras_apply(keras_run),
                (jax.tree.leaves(params), keras_run.values()),
            ],
            "optax": [make_optax_apply(baseline), (params, baseline.init(params))],
        }
    raw = ["adamax_optax", *runs]
    names = raw + ([f"{name} EMA" for name in raw] if ema else [])
    history: dict[str, Any] = {
        name: {"train_loss": [], "test_loss": [], "test_accuracy": []} for name in names
    }
    compare_ema = compare and ema and steps == 1
    history.update(features=list(features), keras_difference=[], optax_difference=[])
    if compare:
        history["same_gradients"] = {"Keras": [], "optax": []}
    if compare_ema:
        history["keras_ema_difference"] = []
    history["updates"] = total_batches // steps
    history["runs"] = describe_runs(features, batch_size, history["updates"], compare)
    for name, line in history["runs"].items():
        print(textwrap.fill(f"{name}: {line}", 100, subsequent_indent="    "))
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    show_bar = progress and sys.stderr.isatty()
    bar = None
    for epoch in range(1, epochs + 1):
        losses: dict[str, list[jax.Array]] = {name: [] for name in raw}
        for x, y in data.batches(batch_size, rng):
            ours_state, loss, grads = ours_step(ours_state, x, y)
            losses["adamax_optax"].append(loss)
            for run in fed.values() if compare else ():
                run[1] = run[0](run[1], grads)
            for name, run in runs.items():
                run[1], loss = run[0](run[1], x, y)
                losses[name].append(loss)
            if bar is None:  # after the first step, so its compile is not in the rate
                jax.block_until_ready(losses)
                bar = tqdm(
                    total=total_batches,
                    initial=1,
                    desc="training",
                    unit="batch",
                    disable=not show_bar,
                )
            else:
                bar.update()
        finals = {"adamax_optax": ours_state.params}
        if ema:
            finals["adamax_optax EMA"] = finalize_variable_values(
                ours_state.params, ours_state
            )
        if compare:
            trainable, state = runs["Keras"][1]
            finals["Keras"] = jax.tree.unflatten(keras_run.treedef, trainable)
            finals["optax"] = runs["optax"][1][0]
            if ema:
                finals["Keras EMA"] = keras_run.finalized(trainable, state)
                finals["optax EMA"] = runs["optax"][1][2]
            history["keras_difference"].append(
                largest_difference(finals["adamax_optax"], finals["Keras"])
            )
            history["optax_difference"].append(
                largest_difference(finals["adamax_optax"], finals["optax"])
            )
            same = history["same_gradients"]
            keras_weights = jax.tree.unflatten(keras_run.treedef, fed["Keras"][1][0])
            same["Keras"].append(
                largest_difference(finals["adamax_optax"], keras_weights)
            )
            same["optax"].append(
                largest_difference(finals["adamax_optax"], fed["optax"][1][0])
            )
            if compare_ema:
                history["keras_ema_difference"].append(
                    largest_difference(finals["adamax_optax EMA"], finals["Keras EMA"])
                )
        for name, final in finals.items():
            test_loss, test_accuracy = evaluate(final, data.x_test, data.y_test)
            record = history[name]
            if name in losses:
                record["train_loss"].append(float(np.mean(losses[name])))
            record["test_loss"].append(float(test_loss))
            record["test_accuracy"].append(float(test_accuracy))
        lines = [*table_header(history), epoch_line(epoch, history)]
        for line in lines if epoch == 1 else lines[-1:]:
            if show_bar:
                bar.write(line)
            else:
                print(line, flush=True)
    if bar is not None:
        bar.close()
    history["seconds"] = time.perf_counter() - start
    history["plot"] = draw(history, plot) if plot else None
    summarize(history)
    return history


def run_records(history: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """The per-epoch records of each run in ``history``."""
    return {
        name: record
        for name, record in history.items()
        if isinstance(record, dict) and "test_accuracy" in record
    }


RUNS = ("adamax_optax", "Keras", "optax")


def table_header(history: dict[str, Any]) -> list[str]:
    """The per-epoch table's heading, at most 100 characters a line."""
    compare = "same_gradients" in history
    ema = "adamax_optax EMA" in history
    losses = "".join(
        f"{n:>7s}" for n in ("ours", *RUNS[1:]) if n in history or n == "ours"
    )
    accuracy = f"{'ours':>6s}" + (f"{'EMA':>6s}" if ema else "")
    accuracy += "".join(f"{n:>6s}" for n in RUNS[1:] if n in history)
    width = len(accuracy)
    lines = [
        f"{'':5s} {'mean train loss':>{len(losses)}s}   {'test accuracy':>{width}s}"
        + (f"   {'max|w - w_ours| / (1 + max|w|)':>30s}" if compare else ""),
        f"{'epoch':5s} {losses}   {accuracy}"
        + (f"   {'Keras*':>9s} {'optax*':>9s} {'Keras':>9s}" if compare else ""),
    ]
    if compare:
        lines.append(
            "(* fed adamax_optax's gradients every step, own state and weights; "
            "unstarred: free runs)"
        )
    return lines


def epoch_line(epoch: int, history: dict[str, Any]) -> str:
    """One row of the table: the epoch's mean training loss of each run, test
    accuracy, and the parameter differences from adamax_optax."""
    losses = "".join(
        f"{history[n]['train_loss'][-1]:7.4f}" for n in RUNS if n in history
    )
    accuracy = f"{history['adamax_optax']['test_accuracy'][-1]:6.3f}"
    if "adamax_optax EMA" in history:
        accuracy += f"{history['adamax_optax EMA']['test_accuracy'][-1]:6.3f}"
    accuracy += "".join(
        f"{history[n]['test_accuracy'][-1]:6.3f}" for n in RUNS[1:] if n in history
    )
    line = f"{epoch:5d} {losses}   {accuracy}"
    if "same_gradients" in history:
        same = history["same_gradients"]
        line += (
            f"   {same['Keras'][-1]:9.1e} {same['optax'][-1]:9.1e} "
            f"{history['keras_difference'][-1]:9.1e}"
        )
    return line


def summarize(history: dict[str, Any]) -> None:
    """The closing lines: final accuracies, the parity, where the plot went."""
    runs = run_records(history)
    print(f"done in {history['seconds']:.1f} s, {history['updates']} updates.")
    finals = [
        f"{name} {runs[name]['test_accuracy'][-1]:.3f}" for name in RUNS if name in runs
    ]
    print(f"final test accuracy: {', '.join(finals)}")
    if "adamax_optax EMA" in runs:
        averages = [
            f"{name} {runs[f'{name} EMA']['test_accuracy'][-1]:.3f}"
            for name in RUNS
            if f"{name} EMA" in runs
        ]
        print(f"  of the EMA weights: {', '.join(averages)}")
    if "same_gradients" in history:
        same = history["same_gradients"]
        first = history["updates"] // len(same["Keras"])
        print(
            f"fed the same gradients: Keras within {same['Keras'][0]:.1e} x "
            f"(1 + max|w|) of adamax_optax after {first} updates"
        )
        print(
            f"  (parity: 1e-6 after 50), {max(same['Keras']):.1e} over all "
            f"{history['updates']}: each update rounds its last bit"
        )
        print(
            "  differently, and those differences add up over a run; the nearest "
            f"optax setup {max(same['optax']):.1e} away."
        )
        print(
            f"run freely: Keras {max(history['keras_difference']):.1e} away, each "
            "run on its own gradients (float32"
        )
        print("  rounding that training amplifies: one ReLU flipping on one sample).")
        if "keras_ema_difference" in history:
            print(
                "EMAs (free runs): within "
                f"{max(history['keras_ema_difference']):.1e} x (1 + max|w|)."
            )
        elif "Keras EMA" in history:
            print(
                "EMAs not compared: under accumulation Keras moves its EMA every "
                "micro-step, adamax_optax"
            )
            print("  once per update (a documented departure).")
    if history["plot"]:
        print(f"curves: {history['plot']}")


def draw(history: dict[str, Any], path: str | pathlib.Path) -> pathlib.Path:
    """Test loss and test accuracy per epoch of every run and, when Keras ran,
    the largest parameter difference between adamax_optax and Keras."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    pyplot = require("matplotlib.pyplot")
    runs = run_records(history)
    panels = 3 if history.get("keras_difference") else 2
    figure, axes = pyplot.subplots(1, panels, figsize=(5 * panels, 4.2))
    loss_axis, accuracy_axis = axes[0], axes[1]
    for name, record in runs.items():
        epochs = np.arange(1, len(record["test_accuracy"]) + 1)
        style = "--" if name.endswith("EMA") else "-"
        color = f"C{['adamax_optax', 'Keras', 'optax'].index(name.split()[0])}"
        loss_axis.plot(epochs, record["test_loss"], style, color=color, label=name)
        accuracy_axis.plot(
            epochs, record["test_accuracy"], style, color=color, label=name
        )
    loss_axis.set(
        title="Test loss", xlabel="epoch", ylabel="cross-entropy", yscale="log"
    )
    accuracy_axis.set(title="Test accuracy", xlabel="epoch", ylabel="accuracy")
    if panels == 3:
        epochs = np.arange(1, len(history["keras_difference"]) + 1)
        same = history["same_gradients"]
        axes[2].plot(epochs, same["Keras"], "o-", color="C1", label="Keras, same g")
        axes[2].plot(epochs, same["optax"], "o-", color="C2", label="optax, same g")
        axes[2].plot(
            epochs, history["keras_difference"], "s--", color="C1", label="Keras, free"
        )
        axes[2].plot(
            epochs, history["optax_difference"], "s--", color="C2", label="optax, free"
        )
        if "keras_ema_difference" in history:
            axes[2].plot(
                epochs,
                history["keras_ema_difference"],
                ":",
                color="C1",
                label="Keras EMA, free",
            )
        axes[2].axhline(1e-6, color="k", lw=0.8, label="parity tolerance, 50 updates")
        axes[2].set(
            title="Parameters against adamax_optax's",
            xlabel="epoch",
            ylabel="max |w - w_ours| / (1 + max |w|)",
            yscale="log",
        )
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("Flax MLP on scikit-learn digits, the same Keras options")
    figure.tight_layout()
    path = pathlib.Path(path)
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return path


def features_argument(text: str) -> tuple[str, ...]:
    """:func:`parse_features` for argparse: a bad value is a usage error."""
    try:
        return parse_features(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line options."""
    parser.add_argument("--epochs", type=int, default=30, help="default: 30")
    parser.add_argument("--batch-size", type=int, default=32, help="default: 32")
    parser.add_argument("--seed", type=int, default=0, help="default: 0")
    parser.add_argument(
        "--features",
        type=features_argument,
        default=FEATURES,
        help=f"'all', 'none' or a comma-separated subset of {','.join(FEATURES)} "
        "(default: all)",
    )
    parser.add_argument(
        "--no-compare", action="store_true", help="skip the Keras and optax runs"
    )
    parser.add_argument(
        "--plot", default="adamax_demo.png", help="PNG path (default: adamax_demo.png)"
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw")
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (it is off anyway when stderr is not a terminal)",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the demo from parsed command-line arguments."""
    return train(
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        features=args.features,
        compare=not args.no_compare,
        plot=None if args.no_plot else args.plot,
        progress=not args.no_progress,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parses ``argv`` (default: the command line) and runs the demo."""
    parser = argparse.ArgumentParser(
        prog="python examples/train_digits.py",
        description="Train a Flax MLP on scikit-learn's digits with adamax_optax.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
