"""What the command-line tools show of the library's log: readout's INFO lines, on stderr.

The library logs through ``logging.getLogger(__name__)`` and sets up no handler (a program that
imports readout configures logging as it likes). Each ``python -m readout.<tool>`` calls
:func:`show_info` first, so that lines such as the precision that ``precision="auto"`` chose and the
time of each compile reach the user; without a handler Python would show warnings only.
"""

from __future__ import annotations

import logging
import sys


class _Stderr(logging.Handler):
    """Writes to ``sys.stderr`` as it is at each line, not at creation (a test's captured stream, a
    redirect made later)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def show_info() -> None:
    """readout's INFO and above on stderr, as bare messages (once per process)."""
    logger = logging.getLogger("readout")
    if any(isinstance(handler, _Stderr) for handler in logger.handlers):
        return
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
