"""``python -m fec_core.bench``: see :mod:`fec_core.bench`."""
import sys

from .cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
