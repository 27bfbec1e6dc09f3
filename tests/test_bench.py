"""The benchmark command runs end to end and draws its plot; its flags and its
missing-peer messages say what they should.

Timings are not asserted (machines are noisy: docs/performance.md reports them);
the in-place and traffic targets are tests of their own (``test_runner.py``).
"""

from __future__ import annotations

import importlib.util
import json

import bench as _bench
import jax
import matplotlib.image
import numpy as np
import pytest
from bench import main


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    # The benchmark is user code: standard promotion, as optax's MultiSteps needs.
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        sizes = ["--sizes", "0.25", "--dtypes", "float32"]
        plot = path.with_suffix(".png")
        main(
            [
                *sizes,
                "--repeats",
                "2",
                "--compile-leaves",
                "20",
                "--json",
                str(path),
                "--plot",
                str(plot),
            ]
        )
    return {**json.loads(path.read_text()), "plot": plot}


def test_plot_of_a_single_size_is_drawn(result):
    image = matplotlib.image.imread(result["plot"])
    assert image.shape[0] > 300 and image.std() > 0.05  # markers, not a blank frame


def test_help_gives_every_flag_a_default_and_a_description(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--quick", "--sizes", "--leaves", "--dtypes", "--repeats"):
        assert flag in text
    for flag in ("--compile-leaves", "--train-models", "--json", "--plot"):
        assert flag in text
    assert text.count("(default:") >= 8
    # One results file per program, named for its table.
    assert "bench_results.json; with --targets, bench_results_targets.json" in text


def test_plot_without_matplotlib_stops_before_measuring(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a),
    )

    def measure(*args, **kwargs):
        raise AssertionError("measured before checking for matplotlib")

    monkeypatch.setattr(_bench, "measure_bandwidth", measure)
    with pytest.raises(SystemExit, match="--plot needs matplotlib"):
        main(["--quick", "--plot", "out.png"])


def test_each_missing_peer_is_named(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    missing = {"torch", "keras"}
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in missing else real_find_spec(name, *a),
    )
    assert _bench.missing_peers() == ["keras", "torch"]

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_bench, "measure_bandwidth", stop)
    with pytest.raises(KeyboardInterrupt):
        main(["--quick"])
    out = capsys.readouterr().out
    assert "skipped the Keras Adamax row (pip install keras): keras is not" in out
    assert "skipped the torch.optim.Adamax rows" in out and "flax" not in out


def test_grouped_kernels_grow_with_the_groups_not_the_leaves(tmp_path):
    """The structural count: 32 more leaves of one shape add 32 kernels per
    leaf and more (at least 3 each: m, u, w), grouped the 32 parameter writes
    and a few kernels for each of the two stacks more (from the fewest leaves
    a shape that the library stacks)."""
    import kernels

    few_leaves = kernels._grouping.MIN_SHARED
    many_leaves = few_leaves + 32
    rows = kernels.main(
        [
            "--leaves",
            str(few_leaves),
            str(many_leaves),
            "--json",
            str(tmp_path / "k.json"),
        ]
    )
    by = {(r["configuration"], r["leaves"]): r for r in rows["rows"]}
    for name in kernels.CONFIGURATIONS:
        few, many = by[name, few_leaves], by[name, many_leaves]
        assert many["per_leaf"] - few["per_leaf"] >= 3 * 32
        assert many["grouped"] - few["grouped"] <= 32 + 2 * 8
        assert json.loads((tmp_path / "k.json").read_text())["rows"] == rows["rows"]


def test_memory_table_matches_the_closed_forms(tmp_path):
    import memory

    result = memory.main(["--no-speed", "--json", str(tmp_path / "memory.json")])
    table = {
        (r["params"], r["state"], r["options"]): r["bytes_per_parameter"]
        for r in result["bytes"]
    }
    # m and u in 4 bytes each, the EMA and the accumulator 4 more each (and
    # a few counters: 16 bytes over 1M parameters).
    assert table["float32", "float32", "-"] == pytest.approx(8.0, abs=1e-3)
    assert table["float32", "float32", "EMA, N=4"] == pytest.approx(16.0, abs=1e-3)
    assert table["float32", "bfloat16", "EMA"] == pytest.approx(6.0, abs=1e-3)
    # 2 bytes a parameter, 4 bytes of scale a block of 256, small leaves float.
    assert 2.0 < table["float32", "quantized", "-"] <= 2.1
    assert table["float32", "quantized", "N=4"] == pytest.approx(
        table["float32", "quantized", "-"] + 4.0, abs=1e-3
    )
    assert (tmp_path / "memory.json").exists()


def test_training_steps_are_timed_in_whole_accumulation_groups():
    """Three calls in four are micro-steps under accumulation: a round that
    timed another number of calls would weigh the update step wrongly."""
    import train_steps

    with pytest.raises(ValueError, match="`steps` must be a multiple of 4"):
        train_steps.run_model("mlp", steps=3)


def test_quality_noise_control_perturbs_each_gradient_by_a_hundredth():
    import quality

    tx = quality.gradient_noise(0.01, seed=3)
    grads = {"w": jax.numpy.full((20000,), 2.0)}
    state = tx.init(grads)
    first, state = tx.update(grads, state)
    second, _ = tx.update(grads, state)
    relative = np.asarray(first["w"]) / 2.0 - 1
    assert abs(np.mean(relative)) < 5e-4 and 0.0095 < np.std(relative) < 0.0105
    assert not np.array_equal(first["w"], second["w"])  # new draws every step
    again, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_array_equal(again["w"], first["w"])  # reproducible


def test_quality_control_perturbs_by_a_millionth_and_measures_the_spread():
    import quality

    params = {"w": jax.numpy.full((1000,), 2.0), "b": jax.numpy.zeros(3)}
    assert quality.perturbed(params, 0, 0) is params
    moved = quality.perturbed(params, 0, 1)
    relative = np.asarray(moved["w"]) / 2.0 - 1
    assert 0 < np.std(relative) < 2e-6 and np.all(np.asarray(moved["b"]) == 0)
    again = quality.perturbed(params, 0, 1)["w"]
    np.testing.assert_array_equal(again, moved["w"])  # reproducible
    rows = [
        dict(task="t", seed=0, state=state, start=start, final_loss=loss)
        for state, losses in {
            "float32 state": (1.0, 1.1, 0.95),
            "bfloat16 state": (2.0, 2.0, 2.0),
            "quantized state": (1.04, 1.0, 1.10),
        }.items()
        for start, loss in enumerate(losses)
    ]
    spreads = {s["state"]: s for s in quality.spread(rows)}
    assert spreads["float32 state"]["self_gap"] == pytest.approx(0.1)
    assert spreads["float32 state"]["median"] == pytest.approx(1.0)
    assert spreads["quantized state"]["gap_to_float32"] == pytest.approx(0.04)
    assert spreads["quantized state"]["self_gap"] == pytest.approx(1.10 / 1.04 - 1)
    assert spreads["bfloat16 state"]["self_gap"] == 0.0
