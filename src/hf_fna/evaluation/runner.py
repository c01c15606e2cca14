"""The shared runner of `hf-fna eval`: exact and FNA attention on the same batches, timed, gathered across processes.

`run_evaluation(EvalSettings(...))` loads the model once, lets the task module feed batches through
`Runner.compare` (each batch runs with exact attention and with FNA, in alternating order, under
`accelerate` data parallelism and mixed precision), and returns an `EvalResult`: task metrics of both variants,
their agreement and their throughput. The main process writes the JSON report atomically at the very end, so a failed
run leaves no report behind, and prints a markdown table.
"""

from __future__ import annotations

import importlib
import json
import reprlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import FNAConfig
from ..errors import InputError, OutputPathError, ReferenceModeError, first_line
from ..integration.towers import patch_size, special_tokens, tower_config
from ..tools.measure import model_folder, progress_bar, quiet_loading
from ..tools.outputs import check_distinct_outputs, check_output_file
from ..tools.pipeline import EXACT, FNA, VARIANTS, AttentionSwitch, timed
from .modeling import (
    check_model_kind,
    fna_config_for,
    load_config,
    load_model,
)
from .report import Comparison, EvalResult, TaskOutcome, Timing, build_result, write_json_atomically
from .settings import TASKS, EvalSettings

Batch = tuple[dict[str, torch.Tensor], dict[str, Any]]  # (model inputs, targets kept aside for the metrics)


def make_accelerator(mixed_precision: str) -> Any:
    """An `Accelerator` with this mixed precision (the accelerate state is a process-wide singleton: it is reset when
    an earlier run in the same process chose another precision; the distributed state is kept)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision)


class Runner:
    """Holds the accelerator, the model and its `AttentionSwitch`; runs batches through both variants.

    With `reference` (an `ExactReference` of an earlier run on the same data) the exact variant is not run: its
    outputs and timings are replayed in the order they were recorded. Every run records its own in `exact_log`.
    """

    def __init__(
        self,
        settings: EvalSettings,
        model: Any,
        processor: Any,
        fna_config: FNAConfig,
        reference: ExactReference | None = None,
    ) -> None:
        self.settings = settings
        self.accelerator = make_accelerator(settings.mixed_precision)
        self.model = model.to(self.accelerator.device)
        self.processor = processor
        self.fna_config = fna_config
        self.switch = AttentionSwitch(model, fna_config)
        self.reference = reference
        self.exact_log: list[tuple[str, Any]] = []  # ("batch" | "timing" | "extract", value), in call order
        self._replay = iter(reference.log) if reference is not None else None

    def _replayed(self, kind: str) -> Any:
        entry = next(self._replay, None)
        if entry is None or entry[0] != kind:
            raise InputError(
                f"--reference {self.reference.path!r} does not match this run (expected a recorded {kind!r} step, "
                f"found {'nothing' if entry is None else repr(entry[0])}); record it again with --save-exact"
            )
        return entry[1]

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def loader(self, dataset: Any, collate: Callable[[list[dict]], Batch], batch_size: int | None = None) -> Any:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size or self.settings.batch_size,
            shuffle=False,
            collate_fn=collate,
            num_workers=self.settings.num_workers,
        )
        return self.accelerator.prepare_data_loader(loader)

    def _progress(self, loader: Iterable, description: str) -> Iterable:
        show = self.settings.show_progress and self.accelerator.is_local_main_process
        return progress_bar(loader, show=show, desc=description)

    def _forward(self, variant: str, step: Callable, inputs: dict[str, torch.Tensor]) -> tuple[dict, float]:
        self.switch.use(variant)

        def forward() -> dict:
            with torch.inference_mode(), self.accelerator.autocast():
                return step(self.model, inputs)

        return timed(forward, self.device)

    def compare(
        self,
        dataset: Any,
        collate: Callable[[list[dict]], Batch],
        step: Callable[[Any, dict[str, torch.Tensor]], dict[str, Any]],
        summarize: Callable[[dict, dict, dict], dict[str, Any]] | None = None,
        description: str = "exact vs fna",
    ) -> Comparison:
        """Run every batch with exact attention and with FNA (alternating which goes first) and gather the results.

        `step(model, inputs)` returns per-sample outputs (tensors with the batch first, or lists). `summarize(exact,
        fna, targets)` turns one batch's outputs into what is gathered (default: both outputs prefixed with
        `exact.`/`fna.`, and the targets). The first batch is a warm-up left out of the timing (unless it is the only
        one). Throughput: samples of all processes / seconds of the slowest process.
        """
        loader = self.loader(dataset, collate)
        summarize = summarize or _prefix_outputs
        timing = {variant: Timing() for variant in VARIANTS}
        gathered: list[dict[str, Any]] = []
        tokens = None
        for index, (inputs, targets) in enumerate(self._progress(loader, description)):
            inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
            if tokens is None and "pixel_values" in inputs:
                tokens = self._tokens_per_image(inputs["pixel_values"])
            outputs = {}
            for variant in VARIANTS if index % 2 == 0 else VARIANTS[::-1]:
                if variant == EXACT and self._replay is not None:
                    outputs[EXACT] = _to_device(self._replayed("batch"), self.device)
                    continue
                outputs[variant], seconds = self._forward(variant, step, inputs)
                if index > 0 or len(loader) == 1:
                    timing[variant].seconds += seconds
                    timing[variant].samples += _batch_length(inputs)
            if self._replay is None:
                self.exact_log.append(("batch", _to_device(outputs[EXACT], torch.device("cpu"))))
            gathered.append(self._gather(summarize(outputs[EXACT], outputs[FNA], targets)))
        self.switch.use(EXACT)
        merged = _concatenate(gathered)
        num_samples = len(next(iter(merged.values()))) if merged else 0
        reduced = self._reduce_timing(timing)
        if self._replay is not None:
            reduced[EXACT] = Timing(*self._replayed("timing"))
        else:
            self.exact_log.append(("timing", (reduced[EXACT].seconds, reduced[EXACT].samples)))
        return Comparison(merged, reduced, num_samples, tokens)

    def extract(
        self, dataset: Any, collate: Callable[[list[dict]], Batch], step: Callable, description: str = "exact"
    ) -> dict[str, Any]:
        """One pass with exact attention only (e.g. features of a probe's train split); outputs and targets."""
        if self._replay is not None:
            return self._replayed("extract")
        self.switch.use(EXACT)
        gathered = []
        for inputs, targets in self._progress(self.loader(dataset, collate), description):
            inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
            with torch.inference_mode(), self.accelerator.autocast():
                outputs = step(self.model, inputs)
            gathered.append(self._gather({**outputs, **targets}))
        merged = _concatenate(gathered)
        self.exact_log.append(("extract", merged))
        return merged

    def _gather(self, values: dict[str, Any]) -> dict[str, Any]:
        """`gather_for_metrics` of tensors (moved to CPU, as float32 when floating) and of per-sample lists."""
        tensors = {k: v.contiguous() for k, v in values.items() if torch.is_tensor(v)}
        out = {k: v.cpu() for k, v in self.accelerator.gather_for_metrics(tensors).items()} if tensors else {}
        out = {k: v.float() if v.is_floating_point() else v for k, v in out.items()}
        for key, value in values.items():
            if not torch.is_tensor(value):
                out[key] = list(self.accelerator.gather_for_metrics(list(value)))
        return out

    def _reduce_timing(self, timing: dict[str, Timing]) -> dict[str, Timing]:
        stats = torch.tensor([[timing[v].seconds, timing[v].samples] for v in VARIANTS], dtype=torch.float64)
        stats = self.accelerator.gather(stats.to(self.device)).cpu().reshape(-1, len(VARIANTS), 2)
        return {v: Timing(float(stats[:, i, 0].max()), int(stats[:, i, 1].sum())) for i, v in enumerate(VARIANTS)}

    def _tokens_per_image(self, pixel_values: torch.Tensor) -> int | None:
        config = tower_config(self.model.config)
        patch = patch_size(config)
        if not patch or pixel_values.dim() != 4:
            return None
        height, width = pixel_values.shape[-2:]
        special = special_tokens(config)
        return (height // patch) * (width // patch) + special.leading + special.trailing


def _to_device(value: Any, device: torch.device) -> Any:
    """`value` (tensors, or dicts and lists of them) moved to `device`; other values as they are."""
    if torch.is_tensor(value):
        return value.detach().to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _batch_length(inputs: dict[str, Any]) -> int:
    first = next(v for v in inputs.values() if torch.is_tensor(v))
    return int(first.shape[0])


def _prefix_outputs(exact: dict, fna: dict, targets: dict) -> dict[str, Any]:
    return {**{f"{EXACT}.{k}": v for k, v in exact.items()}, **{f"{FNA}.{k}": v for k, v in fna.items()}, **targets}


def _concatenate(batches: list[dict[str, Any]]) -> dict[str, Any]:
    if not batches:
        return {}
    out = {}
    for key in batches[0]:
        values = [batch[key] for batch in batches]
        out[key] = torch.cat(values) if torch.is_tensor(values[0]) else [x for value in values for x in value]
    return out


# --- agreement -----------------------------------------------------------------------------------------------------


# --- a saved exact reference ------------------------------------------------------------------------------------

# Settings that must agree between the run that recorded exact outputs and the FNA-only run replaying them.
_REFERENCE_KEYS = (
    "task", "model", "dataset", "split", "train_split", "limit", "train_limit", "seed", "batch_size", "image_size",
    "mixed_precision", "image_column", "label_column", "caption_column", "question_column", "answer_column",
    "mask_column", "class_names", "prompt", "ignore_index", "max_new_tokens",
)  # fmt: skip


REFERENCE_FORMAT = "hf_fna.exact_reference/1"


@dataclass
class ExactReference:
    """Exact-attention outputs and timings recorded by `hf-fna eval --save-exact`, replayed by `--reference`."""

    path: str
    fingerprint: dict[str, Any]
    log: list[tuple[str, Any]]
    recorded: dict[str, Any] = field(default_factory=dict)  # when, where and with what the reference was recorded


def reference_fingerprint(settings: EvalSettings, num_processes: int) -> dict[str, Any]:
    record = settings.to_dict()
    return {**{key: record.get(key) for key in _REFERENCE_KEYS}, "num_processes": num_processes}


def save_reference(path: str, settings: EvalSettings, runner: Runner, recorded: dict[str, Any]) -> None:
    """Write the exact outputs of `runner`'s run to `path` (torch.save, through a temporary file)."""
    import os
    import tempfile

    payload = {
        "format": REFERENCE_FORMAT,
        "fingerprint": reference_fingerprint(settings, runner.accelerator.num_processes),
        "log": runner.exact_log,
        "recorded": json.loads(json.dumps(recorded, default=str)),  # plain values: torch.load(weights_only=True)
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=folder)
    os.close(handle)
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def load_reference(path: str, settings: EvalSettings, num_processes: int) -> ExactReference:
    """Read an `--save-exact` file and check that it was recorded on the same task, model, data and batches.

    Raises:
        InputError: an unreadable file, or settings that differ (each named with both values).
    """
    try:  # weights_only: a file holding code is refused (UnpicklingError), never run
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # OSError, EOFError, RuntimeError (not a zip), UnpicklingError (bytes, code)...
        raise InputError(
            f"could not read --reference {path!r} (written by --save-exact?): {first_line(error, with_type=True)}"
        ) from error
    problem = _reference_problem(payload)
    if problem is not None:
        raise InputError(f"--reference {path!r} is not a file written by --save-exact: {problem}")
    fingerprint, log = payload["fingerprint"], payload["log"]
    expected = reference_fingerprint(settings, num_processes)
    differences = [
        f"{key}={fingerprint.get(key)!r} there, {value!r} here" for key, value in expected.items()
        if fingerprint.get(key) != value
    ]  # fmt: skip
    if differences:
        raise InputError(f"--reference {path!r} was recorded with other settings: {'; '.join(differences)}")
    return ExactReference(path, fingerprint, log, payload.get("recorded", {}))


def _reference_problem(payload: Any) -> str | None:
    """What makes a loaded `--reference` payload unusable, or None: its layout is checked before anything reads it."""
    if not isinstance(payload, dict):
        return f"it holds a {type(payload).__name__}, not a dict"
    if payload.get("format") != REFERENCE_FORMAT:
        return f"its format is {payload.get('format')!r}, expected {REFERENCE_FORMAT!r}"
    expected = {"fingerprint": dict, "log": list, "recorded": dict}
    for key, kind in expected.items():
        if not isinstance(payload.get(key, {}), kind) or (key != "recorded" and key not in payload):
            return f"its {key!r} is a {type(payload.get(key)).__name__}, expected a {kind.__name__}"
    steps = ("batch", "timing", "extract")
    for entry in payload["log"]:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and entry[0] in steps):
            return f"its log holds {reprlib.repr(entry)}, expected (step, value) pairs with step one of {steps}"
        if entry[0] == "timing" and not (
            isinstance(entry[1], (tuple, list)) and len(entry[1]) == 2 and all(_is_number(v) for v in entry[1])
        ):
            return f"its timing step holds {reprlib.repr(entry[1])}, expected (seconds, samples)"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- the whole run -------------------------------------------------------------------------------------------------


def run_evaluation(settings: EvalSettings) -> EvalResult:
    """Evaluate `settings.model` on `settings.task` with exact and FNA attention; see the module docstring.

    Bad input is reported before any weights load: options, the model config, the FNA settings, then the data.

    Raises:
        InputError: bad input (unknown task, a model that cannot do the task, missing columns, empty split...).
    """
    settings.check()
    outputs = {"--output": settings.output, "--save-exact": settings.save_exact}
    try:  # before any compute: a path that cannot be written fails now, not after the run
        check_distinct_outputs({**outputs, "--reference": settings.reference})
        for option, path in outputs.items():
            if path:
                try:
                    check_output_file(path)
                except OutputPathError as error:
                    raise OutputPathError(f"{option}: {error}") from None
    except OutputPathError as error:
        raise InputError(str(error)) from None
    task = importlib.import_module(TASKS[settings.task])
    model_path = model_folder(settings.model)
    config = load_config(model_path)
    check_model_kind(config, task.MODEL_KIND, settings.task)
    check_image_size(settings.image_size, tower_config(config))
    fna_config = settings.fna_config or fna_config_for(config, settings.fna_overrides)
    fna_config.resolve(int(tower_config(config).num_hidden_layers))
    if (settings.reference or settings.save_exact) and make_accelerator(settings.mixed_precision).num_processes > 1:
        raise InputError("--reference and --save-exact need a single process (the outputs are recorded per batch)")
    reference = load_reference(settings.reference, settings, 1) if settings.reference else None
    with quiet_loading(reports=False, progress_bars=not settings.show_progress):
        data = task.load_data(settings)
        model, processor = load_model(model_path, task.MODEL_KIND, settings.task)
    runner = Runner(settings, model, processor, fna_config, reference)
    try:
        outcome: TaskOutcome = task.run_task(runner, data)
    except ReferenceModeError as error:  # pinv="exact" from --fna-config with fewer landmarks than tokens
        raise InputError(str(error)) from None
    result = build_result(settings, outcome, fna_config, runner.accelerator.num_processes, runner.device)
    if reference is not None:
        recorded = ", ".join(f"{k} {v}" for k, v in reference.recorded.items())
        result.notes.append(
            f"exact attention was not run: its outputs and timing are replayed from {settings.reference} ({recorded}); "
            "the speed-up compares two runs, so it holds only if both ran on the same, equally loaded machine"
        )
    failures = []
    if runner.accelerator.is_main_process:
        print(result.to_markdown())  # first: a report that cannot be written must not take the table with it
        if settings.output:  # each output is tried even when the other fails
            try:
                write_json_atomically(settings.output, result.to_dict())
            except OSError as failure:
                failures.append(f"--output {settings.output} could not be written: {failure}")
        if settings.save_exact and reference is None:
            keys = ("finished", "machine", "device", "versions")
            try:
                save_reference(settings.save_exact, settings, runner, {k: result.settings[k] for k in keys})
            except (OSError, RuntimeError) as failure:  # torch.save reports some write errors as RuntimeError
                failures.append(f"--save-exact {settings.save_exact} could not be written: {failure}")
    runner.accelerator.wait_for_everyone()
    if failures:
        raise InputError(f"the table above is complete, but {'; '.join(failures)}")
    return result


def check_image_size(image_size: int | None, config: Any) -> None:
    """Raise `InputError` when `--image-size` is not a multiple of the tower's patch size (as `hf-fna compare`
    does): the patch embedding would silently drop the border pixels."""
    patch = patch_size(config)
    if image_size is None or patch is None or image_size % patch == 0:
        return
    low = image_size // patch * patch
    nearest = ", ".join(str(size) for size in (low, low + patch) if size > 0)
    raise InputError(
        f"--image-size {image_size} is not a multiple of the patch size {patch}; nearest valid sizes: {nearest}"
    )
