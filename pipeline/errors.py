"""The base class of every error that describes bad input.

A ``UserError`` names the file, key or value, the rule it broke and the fix, in one line; the
``pipeline`` command prints it without a traceback and exits 2. Any other exception is a bug
and keeps its traceback. Subclass it (beside ``ValueError`` or ``RuntimeError`` where callers
already catch those) instead of registering classes by name anywhere.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, explained in one line: printed as ``pipeline CMD: error: MESSAGE``."""
