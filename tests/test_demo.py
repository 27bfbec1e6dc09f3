"""The README's main job: a Flax training run on scikit-learn's digits."""

from __future__ import annotations

import jax
import matplotlib.image
import pytest

from adamax_optax.__main__ import main
from adamax_optax._demo import FEATURES, build_optimizer, parse_features, train


@pytest.fixture(autouse=True)
def user_promotion_rules():
    """The demo is user code: it runs under JAX's default promotion rules."""
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


def test_demo_learns_the_digits_and_draws_the_curves(tmp_path, capsys):
    plot = tmp_path / "curves.png"
    history = train(epochs=4, plot=plot, progress=False)
    # Chance is 0.1; a working optimizer passes 0.9 in a few epochs.
    for run in ("adamax_optax", "adamax_optax EMA", "optax.adamax"):
        assert history[run]["test_accuracy"][-1] > 0.9, run
        assert len(history[run]["test_accuracy"]) == 4
    losses = history["adamax_optax"]["train_loss"]
    assert losses[-1] < 0.5 * losses[0]
    out = capsys.readouterr().out
    assert out.count("epoch ") == 4 and "(EMA " in out and "optax.adamax loss" in out
    image = matplotlib.image.imread(plot)
    assert image.shape[0] > 300 and image.shape[1] > 600
    assert image.std() > 0.05  # not a blank canvas


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


def test_parse_features():
    assert parse_features("all") == FEATURES
    assert parse_features("none") == ()
    assert parse_features("ema, clip") == ("ema", "clip")
    with pytest.raises(ValueError, match="'momentum'"):
        parse_features("ema,momentum")


def test_command_line_runs_the_demo(tmp_path, capsys):
    options = ["--features", "ema", "--no-compare", "--no-progress"]
    history = main(
        ["demo", "--epochs", "1", *options, "--plot", str(tmp_path / "out.png")]
    )
    out = capsys.readouterr().out
    assert "features: ema" in out and "optax.adamax" not in out
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert history["adamax_optax EMA"]["test_accuracy"][-1] > 0.5


def test_command_line_rejects_unknown_features(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--features", "lookahead"])
    assert "'lookahead'" in capsys.readouterr().err
