"""The one base class of every error a user can fix.

The command line turns any `EqLenError` into exit code 2 and its message (a few lines
naming the file, column, row or function and what to do), with no traceback. Everything
else is a bug of ours and keeps its traceback.
"""

from __future__ import annotations


class EqLenError(Exception):
    """A mistake in the user's input (config, data, model, reward code, run directory)."""
