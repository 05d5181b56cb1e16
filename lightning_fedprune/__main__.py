"""``python -m lightning_fedprune ...``: see :mod:`lightning_fedprune.cli`."""

import sys

from lightning_fedprune.cli import main

if __name__ == "__main__":
    sys.exit(main())
