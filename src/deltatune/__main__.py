"""``python -m deltatune``: the command line, as torchrun starts it (``torchrun -m deltatune train ...``)."""

import sys

from deltatune.cli import main

if __name__ == "__main__":
    sys.exit(main())
