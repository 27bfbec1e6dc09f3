"""``python -m adamax_optax demo``: see :mod:`adamax_optax._demo`."""

from adamax_optax._demo import main

if __name__ == "__main__":
    main()
