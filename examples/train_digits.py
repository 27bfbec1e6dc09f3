"""The main job: a Flax MLP trained on scikit-learn's digits (shipped, no download).

``python examples/train_digits.py`` trains the same network twice, from the same
initial weights, on the same batches and with the same number of updates: once
with :func:`adamax_optax.adamax` (Keras options on) and once with ``optax.adamax``
(inside ``optax.MultiSteps`` when accumulation is on, its learning rate on the same
schedule), each in a jit-compiled Flax ``TrainState`` step. It prints what each
run is, per-epoch loss and accuracy (and the EMA weights' when EMA is on) and
draws the curves. Its dependencies (Flax, scikit-learn, tqdm, matplotlib) are the
``demo`` extra.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import pathlib
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
"""The EMA's momentum. The starting weights keep ``0.9 ** k`` of the average
after ``k`` updates, so 0.9 forgets them within the first epoch (about 40
updates); 0.99 would need about 460 updates to bring them under 1%."""


def require(module: str) -> Any:
    """Imports a ``demo`` extra dependency, or exits with the command to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:  # pragma: no cover - depends on the extra
        raise SystemExit(
            f"The demo needs {module.split('.')[0]}: "
            'python -m pip install "adamax_optax[demo]" (in a clone: '
            'python -m pip install -e ".[demo]")'
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
        learning_rate=optax.cosine_decay_schedule(PEAK_LEARNING_RATE, total_batches),
        global_clipnorm=1.0 if "clip" in features else None,
        weight_decay=1e-3 if "decay" in features else None,
        exclude_from_weight_decay=["bias"] if "decay" in features else None,
        use_ema="ema" in features,
        ema_momentum=EMA_MOMENTUM,
        gradient_accumulation_steps=steps if steps > 1 else None,
    )


def build_baseline(
    features: Sequence[str], total_batches: int
) -> optax.GradientTransformation:
    """``optax.adamax`` making the same updates: in ``optax.MultiSteps`` when
    accumulation is on, with its rate on the same schedule (evaluated, like
    Keras', at the last micro-step of each group)."""
    steps = accumulation_steps(features)
    schedule = optax.cosine_decay_schedule(PEAK_LEARNING_RATE, total_batches)
    baseline = optax.adamax(lambda update: schedule(update * steps + steps - 1))
    return optax.MultiSteps(baseline, steps) if steps > 1 else baseline


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
    lines = {"adamax_optax": f"adamax({', '.join(options) or 'no options'}); {common}"}
    if compare:
        wrapper = f"optax.MultiSteps(·, {steps})" if steps > 1 else "plain"
        lines["optax.adamax"] = f"optax.adamax, {wrapper}; {common}"
    return lines


def make_train_step(model: Any):
    """The jit-compiled step: loss and gradients, then ``apply_gradients``."""

    @jax.jit
    def train_step(state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, jax.Array]:
        def loss_fn(params: Any) -> jax.Array:
            logits = model.apply({"params": params}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    return train_step


def make_evaluate(model: Any):
    """Test loss and accuracy of a parameter tree, jit-compiled."""

    @jax.jit
    def evaluate(params: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, ...]:
        logits = model.apply({"params": params}, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == y)

    return evaluate


def train(
    epochs: int = 30,
    batch_size: int = 32,
    seed: int = 0,
    features: Sequence[str] = FEATURES,
    compare: bool = True,
    plot: str | pathlib.Path | None = "adamax_demo.png",
    progress: bool = True,
) -> dict[str, Any]:
    """Trains with ``adamax(...)`` (and ``optax.adamax`` to compare); returns history.

    The result maps each run name (``"adamax_optax"``, ``"adamax_optax EMA"`` when
    EMA is on, ``"optax.adamax"`` when comparing) to per-epoch lists of
    ``train_loss``, ``test_loss`` and ``test_accuracy``, plus ``features``,
    ``runs`` (what each run is), ``updates``, ``seconds`` and ``plot`` (the PNG
    written, or None). The progress bar shows only when stderr is a terminal,
    and starts after the first (compiling) step.
    """
    train_state = require("flax.training.train_state")
    tqdm = require("tqdm").tqdm
    data = Digits.load(seed)
    model = build_mlp()
    params = model.init(jax.random.key(seed), data.x_train[:1])["params"]
    batches_per_epoch = len(data.x_train) // batch_size
    total_batches = epochs * batches_per_epoch
    steps = accumulation_steps(features)
    optimizers = {"adamax_optax": build_optimizer(features, total_batches)}
    if compare:
        optimizers["optax.adamax"] = build_baseline(features, total_batches)
    states = {
        name: train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
        for name, tx in optimizers.items()
    }
    train_step, evaluate = make_train_step(model), make_evaluate(model)
    ema = "ema" in features
    names = [*optimizers, *(["adamax_optax EMA"] if ema else [])]
    history: dict[str, Any] = {
        name: {"train_loss": [], "test_loss": [], "test_accuracy": []} for name in names
    }
    history["features"] = list(features)
    history["updates"] = total_batches // steps
    history["runs"] = describe_runs(features, batch_size, history["updates"], compare)
    for name, line in history["runs"].items():
        print(f"{name}: {line}")
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    show_bar = progress and sys.stderr.isatty()
    bar = None
    for epoch in range(1, epochs + 1):
        losses: dict[str, list[jax.Array]] = {name: [] for name in states}
        for x, y in data.batches(batch_size, rng):
            for name, state in states.items():
                states[name], loss = train_step(state, x, y)
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
        finals = {name: state.params for name, state in states.items()}
        if ema:
            ours = states["adamax_optax"]
            finals["adamax_optax EMA"] = finalize_variable_values(ours.params, ours)
        for name, final in finals.items():
            test_loss, test_accuracy = evaluate(final, data.x_test, data.y_test)
            record = history[name]
            # The EMA run shares the raw run's batches and training loss.
            train_losses = losses.get(name, losses["adamax_optax"])
            record["train_loss"].append(float(np.mean(train_losses)))
            record["test_loss"].append(float(test_loss))
            record["test_accuracy"].append(float(test_accuracy))
        line = epoch_line(epoch, history)
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


def epoch_line(epoch: int, history: dict[str, Any]) -> str:
    """``epoch   3  adamax_optax loss 0.16 acc 0.958 (EMA 0.978)  optax.adamax ...``."""
    ours = history["adamax_optax"]
    line = (
        f"epoch {epoch:3d}  adamax_optax loss {ours['train_loss'][-1]:.4f} "
        f"acc {ours['test_accuracy'][-1]:.3f}"
    )
    if "adamax_optax EMA" in history:
        line += f" (EMA {history['adamax_optax EMA']['test_accuracy'][-1]:.3f})"
    if "optax.adamax" in history:
        theirs = history["optax.adamax"]
        line += (
            f"  optax.adamax loss {theirs['train_loss'][-1]:.4f} "
            f"acc {theirs['test_accuracy'][-1]:.3f}"
        )
    return line


def summarize(history: dict[str, Any]) -> None:
    """Prints the final test accuracy of each run and where the plot went."""
    print(f"done in {history['seconds']:.1f}s; final test accuracy:")
    for name, record in run_records(history).items():
        print(f"  {name:18s} {record['test_accuracy'][-1]:.3f}")
    if history["plot"]:
        print(f"curves written to {history['plot']}")


def draw(history: dict[str, Any], path: str | pathlib.Path) -> pathlib.Path:
    """Two panels, loss and test accuracy per epoch, saved as a PNG.

    The loss panel has every run's test loss (the EMA weights' included) and
    the raw runs' training loss; the title says what each run is.
    """
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    pyplot = require("matplotlib.pyplot")
    runs = run_records(history)
    figure, (loss_axis, accuracy_axis) = pyplot.subplots(1, 2, figsize=(11, 4.2))
    for index, (name, record) in enumerate(runs.items()):
        epochs = np.arange(1, len(record["test_accuracy"]) + 1)
        color = f"C{index}"
        loss_axis.plot(
            epochs, record["test_loss"], "-", color=color, label=f"{name} test"
        )
        if "EMA" not in name:
            loss_axis.plot(
                epochs, record["train_loss"], ":", color=color, label=f"{name} train"
            )
        accuracy_axis.plot(
            epochs, record["test_accuracy"], "-", color=color, label=name
        )
    loss_axis.set(
        title="Loss (train: mean over the epoch)",
        xlabel="epoch",
        ylabel="cross-entropy",
        yscale="log",
    )
    accuracy_axis.set(title="Test accuracy", xlabel="epoch", ylabel="accuracy")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    described = "\n".join(
        textwrap.fill(f"{name}: {line}", 120) for name, line in history["runs"].items()
    )
    figure.suptitle(f"Flax MLP on scikit-learn digits\n{described}", fontsize=9)
    figure.tight_layout()
    path = pathlib.Path(path)
    figure.savefig(path, dpi=120)
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
        "--no-compare", action="store_true", help="skip the optax.adamax run"
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
