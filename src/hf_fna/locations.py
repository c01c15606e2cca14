"""Where a model, a config or a dataset comes from: a local path, or a Hub repo id. Decided at once.

A string that names no existing file or folder goes to the Hub, where `huggingface_hub` retries an unreachable
server for about 25 s per file before a generic "cannot find the requested files" that names no local path. A
mistyped local folder (`--config my-setings`) must fail at once and say which local path does not exist:
`check_local_path` refuses a broken link, a string that can only be a local path, a string that is not a repo id,
and a repo id while the Hub is offline or unreachable and holds no cached copy of that repo.
"""

from __future__ import annotations

import os

# How long the one request that tells whether the Hub answers may take (a dead network fails at once; a firewall
# that drops packets costs this long, instead of the retries of every download).
HUB_PROBE_TIMEOUT_S = 10.0

_TRUE = ("1", "ON", "YES", "TRUE")


def check_local_path(path: str, kind: str = "model") -> None:
    """Raise `OSError` at once when `path` names no existing file or folder and cannot be used as a Hub repo id.

    `kind` ("model" or "dataset") is the kind of Hub repo the string would name (for its cache folder).
    """
    if os.path.exists(path):
        return
    local = os.path.abspath(os.path.expanduser(path))
    if os.path.lexists(path):
        raise OSError(f"{path!r} is a broken symbolic link or a symbolic link loop ({local}).")
    if _only_local(path):
        raise OSError(f"{path!r} does not exist (no such file or folder: {local}).")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        raise OSError(f"{path!r} does not exist (no such file or folder, and not a Hub repo id).") from None
    if _in_hub_cache(path, kind):
        return  # the Hub client falls back to its cached copy
    reason = hub_unavailable()
    if reason is not None:
        parent = path.split("/")[0]
        hint = f" (the folder {parent!r} exists)" if "/" in path and os.path.isdir(parent) else ""
        raise OSError(
            f"{path!r} does not exist (no such file or folder: {local}){hint}, and it cannot be a Hub {kind} repo "
            f"here: {reason}."
        )


def hub_unavailable() -> str | None:
    """Why the Hub cannot be used now (offline mode, or no answer to one request), or None when it answers."""
    from huggingface_hub import constants

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").upper() in _TRUE:
            return f"the Hub is off ({variable}={os.environ[variable]})"
    if constants.HF_HUB_OFFLINE:
        return "the Hub is off (offline mode)"
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as error:  # httpx or requests, depending on the huggingface_hub version: any failure means no
        lines = str(error).strip().splitlines()
        return f"{constants.ENDPOINT} cannot be reached ({lines[0] if lines else type(error).__name__})"
    return None


def _only_local(path: str) -> bool:
    """Whether `path` can only be a local path: absolute, relative to `.` or `~`, or with more separators than a repo
    id (`namespace/name`) has."""
    separators = [os.sep, *([os.altsep] if os.altsep else [])]
    if os.path.isabs(path) or path.startswith((".", "~")):
        return True
    if any(separator != "/" and separator in path for separator in separators):
        return True
    return path.count("/") > 1


def _in_hub_cache(repo_id: str, kind: str) -> bool:
    """Whether the Hub cache (or, for a dataset, the `datasets` cache) holds a folder of this repo: the libraries
    can then work from it offline."""
    from huggingface_hub import constants

    folder = f"{kind}s--{repo_id.replace('/', '--')}"
    if os.path.isdir(os.path.join(constants.HF_HUB_CACHE, folder)):
        return True
    if kind != "dataset":
        return False
    try:
        from datasets import config
        from datasets.naming import camelcase_to_snakecase
    except ImportError:
        return False
    *namespace, name = repo_id.split("/")  # datasets caches "user/SomeSet" as "user___some_set"
    return os.path.isdir(os.path.join(config.HF_DATASETS_CACHE, "___".join([*namespace, camelcase_to_snakecase(name)])))
