"""Helpers shared by the benchmarks: timing, machine description, result files."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from hf_fna.tools.measure import machine_info, machine_line

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

__all__ = [
    "RESULTS_DIR",
    "add_report_arguments",
    "config_name",
    "load_saved_model",
    "machine_info",
    "machine_line",
    "parse_config",
    "pick_device",
    "report",
    "time_call",
    "wait_for_idle",
    "write_results",
]


def load_saved_model(path: str, implementation: str) -> torch.nn.Module:
    """The model class the folder's config names (CLIP's `CLIPVisionModelWithProjection` keeps its projection), in
    eval mode with `implementation` as its attention."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    model_class = getattr(transformers, (config.architectures or ["AutoModel"])[0])
    return model_class.from_pretrained(path, attn_implementation=implementation).eval()


def parse_config(text: str) -> tuple[str, int, dict[str, Any]]:
    """`SCHEDULE@M[/field=value...]` -> (schedule, m, FNAConfig options); `masking.<field>=value` sets a masking field.

    E.g. `6:@64`, `6:@64/sampling=quickfps`, `none@64/masking.intervention=sink` (exact attention with sinking).
    """
    head, *pairs = text.split("/")
    schedule, landmarks = head.rsplit("@", 1)
    options: dict[str, Any] = {}
    for pair in pairs:
        name, raw = pair.split("=", 1)
        value: Any = {"true": True, "false": False, "null": None}.get(raw.lower(), raw)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(raw) if "." in raw else int(raw)
        owner, _, field = name.rpartition(".")
        (options.setdefault(owner, {}) if owner else options)[field] = value
    return schedule, int(landmarks), options


def config_name(schedule: str, landmarks: int, options: dict[str, Any]) -> str:
    """The inverse of `parse_config`, options sorted."""
    flat = {
        f"{key}.{k}" if isinstance(value, dict) else key: v
        for key, value in options.items()
        for k, v in (value.items() if isinstance(value, dict) else [(key, value)])
    }
    return "/".join([f"{schedule}@{landmarks}", *(f"{k}={str(v).lower()}" for k, v in sorted(flat.items()))])


def _cpu_busy(interval: float) -> float | None:
    """Fraction of all CPUs busy over `interval` seconds (this process sleeps meanwhile), from /proc/stat."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="utf-8") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_idle(threshold: float = 0.1, max_wait: float = 900.0, interval: float = 0.5) -> dict[str, float | None]:
    """Wait until other processes use less than `threshold` of the CPUs (shared machines), at most `max_wait` s.

    Returns the seconds waited and the last busy fraction seen, to store next to the timing.
    """
    began = time.perf_counter()
    busy = _cpu_busy(interval)
    while busy is not None and busy > threshold and time.perf_counter() - began < max_wait:
        busy = _cpu_busy(interval)
    return {"waited_s": time.perf_counter() - began, "busy_before": busy}


def pick_device(name: str | None) -> torch.device:
    """`name`, or CUDA when available, else CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def time_call(
    fn: Callable[[], Any],
    device: torch.device,
    warmup: int = 1,
    repeats: int = 5,
    min_seconds: float = 0.0,
    max_idle_wait: float = 900.0,
) -> dict[str, float]:
    """Wall-clock seconds of `fn()` under `torch.inference_mode`: `warmup` untimed calls, then at least `repeats` timed
    calls (more until `min_seconds` have passed), after waiting (at most `max_idle_wait` s) for other processes to
    leave the CPUs idle.
    Returns min, median, the number of timed calls and the idle wait."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    idle = {"waited_s": 0.0, "busy_before": None}
    if device.type == "cpu" and max_idle_wait > 0:
        idle = wait_for_idle(max_wait=max_idle_wait)
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync()
        began = time.perf_counter()
        while len(times) < repeats or time.perf_counter() - began < min_seconds:
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    return {"min": min(times), "median": statistics.median(times), "calls": len(times), **idle}


def write_results(report: dict[str, Any], table: str, json_path: str | None, markdown_path: str | None) -> None:
    """Write the JSON report and/or the markdown (command line, machine line, table)."""
    for path in (json_path, markdown_path):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    if markdown_path:
        with open(markdown_path, "w", encoding="utf-8") as f:
            f.write(f"`{report['command']}`\n\n{machine_line(report['machine'])}\n\n{table}\n")


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """`--max-idle-wait`, `--json` and `--markdown`, shared by the timing benchmarks."""
    parser.add_argument(
        "--max-idle-wait",
        type=float,
        default=900.0,
        help="before each timing, wait up to this many seconds for other processes to leave the CPUs "
        "idle (shared machines; 0: do not wait)",
    )
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--markdown", metavar="PATH")


def report(
    args: argparse.Namespace, device: torch.device, machine: dict[str, Any], rows: list[dict], table: str, caption: str
) -> None:
    """Print the machine line, `caption` and the markdown `table`, and write the JSON/markdown result files.

    The load average at the end is stored beside the one at the start, to show whether the machine stayed quiet.
    """
    machine["load_average_end"] = machine_info(device)["load_average"]
    print(machine_line(machine))
    print(caption + "\n")
    print(table)
    result = {"command": command_line(), "settings": vars(args), "machine": machine, "rows": rows}
    write_results(result, table, args.json, args.markdown)


def command_line() -> str:
    """The command that is running, for the result files."""
    return " ".join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]])
