"""The README's main job: a Flax training run on scikit-learn's digits."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from train_digits import (
    FEATURES,
    build_baseline,
    build_optimizer,
    main,
    parse_features,
    train,
)


@pytest.fixture(autouse=True)
def user_promotion_rules():
    """The demo is user code: it runs under JAX's default promotion rules."""
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


def test_demo_learns_the_digits_and_draws_the_curves(tmp_path, capsys):
    plot = tmp_path / "curves.png"
    history = train(epochs=4, plot=plot)
    # Chance is 0.1; a working optimizer passes 0.9 in a few epochs.
    for run in ("adamax_optax", "adamax_optax EMA", "Keras", "Keras EMA", "optax"):
        assert history[run]["test_accuracy"][-1] > 0.9, run
        assert len(history[run]["test_accuracy"]) == 4
    losses = history["adamax_optax"]["train_loss"]
    assert losses[-1] < 0.5 * losses[0]
    # Fed adamax_optax's gradients, Keras stays within the parity tolerance
    # 1e-6 * (1 + max|w|) at every epoch; the optax setup (another update rule,
    # optax.adamaxw) is about 1e-2 away from the first epoch on.
    same = history["same_gradients"]
    assert len(same["Keras"]) == 4 and max(same["Keras"]) < 1e-6
    assert min(same["optax"]) > 1e-3
    # The free runs follow their own gradients: Keras drifts, but stays closer
    # than the optax setup.
    assert max(history["keras_difference"]) < 1e-3
    assert history["optax_difference"][-1] > 10 * history["keras_difference"][-1]
    captured = capsys.readouterr()
    out = captured.out
    assert max(len(line) for line in out.splitlines()) <= 100
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+\s+\d\.\d{4}", line)]
    assert len(rows) == 4 and len(rows[-1].split()) == 1 + 3 + 4 + 3
    assert out.count("mean train loss") == 1 and "test accuracy" in out
    assert "fed the same gradients: Keras within" in out and "run freely" in out
    # Under accumulation Keras moves its EMA every micro-step: not compared.
    assert "EMAs not compared" in out
    # What each run is: all make 4 * 44 / 2 = 88 updates of batch 32.
    assert history["updates"] == 88
    flat = " ".join(out.split())
    assert (
        "optax: optax.MultiSteps(·, 2) of clip_by_global_norm + optax.adamaxw" in flat
    )
    assert "EMA momentum 0.9" in flat and flat.count("88 updates") == 4
    # stderr is not a terminal here: no progress bar, only clean epoch lines.
    assert "training" not in captured.err and "\r" not in out
    image = matplotlib.image.imread(plot)
    assert image.shape[0] > 300 and image.shape[1] > 900  # three panels
    assert image.std() > 0.05  # not a blank canvas


def test_without_accumulation_the_emas_agree_with_keras(capsys):
    history = train(epochs=2, features=("ema", "decay"), plot=None)
    assert max(history["keras_ema_difference"]) < 1e-5
    assert max(history["keras_difference"]) < 1e-5
    assert "EMAs (free runs): within" in capsys.readouterr().out


def test_features_select_the_chain():
    total = 100
    everything = build_optimizer(FEATURES, total).init({"w": 1.0, "bias": 0.0})
    nothing = build_optimizer((), total).init({"w": 1.0})
    assert list(everything) == ["accumulate"]
    assert list(everything["accumulate"].inner_state) == [
        "global_clipnorm",
        "adamax",
        "weight_decay",
        "learning_rate",
        "ema",
    ]
    assert list(nothing) == ["adamax", "learning_rate"]


@pytest.mark.parametrize("features", [(), ("accumulation",)], ids=["N=1", "N=2"])
def test_baseline_makes_the_same_updates_at_the_same_rates(features):
    """``optax.adamax`` in the comparison updates on the same calls as ours, with
    the same learning rate: on a one-weight problem with constant gradient 1,
    both first steps are ``-lr`` (Adamax' direction is 1 for both rules)."""
    total = 8
    ours, baseline = build_optimizer(features, total), build_baseline(features, total)
    params = {"w": jnp.zeros(1)}
    grads = {"w": jnp.ones(1)}
    moves = {}
    for name, tx in (("ours", ours), ("optax", baseline)):
        state, steps = tx.init(params), []
        for _ in range(total):
            updates, state = tx.update(grads, state, params)
            steps.append(float(updates["w"][0]))
        moves[name] = np.array(steps)
    assert np.array_equal(moves["ours"] != 0, moves["optax"] != 0)
    assert np.count_nonzero(moves["ours"]) == total // (2 if features else 1)
    first = np.flatnonzero(moves["ours"])[0]
    np.testing.assert_allclose(moves["ours"][first], moves["optax"][first], rtol=1e-5)


def test_without_ema_there_is_no_ema_run(capsys):
    history = train(epochs=1, features=("clip",), plot=None)
    assert "adamax_optax EMA" not in history
    out = capsys.readouterr().out
    assert "EMA" not in out


def test_parse_features():
    assert parse_features("all") == FEATURES
    assert parse_features("none") == ()
    assert parse_features("ema, clip") == ("ema", "clip")
    with pytest.raises(ValueError, match="'momentum'"):
        parse_features("ema,momentum")


def test_command_line_runs_the_demo(tmp_path, capsys):
    options = ["--features", "ema", "--no-compare", "--no-progress"]
    history = main(["--epochs", "1", *options, "--plot", str(tmp_path / "out.png")])
    out = capsys.readouterr().out
    assert "adamax(EMA momentum 0.9)" in out and "optax.adamax" not in out
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert history["adamax_optax EMA"]["test_accuracy"][-1] > 0.5


def test_command_line_rejects_unknown_features(capsys):
    with pytest.raises(SystemExit):
        main(["--features", "lookahead"])
    assert "'lookahead'" in capsys.readouterr().err
