"""What the command-line tools (``fec_core.train``, ``fec_core.visualize``, ``fec_core.bench``)
share: an error the library raised on purpose is one line on stderr, its traceback only with
``--debug`` or the environment variable ``FEC_DEBUG=1``."""
from __future__ import annotations

import os
import sys
import traceback
from typing import Optional

__all__ = ["DEBUG_ENV", "DEBUG_HELP", "debugging", "one_line", "print_error"]

#: Set to 1 to see the traceback behind a one-line error (the same as ``--debug``).
DEBUG_ENV = "FEC_DEBUG"

DEBUG_HELP = f"on an error, print its traceback too (or set {DEBUG_ENV}=1)"


def debugging(flag: bool = False) -> bool:
    """``--debug`` given, or ``FEC_DEBUG`` set to anything but ``''`` / ``0``."""
    return bool(flag) or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (a multi-line message's lines joined with ``; ``)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return "; ".join(lines) or type(e).__name__


def print_error(message: str, e: Optional[BaseException] = None, debug: bool = False, lead: str = "") -> None:
    """``message`` as one line on stderr (after ``lead``, e.g. a newline that ends a progress
    bar's line), preceded by the traceback of ``e`` when debugging."""
    if e is not None and debugging(debug):
        traceback.print_exception(type(e), e, e.__traceback__)
    print(lead + " ".join(line.strip() for line in message.splitlines() if line.strip()), file=sys.stderr)
