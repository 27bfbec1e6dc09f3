"""Benchmarks: ``python benchmarks/bench.py`` is ``python -m adamax_optax bench``.

See benchmarks/RESULTS.md for the results and what they mean.
"""

from adamax_optax._bench import main

if __name__ == "__main__":
    main()
