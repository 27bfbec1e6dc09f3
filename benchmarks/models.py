"""Three realistic models in plain JAX, for timing whole training steps.

* ``mlp``: 500 dense layers of width 64 (1000 parameter leaves).
* ``resnet``: a ResNet-50-like CNN, bottleneck blocks ``[3, 4, 6, 3]`` with
  BatchNorm in training mode (about 160 parameter leaves).
* ``gpt``: a GPT-2-small-like decoder, 12 layers of width 768 with 12 heads
  (about 150 parameter leaves, 124M parameters).

Each builder returns ``(params, batch, loss_fn)`` with ``loss_fn(params, batch)``
a scalar; the benchmarks compile ``value_and_grad``, the optimizer update and
``optax.apply_updates`` into one jitted step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Model = tuple[dict[str, Any], Any, Callable[[Any, Any], jax.Array]]


def _dense(rng: np.random.Generator, fan_in: int, fan_out: int) -> dict[str, Any]:
    scale = np.sqrt(1.0 / fan_in)
    kernel = rng.normal(scale=scale, size=(fan_in, fan_out)).astype(np.float32)
    return {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(fan_out)}


def mlp(layers: int = 500, width: int = 64, batch: int = 32) -> Model:
    """A deep MLP of ``layers`` dense layers (2 leaves each), tanh, MSE loss."""
    rng = np.random.default_rng(0)
    params = {f"dense_{i:03d}": _dense(rng, width, width) for i in range(layers)}
    x = jnp.asarray(rng.normal(size=(batch, width)).astype(np.float32))

    def loss_fn(params, x):
        h = x
        for name in sorted(params):
            h = jnp.tanh(h @ params[name]["kernel"] + params[name]["bias"])
        return jnp.mean((h - x) ** 2)

    return params, x, loss_fn


def _conv(rng, size, c_in, c_out):
    scale = np.sqrt(2.0 / (size * size * c_in))
    return jnp.asarray(
        rng.normal(scale=scale, size=(size, size, c_in, c_out)).astype(np.float32)
    )


def _batch_norm(x, p):
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.var(x, axis=(0, 1, 2))
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def _apply_conv(x, kernel, stride=1):
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def resnet(batch: int = 2, image: int = 32, classes: int = 10) -> Model:
    """ResNet-50's layout (bottlenecks ``[3, 4, 6, 3]``), BatchNorm, softmax loss."""
    rng = np.random.default_rng(0)

    def conv_bn(size, c_in, c_out):
        return {
            "kernel": _conv(rng, size, c_in, c_out),
            "bn": {"scale": jnp.ones(c_out), "bias": jnp.zeros(c_out)},
        }

    params: dict[str, Any] = {"stem": conv_bn(7, 3, 64)}
    c_in = 64
    for stage, (blocks, width) in enumerate(
        zip([3, 4, 6, 3], [64, 128, 256, 512], strict=True)
    ):
        for block in range(blocks):
            unit = {
                "a": conv_bn(1, c_in, width),
                "b": conv_bn(3, width, width),
                "c": conv_bn(1, width, 4 * width),
            }
            if block == 0:
                unit["project"] = conv_bn(1, c_in, 4 * width)
            params[f"stage{stage}_block{block}"] = unit
            c_in = 4 * width
    params["head"] = _dense(rng, c_in, classes)
    images = jnp.asarray(rng.normal(size=(batch, image, image, 3)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, classes, size=batch))

    def loss_fn(params, data):
        x, y = data
        h = jax.nn.relu(
            _batch_norm(
                _apply_conv(x, params["stem"]["kernel"], 2), params["stem"]["bn"]
            )
        )
        for stage, blocks in enumerate([3, 4, 6, 3]):
            for block in range(blocks):
                unit = params[f"stage{stage}_block{block}"]
                stride = 2 if block == 0 and stage > 0 else 1
                out = jax.nn.relu(
                    _batch_norm(_apply_conv(h, unit["a"]["kernel"]), unit["a"]["bn"])
                )
                out = jax.nn.relu(
                    _batch_norm(
                        _apply_conv(out, unit["b"]["kernel"], stride), unit["b"]["bn"]
                    )
                )
                out = _batch_norm(
                    _apply_conv(out, unit["c"]["kernel"]), unit["c"]["bn"]
                )
                if "project" in unit:
                    h = _batch_norm(
                        _apply_conv(h, unit["project"]["kernel"], stride),
                        unit["project"]["bn"],
                    )
                h = jax.nn.relu(out + h)
        logits = jnp.mean(h, axis=(1, 2)) @ params["head"]["kernel"]
        logits = logits + params["head"]["bias"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    return params, (images, labels), loss_fn


def gpt(
    layers: int = 12,
    width: int = 768,
    heads: int = 12,
    vocab: int = 50257,
    context: int = 64,
    batch: int = 1,
) -> Model:
    """A GPT-2-small-like decoder (pre-LayerNorm, GELU MLP, tied embeddings)."""
    rng = np.random.default_rng(0)

    def norm():
        return {"scale": jnp.ones(width), "bias": jnp.zeros(width)}

    def weights(*shape):
        return jnp.asarray(rng.normal(scale=0.02, size=shape).astype(np.float32))

    params: dict[str, Any] = {
        "wte": weights(vocab, width),
        "wpe": weights(context, width),
        "ln_f": norm(),
    }
    for i in range(layers):
        params[f"h{i:02d}"] = {
            "ln_1": norm(),
            "attn": {
                "qkv": _dense(rng, width, 3 * width),
                "proj": _dense(rng, width, width),
            },
            "ln_2": norm(),
            "mlp": {
                "fc": _dense(rng, width, 4 * width),
                "proj": _dense(rng, 4 * width, width),
            },
        }
    tokens = jnp.asarray(rng.integers(0, vocab, size=(batch, context + 1)))

    def layer_norm(x, p):
        mean = jnp.mean(x, -1, keepdims=True)
        var = jnp.var(x, -1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]

    def dense(x, p):
        return x @ p["kernel"] + p["bias"]

    def loss_fn(params, tokens):
        x_tokens, targets = tokens[:, :-1], tokens[:, 1:]
        t = x_tokens.shape[1]
        h = params["wte"][x_tokens] + params["wpe"][:t]
        mask = jnp.tril(jnp.ones((t, t), bool))
        for i in range(layers):
            p = params[f"h{i:02d}"]
            q, k, v = jnp.split(
                dense(layer_norm(h, p["ln_1"]), p["attn"]["qkv"]), 3, -1
            )
            split = lambda a: a.reshape(a.shape[0], t, heads, -1)  # noqa: E731
            q, k, v = split(q), split(k), split(v)
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(width // heads)
            scores = jnp.where(mask, scores, -1e9)
            attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores), v)
            h = h + dense(attended.reshape(h.shape), p["attn"]["proj"])
            h = h + dense(
                jax.nn.gelu(dense(layer_norm(h, p["ln_2"]), p["mlp"]["fc"])),
                p["mlp"]["proj"],
            )
        logits = layer_norm(h, params["ln_f"]) @ params["wte"].T
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)
        return -jnp.mean(picked)

    return params, tokens, loss_fn


MODELS = {"mlp": mlp, "resnet": resnet, "gpt": gpt}
