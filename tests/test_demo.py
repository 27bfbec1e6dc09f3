"""The README's main job: a real training run on scikit-learn's digits."""

from __future__ import annotations

from adamax_optax._demo import main, train


def test_demo_learns_the_digits(capsys):
    result = train(epochs=4, batch_size=32, seed=0)
    # Chance is 0.1; a working optimizer passes 0.85 in a few epochs.
    assert result["test_accuracy"] > 0.85
    assert result["ema_test_accuracy"] > 0.85
    assert capsys.readouterr().out.count("epoch") == 4


def test_command_line_runs_the_demo(capsys):
    main(["demo", "--epochs", "1"])
    out = capsys.readouterr().out
    assert "epoch   1" in out and "test accuracy" in out
