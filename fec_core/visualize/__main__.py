"""``python -m fec_core.visualize``: see :mod:`fec_core.visualize.cli`."""
import sys

from .cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
