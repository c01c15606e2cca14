"""Output files of the command line: checked before any compute, written atomically.

A long run must not end in a traceback because its output path was bad, nor leave a truncated file in place of a
good one. `check_output_file` / `check_output_folder` try the path up front (a probe file in its folder, or in the
nearest existing one), `check_distinct_outputs` refuses two options naming one file (the second write would
silently replace the first); `write_atomically` writes through a temporary file in the same folder and
`os.replace`, so a reader sees the old file or the new one, never a partial one. `write_files_atomically` does the
same for a set of files that belong together (`fna_config.json` and its model card): every file is written to a
temporary file first, and only when all are complete are they renamed into place, so a failure leaves the old set.
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


def check_distinct_outputs(paths: dict[str, str | None]) -> None:
    """Raise `OutputPathError` when two options (`{"--json": path, ...}`) name the same file: the second write would
    silently replace the first. Paths are compared after resolving `..`, `~` and symbolic links."""
    seen: dict[str, str] = {}
    for option, path in paths.items():
        if not path:
            continue
        resolved = os.path.realpath(os.path.expanduser(path))
        for other, earlier in seen.items():
            hard_links = os.path.exists(earlier) and os.path.exists(resolved) and os.path.samefile(earlier, resolved)
            if earlier == resolved or hard_links:
                raise OutputPathError(
                    f"{other} and {option} both name {path}; give each output its own file (one would silently "
                    "replace the other)"
                )
        seen[option] = resolved


def check_output_set(folder: str, names: list[str]) -> None:
    """Raise `OutputPathError` unless every file `names` can be written into `folder` (created if missing): the
    folder is tried and no target may be a folder, so that writing the set cannot fail halfway on one of them."""
    check_output_folder(folder)
    for name in names:
        target = os.path.join(folder, name)
        if os.path.isdir(target):
            raise OutputPathError(f"cannot write {target}: it is a folder; nothing in {folder} was written")


def write_atomically(path: str, write: Callable[[IO[Any]], None], binary: bool = False) -> None:
    """Call `write(file)` on a temporary file next to `path`, then rename it over `path`.

    On any failure the temporary file is removed and an existing file at `path` is left untouched.
    """
    temporary = _staged(path, write, binary)
    try:
        os.replace(temporary, path)
    except BaseException:
        _remove(temporary)
        raise


def write_files_atomically(folder: str, files: dict[str, str | bytes]) -> list[str]:
    """Write a set of files (`{name: text or bytes}`) into `folder` as one: all are written to temporary files in the
    folder, then renamed into place. A failure before the renames (a full disk, a target that is a folder) leaves
    every existing file untouched and no temporary file behind. Returns the paths written."""
    check_output_set(folder, list(files))
    staged: list[tuple[str, str]] = []
    try:
        for name, content in files.items():
            path = os.path.join(folder, name)
            binary = isinstance(content, bytes)
            staged.append((_staged(path, lambda f, content=content: f.write(content), binary), path))
        for temporary, path in staged:
            os.replace(temporary, path)
    except BaseException:
        for temporary, _ in staged:
            _remove(temporary)
        raise
    return [path for _, path in staged]


def _staged(path: str, write: Callable[[IO[Any]], None], binary: bool) -> str:
    """`write(file)` on a complete, synced temporary file next to `path`; returns its name (removed on failure)."""
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
    except BaseException:
        _remove(temporary)
        raise
    return temporary


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)


def write_json_atomically(path: str, payload: Any, **dump_kwargs: Any) -> None:
    """`json.dump(payload)` to `path` through `write_atomically` (a failed dump leaves an existing file intact)."""

    def dump(f: IO[str]) -> None:
        json.dump(payload, f, **{"indent": 2, **dump_kwargs})
        f.write("\n")

    write_atomically(path, dump)
