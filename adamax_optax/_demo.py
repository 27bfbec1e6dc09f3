"""A real training run: an MLP on scikit-learn's digits (shipped, no download)."""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamax_optax._alias import adamax
from adamax_optax._ema import finalize_variable_values


def load_digits(seed: int) -> tuple[np.ndarray, ...]:
    """8x8 digit images scaled to [0, 1], split 80/20."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:  # pragma: no cover - depends on the extra
        raise SystemExit(
            'The demo needs scikit-learn: python -m pip install -e ".[demo]"'
        ) from error
    digits = sklearn_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    split = int(0.8 * len(x))
    train, test = order[:split], order[split:]
    return x[train], y[train], x[test], y[test]


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> dict[str, Any]:
    params = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        key, sub = jax.random.split(key)
        params[f"layer_{i}"] = {
            "kernel": jax.random.normal(sub, (fan_in, fan_out)) / jnp.sqrt(fan_in),
            "bias": jnp.zeros(fan_out),
        }
    return params


def forward(params: dict[str, Any], x: jax.Array) -> jax.Array:
    layers = list(params.values())
    for layer in layers[:-1]:
        x = jax.nn.relu(x @ layer["kernel"] + layer["bias"][None, :])
    return x @ layers[-1]["kernel"] + layers[-1]["bias"][None, :]


def loss_fn(params: dict[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
    logits = forward(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(params: dict[str, Any], x: jax.Array, y: jax.Array) -> float:
    return float(jnp.mean(jnp.argmax(forward(params, x), -1) == y))


def train(epochs: int, batch_size: int, seed: int) -> dict[str, float]:
    """Trains with clipping, weight decay, EMA and accumulation; prints each epoch."""
    x_train, y_train, x_test, y_test = load_digits(seed)
    calls = epochs * (len(x_train) // batch_size)  # schedules count every call
    tx = adamax(
        learning_rate=optax.cosine_decay_schedule(0.01, calls),
        weight_decay=1e-3,
        global_clipnorm=1.0,
        use_ema=True,
        ema_momentum=0.9,
        gradient_accumulation_steps=2,
        exclude_from_weight_decay=["bias"],
    )
    params = init_mlp(jax.random.key(seed), (64, 64, 10))
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x_train))
        losses = []
        for i in range(0, len(order) - batch_size + 1, batch_size):
            batch = order[i : i + batch_size]
            params, state, loss = step(params, state, x_train[batch], y_train[batch])
            losses.append(float(loss))
        ema = finalize_variable_values(params, state)
        print(
            f"epoch {epoch:3d}  loss {np.mean(losses):.4f}  "
            f"test acc {accuracy(params, x_test, y_test):.3f}  "
            f"(EMA {accuracy(ema, x_test, y_test):.3f})"
        )
    final = finalize_variable_values(params, state)
    result = {
        "test_accuracy": accuracy(params, x_test, y_test),
        "ema_test_accuracy": accuracy(final, x_test, y_test),
        "seconds": time.perf_counter() - start,
    }
    print(
        f"done in {result['seconds']:.1f}s: test accuracy "
        f"{result['test_accuracy']:.3f}, EMA {result['ema_test_accuracy']:.3f}"
    )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m adamax_optax", description="adamax_optax commands"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train an MLP on scikit-learn digits")
    demo.add_argument("--epochs", type=int, default=10)
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        train(args.epochs, args.batch_size, args.seed)
