"""Command line: ``python -m adamax_optax demo`` (see :mod:`adamax_optax._demo`)."""

from __future__ import annotations

import argparse

from adamax_optax import _demo


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
    args = parser.parse_args(argv)
    return _demo.run(args)


if __name__ == "__main__":
    main()
