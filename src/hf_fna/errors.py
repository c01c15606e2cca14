"""The errors hf_fna raises about input a user can fix.

Library code raises them itself, where the bad value is found: a bad setting of `FNAConfig`, a bad layer string or
a bad argument of an op is an `InputError` (the wrong kind of value, a string for a count, stays a `TypeError`), so
callers need not re-wrap them. They are `ValueError`s, `OSError`s and `RuntimeError`s, so code that catches those
keeps working. The `hf-fna` commands print any `FNAError` as one line and exit with status 2, without a traceback.
"""

from __future__ import annotations


class FNAError(Exception):
    """Base class of the errors about input a user can fix (`hf-fna` prints them as one line, exit status 2)."""


class InputError(FNAError, ValueError):
    """A bad option, model, dataset, image or file; the message names the value and what would be accepted."""


class OutputPathError(FNAError, OSError):
    """An output path that cannot be written; the message names the path and the reason."""


class AssetError(FNAError, RuntimeError):
    """A real asset (weights or data) cannot be obtained; the message says how to get it."""


class ReferenceModeError(FNAError, ValueError):
    """`pinv="exact"` asked to do what the reference mode cannot: fewer landmarks than tokens, or training."""


def first_line(error: BaseException, with_type: bool = False) -> str:
    """The first line of an error's message, for one-line reports: prefixed with the error's type name when
    `with_type` (for errors of other libraries, whose type says what failed), the type name alone when it is empty."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    return f"{type(error).__name__}: {lines[0]}" if with_type else lines[0]
