"""``python -m fec_core.train``: see :mod:`fec_core.train.cli`."""
import sys

from .cli import main

sys.exit(main())
