"""Output files of the command line: checked before any compute, written atomically.

A long run must not end in a traceback because its output path was bad, nor leave a truncated file in place of a
good one. `check_output_file` / `check_output_folder` try the path up front (a probe file in its folder, or in the
nearest existing one); `write_atomically` writes through a temporary file in the same folder and `os.replace`, so a
reader sees the old file or the new one, never a partial one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any

from ..errors import OutputPathError, first_line


def _probe_folder(folder: str, path: str) -> None:
    """Check that a file can be created in `folder`, or in its nearest existing ancestor when it does not exist yet
    (it is created when the file is written, so a run that fails before then leaves no empty folder behind)."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputPathError(f"cannot write {path}: {existing} is not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".hf_fna-probe-", dir=existing)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise OutputPathError(f"cannot write {path}: {first_line(error)}") from None


def check_output_file(path: str) -> None:
    """Raise `OutputPathError` unless a file can be written at `path` (its folder is created if missing)."""
    if os.path.isdir(path):
        raise OutputPathError(f"cannot write {path}: it is a folder; give a file name")
    _probe_folder(os.path.dirname(os.path.abspath(path)), path)


def check_output_folder(path: str) -> None:
    """Raise `OutputPathError` unless files can be written into the folder `path` (created if missing)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputPathError(f"cannot write into {path}: it is a file, not a folder")
    _probe_folder(path, path)


def write_atomically(path: str, write: Callable[[IO[Any]], None], binary: bool = False) -> None:
    """Call `write(file)` on a temporary file next to `path`, then rename it over `path`.

    On any failure the temporary file is removed and an existing file at `path` is left untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1]  # writers such as matplotlib infer the format from the extension
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".partial{suffix}", dir=folder)
    try:
        with os.fdopen(handle, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)  # mkstemp creates owner-only files
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def write_json_atomically(path: str, payload: Any, **dump_kwargs: Any) -> None:
    """`json.dump(payload)` to `path` through `write_atomically` (a failed dump leaves an existing file intact)."""

    def dump(f: IO[str]) -> None:
        json.dump(payload, f, **{"indent": 2, **dump_kwargs})
        f.write("\n")

    write_atomically(path, dump)
