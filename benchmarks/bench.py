"""``python benchmarks/bench.py``: update time against the memory-bandwidth floor.

The cost model: an update is memory-bound, so its floor is the minimal traffic
(``words`` per parameter, 4 bytes each in float32) over the bandwidth measured in
this process by a buffer-donating elementwise scale. Every case is timed in this one
process, buffers donated, and reported as median time, time over its floor, ratio to
the peers, XLA's peak memory over parameters + state + gradients, and compile time.

This module is the command: its flags, :func:`run_size` (the table's rows at one
size) and :func:`run`. The parts are modules beside it: :mod:`harness` (timing,
interleaved ratios, the bandwidth probe), :mod:`footprint` (what a donated step
holds, shared with ``tests/test_runner.py``), :mod:`cases` (what is timed),
:mod:`peers` (optax, Keras and torch), :mod:`table` (the printed table and the
plot) and :mod:`targets` (``--targets``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import platform
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from cases import build_cases, compile_times
from harness import (
    Case,
    compile_case,
    interleaved_ratio,
    measure_bandwidth,
    state_bytes,
    time_case,
)
from models import MODELS
from peers import torch_time
from table import COLUMNS, draw, print_compile_times, print_table
from targets import in_place_rows, target_rows
from train_steps import print_rows, run_model


def run_size(total: int, leaves: int, dtype: Any, bandwidth: float, repeats: int):
    """Rows for one (size, leaves, dtype)."""
    rows = []
    itemsize = jnp.dtype(dtype).itemsize
    peers: dict[str, Case] = {}
    for case in build_cases(total, leaves, dtype):
        total_bytes = state_bytes(case.state) + state_bytes(case.grads)
        start = time.perf_counter()
        peak = compile_case(case, total_bytes)
        compiled = time.perf_counter() - start
        median, first = time_case(case, repeats)
        floor = case.words * itemsize * total / bandwidth
        rows.append(
            dict(
                case=case.name,
                parameters=total,
                leaves=leaves,
                dtype=jnp.dtype(dtype).name,
                words=case.words,
                median_ms=median * 1e3,
                floor_ms=floor * 1e3,
                over_floor=median / floor,
                first_call_s=compiled + first,
                peak_over_p_s_g=peak,
            )
        )
        if case.peer in peers:
            # Ours over the reference, on our row: a peer from optax or Keras is
            # the reference of the adamax_optax row it names; a wrapped form of
            # ours is compared with the bare adamax_optax row it names.
            external = case.name.startswith(("optax", "Keras"))
            ours, reference = (peers[case.peer], case) if external else (case, None)
            ratio = interleaved_ratio(
                ours, reference or peers[case.peer], max(15, repeats)
            )
            row = next(r for r in rows if r["case"] == ours.name)
            row.setdefault("references", []).append(
                dict(case=(reference or peers[case.peer]).name, **ratio)
            )
        if case.name.startswith("adamax_optax"):
            peers[case.name] = case  # kept for the cases compared with it
        else:
            case.state = None  # free the buffers before the next case
    del peers
    by_name = {row["case"]: row for row in rows}
    if jnp.dtype(dtype) == jnp.float32:
        torch = torch_time(total, leaves, repeats)
        for name, seconds in (torch or {}).items():
            floor = 7 * 4 * total / bandwidth
            rows.append(
                dict(
                    case=name,
                    parameters=total,
                    leaves=leaves,
                    dtype="float32",
                    words=7,
                    median_ms=seconds * 1e3,
                    floor_ms=floor * 1e3,
                    over_floor=seconds / floor,
                    references=[
                        dict(
                            case="adamax_optax defaults",
                            ratio=seconds
                            * 1e3
                            / by_name["adamax_optax defaults"]["median_ms"],
                            pairs=0,  # another process: not interleaved
                        )
                    ],
                )
            )
    return rows


QUICK = dict(sizes=[1.0], leaves=[8], dtypes=["float32"], repeats=3, compile_leaves=50)
"""What ``--quick`` runs: one small size, float32, a 50-leaf compile; under a
minute on 2 CPU cores."""

PEERS = {
    "keras": "the Keras Adamax row (pip install keras)",
    "torch": "the torch.optim.Adamax rows (pip install torch)",
    "flax": "the Flax TrainState and nnx.Optimizer rows (pip install flax)",
}
"""Optional peers: the rows skipped, and how to get them, when one is missing."""

JSON_DEFAULTS = {"table": "bench_results.json", "targets": "bench_results_targets.json"}
"""Where each program writes its results unless ``--json`` is given: one file
per table, named for it, so that a ``--targets`` run leaves the table's alone."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run under a minute: 1M float32 parameters in 8 leaves, "
        "3 repeats, a 50-leaf compile; overrides the size options",
    )
    parser.add_argument(
        "--sizes",
        type=float,
        nargs="+",
        default=[1, 8, 32],
        help="parameter counts, in millions (2**20)",
    )
    parser.add_argument(
        "--leaves", type=int, nargs="+", default=[8], help="leaves the parameters span"
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        help="parameter dtypes",
    )
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed calls per case (median)"
    )
    parser.add_argument(
        "--compile-leaves",
        type=int,
        default=1000,
        help="leaves of the compile-time tree (0 skips it)",
    )
    parser.add_argument(
        "--train-models",
        nargs="*",
        default=[],
        choices=sorted(MODELS),
        help="also compile and time whole training steps of these models "
        "(mlp: 1000 leaves, resnet: ResNet-50-like, gpt: GPT-2-small-like)",
    )
    parser.add_argument(
        "--targets",
        action="store_true",
        help="only the gating measurements: leaf-sized temporaries and copies "
        "of each composition and gating, then, at the largest --sizes and "
        "--leaves, micro-step and update step over their floors for each gating, "
        "compositions over adamax(), defaults over optax.adamax, each timed "
        "interleaved (A B A B, --pairs pairs)",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="only 8-bit state: state bytes per parameter of each configuration, "
        "then the update step at the largest --sizes in 8 leaves, quantized over "
        "float32 state, interleaved (benchmarks/memory.py)",
    )
    parser.add_argument(
        "--pairs", type=int, default=15, help="interleaved pairs per comparison"
    )
    parser.add_argument(
        "--json",
        default=argparse.SUPPRESS,  # one default per table: JSON_DEFAULTS
        help=f"where to write the results (default: {JSON_DEFAULTS['table']}; "
        f"with --targets, {JSON_DEFAULTS['targets']})",
    )
    parser.add_argument(
        "--plot", default=None, help="also draw the table as a PNG at this path"
    )


def missing_peers() -> list[str]:
    """The optional peers that are not installed."""
    return [name for name in PEERS if importlib.util.find_spec(name) is None]


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit(
            "--plot needs matplotlib: python -m pip install matplotlib "
            '(or the demo extra: python -m pip install "adamax_optax[demo]")'
        )
    if getattr(args, "quick", False):
        args = argparse.Namespace(**{**vars(args), **QUICK})
    if getattr(args, "memory", False):
        import memory

        options = ["--pairs", str(args.pairs), "--size", str(int(max(args.sizes)))]
        if getattr(args, "json", None):
            options += ["--json", args.json]
        return memory.main(options)
    targets = getattr(args, "targets", False)
    path = (
        getattr(args, "json", None) or JSON_DEFAULTS["targets" if targets else "table"]
    )
    if targets:
        total, leaves = int(max(args.sizes) * 2**20), max(args.leaves)
        print(
            f"jax {jax.__version__} on {jax.devices()[0].device_kind}: "
            f"{total / 2**20:.0f}M float32 in {leaves} leaves, {args.pairs} pairs"
        )
        result = dict(
            jax=jax.__version__,
            device_kind=jax.devices()[0].device_kind,
            parameters=total,
            leaves=leaves,
            in_place=in_place_rows(),
            targets=target_rows(total, leaves, args.pairs),
        )
        pathlib.Path(path).write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
        return result
    for name in missing_peers():
        print(f"skipped {PEERS[name]}: {name} is not installed")
    bandwidth = measure_bandwidth()
    machine = platform.processor() or platform.machine()
    print(
        f"{jax.devices()[0].device_kind} ({machine}),"
        f" jax {jax.__version__}, optax {optax.__version__}; "
        f"measured bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    rows = []
    for dtype in args.dtypes:
        for leaves in args.leaves:
            for size in args.sizes:
                rows += run_size(
                    int(size * 2**20), leaves, jnp.dtype(dtype), bandwidth, args.repeats
                )
    print_table(rows)
    compiled = compile_times(args.compile_leaves, 2**20) if args.compile_leaves else []
    print_compile_times(compiled)
    train_steps = [row for name in args.train_models for row in run_model(name)]
    if train_steps:
        print_rows(train_steps)
    result = dict(
        device=str(jax.devices()[0]),
        device_kind=jax.devices()[0].device_kind,
        jax=jax.__version__,
        bandwidth_gb_s=bandwidth / 1e9,
        rows=rows,
        compile=compiled,
        train_steps=train_steps,
    )
    pathlib.Path(path).write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    if args.plot:
        draw(rows, pathlib.Path(args.plot))
        print(f"wrote {args.plot}")
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench.py",
        description="Update time against the memory-bandwidth floor and the "
        "optax, Keras and PyTorch equivalents.",
        epilog=COLUMNS,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
