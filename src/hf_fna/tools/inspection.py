"""`hf-fna inspect`: massive / artifact tokens of a vision transformer, layer by layer, and the landmarks FNA picks.

One image goes through the model twice:

1. with exact attention, recording every layer's hidden states (`output_hidden_states=True`) and, through a private
   attention function registered in `AttentionInterface`, every layer's head-averaged attention probabilities
   (computed from the layer's own queries and keys, one layer at a time, so memory stays O(N^2) for one layer
   instead of O(L H N^2) for `output_attentions=True`). Per layer it reports the patch-token norm statistics, the
   tokens flagged by `detect_high_norm_tokens` (norm above `--min-ratio` times the median, the default detector of
   `MaskingConfig`; `--detect norm_gap`: `detect_massive_tokens`, the largest gap in log norms) and by
   `detect_attention_sinks` (outliers of
   incoming attention), as (row, col) positions on the patch grid;
2. with `FNAConfig(layers=..., num_landmarks=..., min_tokens=0)` applied, reading the landmark tokens chosen at the
   first FNA layer (`hf_fna.last_landmarks`).

Figures (matplotlib, Agg): `<image>_<res>_norms.png`, the patch-token norm map of every layer, each on its own log
colour scale (a massive token stands out within its layer whatever the layer's overall norm), flagged tokens
marked; `<image>_<res>_landmarks.png`, the landmarks in pick order on the model's input image and on the norm map
of the tokens entering the first FNA layer. Special tokens (CLS, registers) are always
landmarks; they are listed, not drawn.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import FNAConfig
from ..errors import AssetError, InputError, OutputPathError, first_line
from ..integration.plans import NORM_DETECTORS
from ..integration.towers import attention_layers, interpolation_kwargs, special_token_names, tower_config
from ..schedules import parse_layers
from .arguments import add_fna_arguments
from .measure import device_from_option, model_folder, quiet_loading
from .outputs import (
    check_distinct_outputs,
    check_output_file,
    check_output_folder,
    write_atomically,
    write_json_atomically,
)
from .pipeline import EXACT, FNA, AttentionSwitch, ImagePreprocessing, load_model

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torch import nn

INSPECT_ATTENTION = "hf_fna_inspect"  # exact (SDPA) attention that also reports the attention probabilities
DEFAULT_IMAGE = "astronaut"
DEFAULT_RESOLUTION = 224
DEFAULT_OUT = "hf-fna-inspect"
_SHOWN_FLAGS = 6  # flagged tokens printed per table cell (the JSON holds all)

Position = tuple[int, int]


@dataclass
class InspectedLayer:
    """What one layer shows: patch-token norm statistics of its output and the flagged tokens."""

    layer: int
    norms: dict[str, float]  # min, median, mean, max, max_over_median of the patch tokens of the layer output
    massive: list[Position]  # the norm detector (`detect`) on the layer output
    sinks: list[Position]  # detect_attention_sinks on the layer's attention probabilities


@dataclass
class Inspection:
    """The result of `inspect_image`; `asdict` of it is the `--json` output."""

    model: str
    image: str
    resolution: int
    input_size: tuple[int, int]  # (height, width) of the pixel values fed to the model
    patch_size: int
    grid: tuple[int, int]  # patch rows, patch columns
    special_tokens: list[str]  # names of the leading non-patch tokens (CLS, registers, ...)
    layers: list[InspectedLayer]
    fna_layers: list[int]
    num_landmarks: int
    landmarks: list[Position]  # patch landmarks, in the order farthest point sampling picked them
    special_landmarks: list[int]  # token indices of the special tokens among the landmarks
    figures: dict[str, str] = field(default_factory=dict)
    detector: str = "norm_ratio"  # what flagged `InspectedLayer.massive`


# ------------------------------------------------------------------------------------------------ command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="model folder or Hub id, or hf_fna:dinov2-small (the default; fine-tuned for saliency) or hf_fna:clip-b16",
    )
    parser.add_argument(
        "--image", default=DEFAULT_IMAGE, help=f"image file, or the name of a bundled photo (default: {DEFAULT_IMAGE})"
    )
    parser.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION, help="input side in pixels (default 224)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the PNG figures (default: ./{DEFAULT_OUT})")
    parser.add_argument("--json", help="also write all measured numbers, landmarks and figure paths to this JSON file")
    parser.add_argument("--max-tokens", type=int, help="at most this many flagged tokens per layer (default: all)")
    parser.add_argument(
        "--detect",
        choices=NORM_DETECTORS,
        default="norm_ratio",
        help="massive tokens from the norms: norm_ratio (above --min-ratio x the median, the default) or norm_gap",
    )
    parser.add_argument("--min-ratio", type=float, default=10.0, help="norm_ratio: multiple of the median that flags")
    parser.add_argument("--min-gap", type=float, default=1.0, help="norm_gap: smallest log-norm gap that flags")
    parser.add_argument("--std-threshold", type=float, default=3.0, help="attention: outlier threshold in std")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_fna_arguments(parser, ("layers", "num_landmarks"))


def run(args: argparse.Namespace) -> int:
    num_landmarks = FNAConfig().num_landmarks if args.num_landmarks is None else args.num_landmarks
    if args.resolution < 1 or num_landmarks < 1 or (args.max_tokens is not None and args.max_tokens < 1):
        raise InputError("--resolution, --num-landmarks and --max-tokens must be positive integers")
    thresholds = (("--min-gap", args.min_gap), ("--min-ratio", args.min_ratio), ("--std-threshold", args.std_threshold))
    for option, value in thresholds:
        if not math.isfinite(value) or value < 0:
            raise InputError(f"{option} must be a finite number >= 0; got {value}")
    layers = parse_layers(args.layers)
    try:  # before minutes of compute depend on them
        check_output_folder(args.out)
        if args.json:
            check_output_file(args.json)
    except OutputPathError as e:
        raise InputError(str(e)) from None
    device = device_from_option(args.device)
    image, image_name = load_image(args.image)
    paths = figure_paths(Path(args.out), image_name, args.resolution)
    figures = {f"the {name} figure": str(path) for name, path in paths.items()}
    try:
        check_distinct_outputs({"--json": args.json, **figures})
    except OutputPathError as e:
        raise InputError(str(e)) from None
    with _step("loading the model"):
        model_path = model_folder(args.model)
        model, processor = load_vision_model(model_path, device)
    failures = []
    try:
        result = inspect_image(
            model,
            processor,
            image,
            resolution=args.resolution,
            fna_layers=layers,
            num_landmarks=num_landmarks,
            max_tokens=args.max_tokens,
            detect=args.detect,
            min_ratio=args.min_ratio,
            min_gap=args.min_gap,
            std_threshold=args.std_threshold,
            model_name=model_path,
            image_name=image_name,
            out=Path(args.out),
        )
    except FigureError as e:  # the measurements are complete: print them anyway
        result = e.result
        failures.append(str(e))
    print(format_report(result))
    if args.json:
        try:
            write_json_atomically(args.json, asdict(result))
            result.figures["json"] = args.json
        except OSError as e:
            failures.append(f"cannot write --json {args.json}: {first_line(e, with_type=True)}")
    for name, path in result.figures.items():
        print(f"wrote {name}: {path}")
    if failures:
        raise InputError(f"the report above is complete, but {'; '.join(failures)}")
    return 0


class FigureError(InputError):
    """A figure could not be written; `result` holds the complete measurements."""

    def __init__(self, message: str, result: Inspection) -> None:
        super().__init__(message)
        self.result = result


@contextmanager
def _step(message: str) -> Iterator[None]:
    """Progress on stderr for a step that may take a while."""
    print(f"[hf-fna inspect] {message} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"[hf-fna inspect] {message}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ inputs
def load_image(spec: str) -> tuple[Image.Image, str]:
    """An RGB image from a file path, or a bundled photo by name; returns it with a short name for file names."""
    from PIL import Image, UnidentifiedImageError

    from ..assets import PHOTO_NAMES

    path = Path(spec)
    if path.is_file():
        try:
            with Image.open(path) as image:
                return image.convert("RGB"), path.stem
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"cannot read image {spec}: {first_line(e, with_type=True)}") from e
    if spec in PHOTO_NAMES:
        from ..assets import photos

        try:
            dataset = photos()
        except AssetError as e:
            raise InputError(f"bundled photos unavailable: {first_line(e, with_type=True)}") from e
        return dataset[dataset["name"].index(spec)]["image"].convert("RGB"), spec
    if path.suffix or os.sep in spec:
        raise InputError(f"image file not found: {spec}")
    raise InputError(f"{spec!r} is neither an image file nor a bundled photo; photos: {', '.join(PHOTO_NAMES)}")


def load_vision_model(name_or_path: str, device: torch.device | str = "cpu") -> tuple[nn.Module, Any]:
    """The vision transformer of a checkpoint (the vision tower of CLIP/SigLIP-style models), running the inspection
    attention, and its image processor (None when it has none: ImageNet statistics then apply).

    Raises:
        InputError: the checkpoint cannot be read, is not a patch-based vision transformer, or its vision weights are
            missing.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    from ..locations import check_local_path

    _register_inspect_attention()
    with quiet_loading():
        try:
            check_local_path(name_or_path)
            config = AutoConfig.from_pretrained(name_or_path)
        except (OSError, ValueError, KeyError, RecursionError) as e:  # RecursionError: a config.json nested too deep
            raise InputError(f"cannot load model {name_or_path}: {first_line(e, with_type=True)}") from e
        tower = tower_config(config)
        if not all(hasattr(tower, a) for a in ("patch_size", "num_hidden_layers", "num_attention_heads")):
            raise InputError(
                f"{name_or_path} ({config.model_type}) is not a vision transformer: inspect supports ViT, DeiT, "
                "DINOv2, CLIP and SigLIP vision towers"
            )
        model_class = MODEL_MAPPING.get(type(tower), None)
        if model_class is None:
            raise InputError(f"{name_or_path}: no vision model class for {tower.model_type}")
        loaded = load_model(name_or_path, model_class, attn_implementation=INSPECT_ATTENTION, strict=True)
    return loaded.model.to(device), loaded.processor


# ------------------------------------------------------------------------------------------------ measurement
_RECORDERS: weakref.WeakKeyDictionary[Any, Callable[[torch.Tensor], None]] = weakref.WeakKeyDictionary()


def _inspect_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact SDPA attention; modules with a recorder also get their head-averaged attention probabilities."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ..ops.nystrom import key_bias_from_mask
    from ..ops.sinks import attention_probabilities

    recorder = _RECORDERS.get(module)
    if recorder is not None:
        key_bias, per_key = key_bias_from_mask(attention_mask, query.dtype)
        if not per_key:
            raise InputError("hf-fna inspect supports bidirectional attention with per-key masks only")
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        with torch.no_grad():
            recorder(attention_probabilities(query, key, scale, key_bias))
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def _register_inspect_attention() -> None:
    """Make `attn_implementation="hf_fna_inspect"` available (idempotent; done when a model is loaded)."""
    from transformers import AttentionInterface

    AttentionInterface.register(INSPECT_ATTENTION, _inspect_attention_forward)


def _forward_kwargs(model: nn.Module, pixel_values: torch.Tensor) -> dict[str, Any]:
    return {"pixel_values": pixel_values, **interpolation_kwargs(model)}


def _positions(flags: torch.Tensor, special: int, columns: int) -> list[Position]:
    return [divmod(int(i) - special, columns) for i in flags.nonzero().flatten().tolist()]


def inspect_image(
    model: nn.Module,
    processor: Any | None,
    image: Image.Image,
    resolution: int = DEFAULT_RESOLUTION,
    fna_layers: str | list[int] = "auto",
    num_landmarks: int = 64,
    max_tokens: int | None = None,
    detect: str = "norm_ratio",
    min_ratio: float = 10.0,
    min_gap: float = 1.0,
    std_threshold: float = 3.0,
    model_name: str = "",
    image_name: str = "image",
    out: Path | None = None,
) -> Inspection:
    """Measure one image (see the module docstring) and, when `out` is given, write the two figures there.

    `detect` ("norm_ratio" or "norm_gap", with `min_ratio` / `min_gap`) flags massive tokens from each layer's norms;
    attention sinks are flagged with `std_threshold`; `max_tokens` bounds both (None: no bound).

    `model` must come from `load_vision_model` (its exact attention runs through the inspection function); the image
    is prepared as `processor` says (`pipeline.ImagePreprocessing`). After the call the model runs FNA with the given
    settings.
    """
    import torch

    from ..integration.explain import last_landmarks
    from ..ops.sinks import detect_attention_sinks, detect_high_norm_tokens, detect_massive_tokens, norm_statistics

    config = model.config
    names = special_token_names(config)
    special = len(names)
    patch = int(config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0])
    if resolution < patch:
        raise InputError(f"--resolution {resolution} is smaller than the patch size ({patch} px)")
    preprocessing = ImagePreprocessing.from_processor(processor)
    pixel_values = preprocessing.pixels([image], resolution).to(next(model.parameters()).device)
    height, width = pixel_values.shape[-2:]
    grid = (height // patch, width // patch)
    tokens = grid[0] * grid[1] + special
    if num_landmarks > tokens:
        raise InputError(f"--num-landmarks {num_landmarks} exceeds the {tokens} tokens of a {height}x{width} input")

    _register_inspect_attention()
    fna_config = FNAConfig(layers=fna_layers, num_landmarks=num_landmarks, min_tokens=0)
    # The exact variant is the inspection attention (SDPA that also reports the attention probabilities).
    switch = AttentionSwitch(model, fna_config, exact_implementation=INSPECT_ATTENTION)
    chosen_layers = fna_config.resolve(config.num_hidden_layers).fna_layers
    if not chosen_layers:
        raise InputError(f"--layers {fna_layers} selects no layer, so FNA chooses no landmarks")
    modules = attention_layers(model)
    if sorted(modules) != list(range(config.num_hidden_layers)):
        raise InputError(
            f"{type(model).__name__} does not dispatch its attention through transformers' AttentionInterface; "
            "inspect supports ViT, DeiT, DINOv2, CLIP and SigLIP vision towers"
        )
    sinks: dict[int, torch.Tensor] = {}
    for index, module in modules.items():

        def record(probs: torch.Tensor, index: int = index) -> None:
            sinks[index] = detect_attention_sinks(
                probs, std_threshold=std_threshold, max_tokens=max_tokens, num_special_tokens=special
            )[0]

        _RECORDERS[module] = record
    try:
        switch.use(EXACT)
        with _step(f"exact forward pass, {tokens} tokens, {config.num_hidden_layers} layers"), torch.no_grad():
            hidden_states = model(**_forward_kwargs(model, pixel_values), output_hidden_states=True).hidden_states
    finally:
        for module in modules.values():
            _RECORDERS.pop(module, None)
    if hidden_states[-1].shape[1] != tokens or len(hidden_states) != config.num_hidden_layers + 1:
        raise InputError(f"{type(model).__name__}: unexpected hidden states ({hidden_states[-1].shape[1]} tokens)")

    layers = []
    for index, states in enumerate(hidden_states[1:]):
        if detect == "norm_ratio":
            massive = detect_high_norm_tokens(states, min_ratio, max_tokens, num_special_tokens=special)
        else:
            massive = detect_massive_tokens(states, min_gap=min_gap, max_tokens=max_tokens, num_special_tokens=special)
        layers.append(
            InspectedLayer(
                layer=index,
                norms=norm_statistics(states, num_special_tokens=special),
                massive=_positions(massive[0], special, grid[1]),
                sinks=_positions(sinks[index], special, grid[1]),
            )
        )

    switch.use(FNA)
    with (
        _step(f"FNA forward pass, layers {chosen_layers[0]}..{chosen_layers[-1]}, {num_landmarks} landmarks"),
        torch.no_grad(),
    ):
        model(**_forward_kwargs(model, pixel_values))
    picked = last_landmarks(model)
    if picked is None:  # pragma: no cover - min_tokens=0 and num_landmarks <= tokens make FNA run
        raise InputError("FNA did not run, so no landmarks were chosen")
    picked_list = [int(i) for i in picked[0].tolist()]

    result = Inspection(
        model=model_name,
        image=image_name,
        resolution=resolution,
        input_size=(int(height), int(width)),
        patch_size=patch,
        grid=grid,
        special_tokens=names,
        layers=layers,
        fna_layers=chosen_layers,
        num_landmarks=num_landmarks,
        landmarks=[divmod(i - special, grid[1]) for i in picked_list if i >= special],
        special_landmarks=[i for i in picked_list if i < special],
        detector=detect,
    )
    if out is not None:
        try:
            with _step("drawing figures"):
                norm_maps = [_norm_map(states, special, grid) for states in hidden_states]
                paths = figure_paths(out, image_name, resolution)
                result.figures["norm maps"] = plot_norm_maps(result, norm_maps[1:], paths["norm maps"])
                picture = preprocessing.display(pixel_values)
                norm_map = norm_maps[chosen_layers[0]]
                result.figures["landmarks"] = plot_landmarks(result, picture, norm_map, paths["landmarks"])
        except OSError as e:
            raise FigureError(f"cannot write the figures into {out}: {first_line(e, with_type=True)}", result) from e
    return result


def figure_paths(out: Path, image_name: str, resolution: int) -> dict[str, Path]:
    """Where `inspect_image` writes its two figures in `out`."""
    stem = f"{image_name}_{resolution}"
    return {"norm maps": out / f"{stem}_norms.png", "landmarks": out / f"{stem}_landmarks.png"}


def _norm_map(states: torch.Tensor, special: int, grid: tuple[int, int]) -> Any:
    return states[0, special:].float().norm(dim=-1).reshape(grid).cpu().numpy()


# ------------------------------------------------------------------------------------------------ output
def _format_positions(positions: list[Position]) -> str:
    if not positions:
        return "-"
    shown = " ".join(f"({r}, {c})" for r, c in positions[:_SHOWN_FLAGS])
    return shown + (f" +{len(positions) - _SHOWN_FLAGS} more" if len(positions) > _SHOWN_FLAGS else "")


def format_report(result: Inspection) -> str:
    """The per-layer table (one row per layer) and the landmark summary, as printed by `hf-fna inspect`."""
    rows, cols = result.grid
    lines = [
        f"{result.model} | {result.image} at {result.input_size[0]}x{result.input_size[1]} px | "
        f"{rows}x{cols} patches of {result.patch_size} px + {len(result.special_tokens)} special token(s)"
    ]
    lines.append("patch-token L2 norms of each layer's output; flagged tokens as (row, col) on the patch grid")
    header = f"{'layer':>5} {'min':>9} {'median':>9} {'max':>9} {'max/med':>8}  {f'massive ({result.detector})':<28}  "
    header += "sinks (attention)"
    lines += [header, "-" * len(header)]
    for report in result.layers:
        n = report.norms
        lines.append(
            f"{report.layer:>5} {n['min']:>9.3g} {n['median']:>9.3g} {n['max']:>9.3g} {n['max_over_median']:>8.2f}  "
            f"{_format_positions(report.massive):<28}  {_format_positions(report.sinks)}"
        )
    special = ", ".join(f"{result.special_tokens[i]} (token {i})" for i in result.special_landmarks) or "none"
    lines.append(
        f"landmarks: {len(result.landmarks) + len(result.special_landmarks)} chosen by FNA at layer "
        f"{result.fna_layers[0]} (FNA layers {result.fna_layers[0]}-{result.fna_layers[-1]}): "
        f"{len(result.landmarks)} patches, special tokens {special}"
    )
    lines.append(f"first patch landmarks (pick order): {_format_positions(result.landmarks[:12])}")
    return "\n".join(lines)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_norm_maps(result: Inspection, norm_maps: list[Any], path: Path) -> str:
    """Write `norm_maps_figure` as a PNG; returns the path."""
    return _save(norm_maps_figure(result, norm_maps), path, dpi=100)


def norm_maps_figure(result: Inspection, norm_maps: list[Any]) -> Any:
    """One panel per layer: patch-token norms on the patch grid, each layer on its own log colour scale (from its
    smallest to its largest patch norm, both in the panel's title), so that the structure within a layer shows
    whatever the layer's overall norm; flagged tokens marked."""
    import numpy as np
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm, Normalize

    plt = _pyplot()
    count = len(norm_maps)
    cols = min(count, math.ceil(math.sqrt(count * 4 / 3)))
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols + 1.2, 2.5 * rows + 0.8), squeeze=False)
    for ax, report, norms in zip(axes.flat, result.layers, norm_maps, strict=False):
        low = max(float(norms.min()), 1e-6)
        high = max(float(norms.max()), low * 1.01)
        ax.imshow(norms, norm=LogNorm(vmin=low, vmax=high), cmap="viridis", interpolation="nearest")
        ax.set_title(
            f"layer {report.layer}: {low:.3g} to {high:.3g}\nmax/median {report.norms['max_over_median']:.1f}",
            fontsize=7,
        )
        if report.massive:
            r, c = np.asarray(report.massive).T
            ax.scatter(c, r, marker="s", s=40, facecolors="none", edgecolors="red", linewidths=1.2)
        if report.sinks:
            r, c = np.asarray(report.sinks).T
            ax.scatter(c, r, marker="x", s=30, c="white", linewidths=1.2)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.flat[count:]:
        ax.axis("off")
    fig.suptitle(
        f"{Path(result.model).name} | {result.image} {result.input_size[0]}x{result.input_size[1]} | patch-token L2 "
        "norm per layer, each layer on its own log colour scale (its range in the panel title)\n"
        f"red square: massive token ({result.detector}), white x: attention sink",
        fontsize=9,
    )
    scale = ScalarMappable(norm=Normalize(0.0, 1.0), cmap="viridis")
    bar = fig.colorbar(scale, ax=axes.ravel().tolist(), shrink=0.8, ticks=[0.0, 1.0])
    bar.ax.set_yticklabels(["layer's min", "layer's max"], fontsize=7)
    bar.set_label("L2 norm, log scale per layer", fontsize=8)
    return fig


def plot_landmarks(result: Inspection, picture: Any, norm_map: Any, path: Path) -> str:
    """The patch landmarks in pick order on the model input, and on the norm map of the first FNA layer's input."""
    import numpy as np
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5.2))
    order = np.arange(len(result.landmarks))
    rc = np.asarray(result.landmarks, dtype=float).reshape(-1, 2)
    p = result.patch_size
    left.imshow(picture)
    left.scatter((rc[:, 1] + 0.5) * p, (rc[:, 0] + 0.5) * p, c=order, cmap="plasma", s=28, edgecolors="white",
                 linewidths=0.6)  # fmt: skip
    left.set_title("landmarks on the model input", fontsize=9)
    right.imshow(norm_map, norm=LogNorm(vmin=max(float(norm_map.min()), 1e-6)), cmap="viridis")
    dots = right.scatter(rc[:, 1], rc[:, 0], c=order, cmap="plasma", s=28, edgecolors="white", linewidths=0.6)
    right.set_title(f"on the token norms entering layer {result.fna_layers[0]} (log scale)", fontsize=9)
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(dots, ax=[left, right], shrink=0.8, label="pick order (farthest point sampling)")
    special = ", ".join(result.special_tokens[i] for i in result.special_landmarks) or "none"
    fig.suptitle(
        f"{Path(result.model).name} | {result.image} {result.input_size[0]}x{result.input_size[1]} | "
        f"{result.num_landmarks} landmarks chosen at layer {result.fna_layers[0]}: {len(result.landmarks)} patches "
        f"shown; special tokens (always landmarks, not shown): {special}",
        fontsize=9,
    )
    return _save(fig, path, dpi=80)  # a photo: keeps the file < 200 KB


def _save(fig: Any, path: Path, dpi: int) -> str:
    plt = _pyplot()
    try:
        save = lambda f: fig.savefig(f, dpi=dpi, bbox_inches="tight", pad_inches=0.1, format="png")  # noqa: E731
        write_atomically(str(path), save, binary=True)
    finally:
        plt.close(fig)
    return str(path)
