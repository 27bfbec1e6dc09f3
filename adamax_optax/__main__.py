"""Command line: ``python -m adamax_optax demo`` and ``... bench``."""

from __future__ import annotations

import argparse

from adamax_optax import _bench, _demo


def main(argv: list[str] | None = None) -> object:
    """Parses ``argv`` and runs the chosen command; returns its result."""
    parser = argparse.ArgumentParser(
        prog="python -m adamax_optax", description="adamax_optax commands"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train a Flax MLP on scikit-learn digits, against optax.adamax"
    )
    _demo.add_arguments(demo)
    bench = commands.add_parser(
        "bench", help="time updates against the memory-bandwidth floor"
    )
    _bench.add_arguments(bench)
    args = parser.parse_args(argv)
    return (_demo.run if args.command == "demo" else _bench.run)(args)


if __name__ == "__main__":
    main()
