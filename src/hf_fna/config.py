"""`FNAConfig`: every setting of Fast Nyström Attention, validated at construction.

A model carries its settings as the plain dict `fna_config` on the config of the tower that runs FNA (the model
config for ViT/DINOv2, `vision_config` for CLIP/SigLIP/LLaVA), so that `config.json` on the Hub carries them and
`save_pretrained` / `from_pretrained` keep them. `FNAConfig` can also live on its own in `fna_config.json`,
following the conventions of `GenerationConfig`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from .errors import InputError
from .locations import check_local_path
from .ops.checks import MAX_SEED
from .ops.landmarks import SAMPLING_METHODS, SELECTION_STARTS
from .ops.nystrom import INTERVENTIONS, MAX_PINV_ITERATIONS, PINV_METHODS
from .schedules import LayerGroup, check_layers, resolve_groups, resolve_layers

FNA_CONFIG_NAME = "fna_config.json"

SAMPLING_FEATURES = ("q", "k", "hidden")
DETECTION_METHODS = ("norm_ratio", "norm_gap", "attention")

# `MaskingConfig.detect_layer=None`: two thirds of the depth. On the CLIP ViT-B/16 of `hf_fna.assets` the tokens
# above 10x the median norm first appear at the input of layer 7 and peak at layer 8 (= 2/3 of 12), at 224-896 px
# (benchmarks/massive_tokens.py); the paper detected at layer 13 of CLIP ViT-L's 24.
DETECT_LAYER_FRACTION = 2 / 3

# Newton-Schulz iterations. Mean patch cosine to exact attention on the real DINOv2-small at 448 px, layers "6:", 64
# landmarks, 9 tune photos (benchmarks/sweep_schedules.py --resolution 448 --configs 6:@64/pinv_iterations=N): 0.74
# at 1 iteration, 0.94 at 3, 0.986 at 6, 0.987 at 8, 0.979 at 10, 0.95 at 12, 0.71 at 16, 0.19 at 20; before this bound,
# 0.04 at 30, 50 and 100 (4 photos). More iterations converge to the exact pseudo-inverse of the ill-conditioned
# landmark kernel (the pinv="exact" failure mode with m < N): values outside the recommended range warn, values above
# `MAX_PINV_ITERATIONS` are refused.
RECOMMENDED_PINV_ITERATIONS = (3, 10)

def _check_choice(name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise InputError(f"FNAConfig.{name}={value!r} is not supported; accepted values: {', '.join(accepted)}.")


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    too_large = maximum is not None and isinstance(value, int) and value > maximum
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or too_large:
        accepted = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
        raise InputError(f"FNAConfig.{name}={value!r} is invalid; expected {accepted}.")


@dataclass
class MaskingConfig:
    """The masking strategy for massive / artifact tokens (attention sinks).

    Detection runs once per forward pass at `detect_layer`; the intervention acts on the flagged keys in every layer
    from `from_layer` on, with exact and FNA attention alike.

    Args:
        intervention: what happens to flagged keys, as the `intervention` of `hf_fna.ops.exact_attention` and
            `hf_fna.ops.nystrom_attention`: "none"; "mask" (flagged keys get logit -inf, the softmax renormalises over
            the rest); "sink" (softmax as usual, then every query's weight on flagged keys is zeroed, without
            renormalisation); "sink_keep_self" (as "sink", but a flagged token keeps its attention to itself).
        detect: "norm_ratio" (tokens entering `detect_layer` whose L2 norm exceeds `min_ratio` times the median
            token norm), "norm_gap" (the paper's rule: largest gap in the sorted log norms of those tokens) or
            "attention" (the paper's sink rule: iterative outliers of mean incoming attention at `detect_layer`;
            costs one exact attention matrix). "norm_ratio" is the default: on the one real model with massive
            tokens here it alone found them at every resolution (README, "Massive tokens").
        detect_layer: the layer at whose input (norm_ratio, norm_gap) or attention (attention) tokens are flagged;
            negative values count from the end; `None` is two thirds of the depth (`round(2 * num_layers / 3)`),
            where massive tokens peak in the CLIP ViT-B/16 measured here. `hf-fna inspect` shows where they are.
        from_layer: first layer where the intervention applies; it must not precede `detect_layer`, since the
            flags are only known once that layer runs; `None` is `detect_layer`.
        max_tokens: at most this many flagged tokens per image (the strongest ones); `None` (the default) keeps
            every one. Massive tokens grow with the resolution (2-7% of the patches of that CLIP).
        std_threshold: "attention" detection flags a token while its log incoming attention exceeds the mean of
            the unflagged tokens by this many standard deviations.
        min_gap: "norm_gap" detection flags nothing unless the largest gap in sorted log norms exceeds this value
            (natural log units), so that models without massive tokens are left alone.
        min_ratio: "norm_ratio" detection flags tokens above this multiple of the median token norm.
    """

    intervention: Literal["none", "mask", "sink", "sink_keep_self"] = field(
        default="none",
        metadata={"help": "intervention on flagged massive/artifact tokens (none, mask, sink, sink_keep_self)"},
    )
    detect: Literal["norm_ratio", "norm_gap", "attention"] = field(
        default="norm_ratio", metadata={"help": "how tokens are flagged (norm_ratio, norm_gap or attention)"}
    )
    detect_layer: int | None = field(default=None, metadata={"help": "layer where tokens are flagged"})
    from_layer: int | None = field(default=None, metadata={"help": "first layer of the intervention"})
    max_tokens: int | None = field(
        default=None, metadata={"help": "at most this many flagged tokens per image (null: no limit)"}
    )
    std_threshold: float = field(
        default=3.0, metadata={"help": "attention detection: outlier threshold in standard deviations"}
    )
    min_gap: float = field(
        default=1.0, metadata={"help": "norm_gap detection: smallest gap in sorted log norms that flags tokens"}
    )
    min_ratio: float = field(
        default=10.0, metadata={"help": "norm_ratio detection: flagged norms exceed this multiple of the median"}
    )

    def __post_init__(self) -> None:
        _check_choice("masking.intervention", self.intervention, INTERVENTIONS)
        _check_choice("masking.detect", self.detect, DETECTION_METHODS)
        for name in ("detect_layer", "from_layer"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise InputError(
                    f"FNAConfig.masking.{name}={value!r} is invalid; expected an integer layer index or None."
                )
        if self.max_tokens is not None:
            _check_int("masking.max_tokens", self.max_tokens, 1)
        for name in ("std_threshold", "min_gap", "min_ratio"):
            value = getattr(self, name)
            # NaN compares False with every threshold, so it would silently flag nothing: refuse it.
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(f"FNAConfig.masking.{name}={value!r} is invalid; expected a finite number >= 0.")

    @property
    def enabled(self) -> bool:
        return self.intervention != "none"


@dataclass
class FNAConfig:
    """Settings of Fast Nyström Attention (FNA) for one transformer tower.

    Args:
        layers: where FNA runs: a list of layer indices (negative counts from the end), a slice string such as
            "6:" or "-4:", "all", "none" (exact attention everywhere, e.g. masking only), "auto" (the default
            schedule: FNA in the second half of the layers), or a schedule of groups separated by ";", each
            `LAYERS@M` with its own landmark count and its own selection at its first layer: "4:6@256;6:@64" runs
            layers 4-5 with 256 landmarks, then selects 64 anew at layer 6 for layers 6 to the end. At most
            `MAX_LAYERS_LENGTH` (4096) characters; a slice that selects no layer ("3:1") is refused by `resolve`.
        num_landmarks: landmark tokens per image (m), for every group that names none. Cost is O(N m d) instead of
            O(N^2 d).
        sampling: "fps" (farthest point sampling, picks outlier tokens first), "random" (seeded; the ablation) or
            "quickfps" (the paper's sampler: FPS by the `torch-quickfps` package over the non-special tokens).
        fps_start: where "fps" starts: "first" (FPS over the other tokens from the first of them, the special ones
            prepended: the paper's order, the same landmarks as "quickfps", the default), "special" (the always-landmark
            tokens seed the distances: the first free pick is the token farthest from CLS and registers) or
            "centroid" (from the token farthest from the centroid). The three were indistinguishable on both real
            models (README, "Landmark sampler"), so the default follows the paper. "quickfps" always starts as
            "first" does.
        sampling_features: what FPS measures distances on: "q" (mean over heads of the queries, the reference
            default), "k" (mean of the keys) or "hidden" (the layer's normalised input hidden state, recovered
            exactly from the value projection).
        resample_every_layer: select landmarks anew in every FNA layer instead of once per group (at the first FNA
            layer of a forward pass without a schedule).
        pinv: "newton" (the Newton-Schulz iteration of Nyströmformer; it regularises the ill-conditioned landmark
            kernel and is the recommended default) or "exact", the reference mode (`torch.linalg.pinv` in float64,
            singular values below 1.5e-8 of the largest cut; with every unmasked token a landmark it reproduces
            exact attention: 7e-7 from SDPA on a 4-layer random ViT with 226 tokens, eager attention being 8e-7
            from it). "exact" raises `ReferenceModeError` for fewer landmarks than unmasked tokens (forward pass),
            for a model in training mode, and for a backward pass through the pseudo-inverse; a forward pass with
            autograd on (`model.eval(); model(x)`) runs.
        pinv_iterations: Newton-Schulz iterations, 1 to `MAX_PINV_ITERATIONS` (20); values outside 3-10 warn. More
            iterations are not better: they converge to the exact pseudo-inverse, which fails with m < N.
        min_tokens: sequences shorter than this run exact attention (FNA is slower than exact attention on short
            sequences; see the README for how the default was measured).
        seed: seed of "random" sampling; selection is deterministic for a given input.
        num_special_tokens: leading tokens that are always landmarks (CLS, registers, distillation token). `None`
            reads it from the model config.
        masking: the masking strategy for massive/artifact tokens, a `MaskingConfig` or its dict.
    """

    # Each field's `help` is its one-line description, shared by the command-line options (`hf_fna.tools.arguments`)
    # and the settings table of model cards (`hf_fna.tools.publish`).
    layers: str | list[int] = field(
        default="auto",
        metadata={
            "help": "layers running FNA (others run exact attention); `A@m;B@m` groups select their own m landmarks"
        },
    )
    num_landmarks: int = field(
        default=64,
        metadata={"help": "landmark tokens per image (m) of groups that name none; cost O(N m d) instead of O(N^2 d)"},
    )
    sampling: Literal["fps", "random", "quickfps"] = field(
        default="fps",
        metadata={
            "help": "landmark selection: farthest point sampling (fps), the paper's sampler (quickfps) or seeded random"
        },
    )
    fps_start: Literal["special", "first", "centroid"] = field(
        default="first",
        metadata={"help": "where fps starts: seeded by the special tokens, the first other token, or the centroid"},
    )
    sampling_features: Literal["q", "k", "hidden"] = field(
        default="q", metadata={"help": "features FPS measures distances on (q, k or hidden)"}
    )
    resample_every_layer: bool = field(
        default=False, metadata={"help": "select landmarks in every FNA layer instead of once per group"}
    )
    pinv: Literal["newton", "exact"] = field(
        default="newton", metadata={"help": "pseudo-inverse of the landmark kernel: Newton-Schulz iteration or exact"}
    )
    pinv_iterations: int = field(default=6, metadata={"help": "Newton-Schulz iterations"})
    min_tokens: int = field(default=512, metadata={"help": "shorter sequences run exact attention"})
    seed: int = field(default=0, metadata={"help": "seed of random sampling"})
    num_special_tokens: int | None = field(
        default=None,
        metadata={"help": "leading tokens always kept as landmarks (null: derived from the model family)"},
    )
    masking: MaskingConfig = field(
        default_factory=MaskingConfig, metadata={"help": "masking of massive/artifact tokens (attention sinks)"}
    )

    def __post_init__(self) -> None:
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        check_layers("layers", self.layers)
        _check_int("num_landmarks", self.num_landmarks, 1)
        _check_choice("sampling", self.sampling, SAMPLING_METHODS)
        _check_choice("fps_start", self.fps_start, SELECTION_STARTS)
        _check_choice("sampling_features", self.sampling_features, SAMPLING_FEATURES)
        if not isinstance(self.resample_every_layer, bool):
            raise InputError(
                f"FNAConfig.resample_every_layer={self.resample_every_layer!r} is invalid; expected True or False."
            )
        _check_choice("pinv", self.pinv, PINV_METHODS)
        _check_int("pinv_iterations", self.pinv_iterations, 1, MAX_PINV_ITERATIONS)
        low, high = RECOMMENDED_PINV_ITERATIONS
        if self.pinv == "newton" and not low <= self.pinv_iterations <= high:
            warnings.warn(
                f"FNAConfig.pinv_iterations={self.pinv_iterations} is outside the recommended {low}-{high}: measured "
                "fidelity to exact attention falls off outside it (the default, 6, measured best).",
                UserWarning,
                stacklevel=3,
            )
        _check_int("min_tokens", self.min_tokens, 0)
        _check_int("seed", self.seed, 0, MAX_SEED)
        if self.num_special_tokens is not None:
            _check_int("num_special_tokens", self.num_special_tokens, 0)
        if isinstance(self.masking, dict):
            self.masking = MaskingConfig(**_known_fields(MaskingConfig, _renamed_masking_keys(self.masking), "masking"))
        elif not isinstance(self.masking, MaskingConfig):
            raise InputError(f"FNAConfig.masking={self.masking!r} is invalid; expected a MaskingConfig or a dict.")

    # --- serialisation -------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; `FNAConfig.from_dict(config.to_dict()) == config`."""
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> FNAConfig:
        if not isinstance(config_dict, dict):
            raise InputError(f"FNAConfig.from_dict expects a dict, got {type(config_dict).__name__}.")
        return cls(**_known_fields(cls, config_dict, "FNAConfig"))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> FNAConfig:
        """Read an `fna_config.json`; a file that is not a valid one raises a `ValueError` naming the file."""
        return cls._from_values(read_json(path), os.fspath(path))

    @classmethod
    def _from_values(cls, values: Any, path: str) -> FNAConfig:
        try:
            return cls.from_dict(values)
        except ValueError as error:
            raise InputError(f"{path}: {error}") from error

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> str:
        """Write `fna_config.json` into `save_directory` (created if needed) and return the file path.

        With `push_to_hub=True` the folder is uploaded as well (`repo_id` defaults to the folder name), as in
        `GenerationConfig.save_pretrained`.
        """
        if os.path.isfile(save_directory):
            raise InputError(f"save_directory={str(save_directory)!r} is a file; expected a directory.")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, FNA_CONFIG_NAME)
        self.to_json_file(path)
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(str(save_directory))))
            self.push_to_hub(repo_id, **kwargs)
        return path

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, revision: str | None = None, **hub_kwargs: Any
    ) -> FNAConfig:
        """Load `fna_config.json` from a local folder, a file path or a Hub repo id.

        A model's `config.json` (the file, its folder or its Hub repo, without `fna_config.json`) works too: its
        `fna_config` entry (on the model config or its `vision_config`) is read.

        Raises:
            OSError: a path that does not exist (at once, naming the local path, when the string cannot be a Hub
                repo or the Hub is offline or unreachable), or a model config without an `fna_config` entry.
            ValueError: a file that is not valid JSON or holds invalid settings, naming the file.
        """
        path = str(pretrained_model_name_or_path)
        check_local_path(path)
        if os.path.isfile(path):
            values = read_json(path)
            if _is_model_config(values):
                return cls._from_model_config_file(path, path)
            return cls._from_values(values, path)
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, FNA_CONFIG_NAME)):
                return cls.from_json_file(os.path.join(path, FNA_CONFIG_NAME))
            if os.path.isfile(os.path.join(path, "config.json")):
                return cls._from_model_config_file(os.path.join(path, "config.json"), path)
            raise OSError(f"{path!r} holds neither {FNA_CONFIG_NAME} nor a config.json with an `fna_config` entry.")

        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            return cls.from_json_file(hf_hub_download(path, FNA_CONFIG_NAME, revision=revision, **hub_kwargs))
        except LocalEntryNotFoundError as error:  # the Hub did not answer: config.json would not come either
            local = os.path.abspath(os.path.expanduser(path))
            raise OSError(
                f"{path!r} does not exist (no such file or folder: {local}), and the Hub could not be reached for it "
                f"({str(error).strip().splitlines()[0]})."
            ) from error
        except EntryNotFoundError:
            model_config = hf_hub_download(path, "config.json", revision=revision, **hub_kwargs)
            return cls._from_model_config_file(model_config, path)

    @classmethod
    def _from_model_config_file(cls, config_file: str, source: str) -> FNAConfig:
        model_config = read_json(config_file)
        vision = model_config.get("vision_config") if isinstance(model_config, dict) else None
        if not isinstance(model_config, dict) or not isinstance(vision, (dict, type(None))):
            raise InputError(
                f"{config_file}: not a model config.json (expected a JSON object whose `vision_config`, if any, is an "
                "object)."
            )
        for candidate in (model_config, vision or {}):
            if candidate.get("fna_config") is not None:
                try:
                    return cls.from_dict(candidate["fna_config"])
                except ValueError as error:
                    raise InputError(f"{config_file}: invalid `fna_config`: {error}") from error
        if source == config_file:
            raise OSError(
                f"{config_file} is a model config.json that carries no `fna_config` (neither on the model config nor "
                f"on its vision_config); give an {FNA_CONFIG_NAME}, or apply settings with FNAConfig(...).apply(model) "
                "and save the model."
            )
        raise OSError(f"{source!r} has no {FNA_CONFIG_NAME} and its config.json carries no `fna_config`.")

    def push_to_hub(
        self, repo_id: str, commit_message: str = "Upload FNA config", model_card: str | None = None, **kwargs: Any
    ) -> str:
        """Upload `fna_config.json` (and `README.md` when `model_card` is given) to a Hub repo; returns its URL."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=kwargs.pop("token", None))
        api.create_repo(repo_id, exist_ok=True, private=kwargs.pop("private", None))
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            if model_card is not None:
                with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
                    f.write(model_card)
            api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, **kwargs)
        return f"https://huggingface.co/{repo_id}"

    # --- applying to a model -------------------------------------------------------------------------------------

    def apply(self, model: Any, tower: str | None = None) -> Any:
        """Run FNA with these settings in `model`'s vision tower (or the model itself for ViT/DINOv2).

        Sets `fna_config` on the tower's config and switches that tower to `attn_implementation="fna"`; other towers
        (the CLIP/SigLIP text tower, the LLaVA language model) keep their attention. Returns `model`.

        Args:
            model: a loaded `PreTrainedModel`.
            tower: the sub-config name to target (e.g. "vision_config"); found automatically by default.

        Raises:
            ValueError: the model's attention does not dispatch through `AttentionInterface`, or a layer index is out
                of range for the tower.
        """
        # The integration imports this module; it is imported here, when a model is changed, not at import time.
        from .integration.plans import apply_fna_config

        return apply_fna_config(model, self, tower)

    def resolve(self, num_layers: int) -> ResolvedFNAConfig:
        """These settings resolved against a tower of `num_layers` layers: the selection groups of `layers` and the
        masking layers, every index non-negative; checked before anything uses them.

        Raises:
            ValueError: a layer out of range, a layer in two groups, or masking layers that contradict each other.
        """
        groups = resolve_groups(self.layers, self.num_landmarks, self.resample_every_layer, num_layers)
        detect_layer, from_layer = _masking_layers(self.masking, num_layers)
        return ResolvedFNAConfig(self, num_layers, groups, detect_layer, from_layer)

    def update(self, **changes: Any) -> FNAConfig:
        """A copy with `changes` applied and validated; a `masking` dict changes only the masking fields it names.

        Raises:
            ValueError: an unknown field or an invalid value, named.
        """
        values = self.to_dict()
        masking = changes.pop("masking", None)
        if isinstance(masking, MaskingConfig):
            values["masking"] = asdict(masking)
        elif masking is not None:
            if not isinstance(masking, dict):
                raise InputError(f"FNAConfig.masking={masking!r} is invalid; expected a MaskingConfig or a dict.")
            values["masking"].update(masking)
        return FNAConfig.from_dict({**values, **_known_fields(FNAConfig, changes, "FNAConfig.update")})

    @classmethod
    def from_model_config(cls, config: Any) -> FNAConfig:
        """The settings a tower config carries (`config.fna_config`), or the defaults when it carries none."""
        value = getattr(config, "fna_config", None)
        if value is None:
            return cls()
        if isinstance(value, FNAConfig):
            return value
        return cls.from_dict(value)


@dataclass(frozen=True)
class ResolvedFNAConfig:
    """An `FNAConfig` resolved against the depth of one tower (`FNAConfig.resolve`).

    Attributes:
        config: the settings.
        num_layers: the tower's depth.
        groups: the selection groups, in layer order (a layer in no group runs exact attention).
        detect_layer: where masking flags tokens; `num_layers` when masking is off.
        from_layer: the first layer of the masking intervention; `num_layers` when masking is off.
    """

    config: FNAConfig
    num_layers: int
    groups: list[LayerGroup]
    detect_layer: int
    from_layer: int

    @property
    def fna_layers(self) -> list[int]:
        """The layers configured for FNA, sorted."""
        return sorted(layer for group in self.groups for layer in group.layers)

    def group_of(self, layer: int) -> LayerGroup | None:
        """The selection group that `layer` belongs to; None where it runs exact attention."""
        return next((group for group in self.groups if layer in group.layers), None)

    def landmarks_per_layer(self, tokens: int | None = None) -> list[int | None]:
        """The landmark count of every layer, None where it runs exact attention (for `tokens` tokens, a group
        falls back to exact attention below `max(min_tokens, its m)`)."""
        out: list[int | None] = [None] * self.num_layers
        for group in self.groups:
            if tokens is None or tokens >= max(self.config.min_tokens, group.num_landmarks):
                for layer in group.layers:
                    out[layer] = group.num_landmarks
        return out


def _masking_layers(masking: MaskingConfig, num_layers: int) -> tuple[int, int]:
    """Resolve and check `masking.detect_layer` / `masking.from_layer` against the tower depth."""
    if not masking.enabled:
        return num_layers, num_layers
    detect = round(num_layers * DETECT_LAYER_FRACTION) if masking.detect_layer is None else masking.detect_layer
    (detect_layer,) = resolve_layers([detect], num_layers, "masking.detect_layer")
    if masking.from_layer is None:
        from_layer = detect_layer
    else:
        (from_layer,) = resolve_layers([masking.from_layer], num_layers, "masking.from_layer")
    if from_layer < detect_layer:
        raise InputError(
            f"FNAConfig.masking.from_layer={masking.from_layer} precedes detect_layer={masking.detect_layer}: tokens "
            "are flagged once per forward pass at detect_layer, so the intervention can start there at the earliest."
        )
    if masking.detect != "attention" and detect_layer == 0:
        raise InputError(
            f"FNAConfig.masking.detect_layer=0 with detect={masking.detect!r} would read the patch embeddings, which "
            "carry no massive tokens; use a layer >= 1 (massive tokens appear in middle layers)."
        )
    return detect_layer, from_layer


def field_help() -> dict[str, str]:
    """The one-line help of every setting, masking fields as `masking.<name>`, in declaration order."""
    out = {f.name: f.metadata["help"] for f in fields(FNAConfig) if f.name != "masking"}
    out.update({f"masking.{f.name}": f.metadata["help"] for f in fields(MaskingConfig)})
    return out


# Masking keys of configs written before a rename: old name -> current name.
_RENAMED_MASKING_KEYS = {"mode": "intervention"}


def _renamed_masking_keys(values: dict[str, Any]) -> dict[str, Any]:
    """A masking dict with renamed keys under their current names (a FutureWarning names each), so that configs
    saved on the Hub before the rename keep loading."""
    out = dict(values)
    for old, new in _RENAMED_MASKING_KEYS.items():
        if old in out and new not in out:
            warnings.warn(
                f"FNAConfig.masking.{old} is now called masking.{new}; the old name will stop being read in a future "
                "release (save the config again to update it).",
                FutureWarning,
                stacklevel=4,
            )
            out[new] = out.pop(old)
    return out


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in a file; a file that is not UTF-8 JSON, or nested too deeply to parse, raises a `ValueError`
    naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(f"{os.fspath(path)} is not a valid JSON file ({error}).") from None
    except RecursionError:  # `"[" * 100000`: the parser recurses once per level
        raise InputError(f"{os.fspath(path)} is not a valid JSON file (nested too deeply to parse).") from None

# Keys of a Transformers model config.json, none of which an fna_config.json has.
_MODEL_CONFIG_KEYS = ("fna_config", "model_type", "architectures", "vision_config", "transformers_version")


def _is_model_config(values: Any) -> bool:
    return isinstance(values, dict) and any(key in values for key in _MODEL_CONFIG_KEYS)


def _known_fields(cls: type, values: dict[str, Any], owner: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise InputError(f"{owner} got unknown field(s) {unknown}; accepted fields: {', '.join(sorted(names))}.")
    return dict(values)
