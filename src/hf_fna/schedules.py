"""The layer grammar of `FNAConfig.layers`: which layers run FNA, grouped by landmark selection.

A layer specification is a list of indices (`[6, 7, -1]`), a slice string (`"6:"`, `"-4:"`), a keyword (`"auto"`,
`"all"`, `"none"`) or a schedule of groups (`"4:6@256;6:@64"`: layers 4-5 select 256 landmarks at layer 4, layers
6 to the end select 64 anew at layer 6). This module checks such specifications, parses them from the command line,
resolves them against a tower's depth into `LayerGroup`s, and writes groups back as schedule strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import InputError

LAYER_KEYWORDS = ("auto", "all", "none")

# `layers="auto"`: FNA in the second half of the tower, where the paper's reference runs it (layers 13-23 of CLIP
# ViT-L). `hf-fna compare` and benchmarks/bench_model.py measure this schedule against the others.
AUTO_FIRST_LAYER_FRACTION = 0.5

# The longest `layers` string accepted. A schedule names each layer at most once: even every index of a 1000-layer
# tower spelled out ("0,1,...,999") is 3890 characters.
MAX_LAYERS_LENGTH = 4096

# The layer grammar is parsed by splitting on ";", "@", ":" and ","; only whole integers are matched by a regular
# expression, whose match is unambiguous. (A single pattern for a whole group backtracked cubically on long runs of
# spaces: 22 s for 1600 of them.) Every step is linear in the length of the string.
_INTEGER = re.compile(r"-?\d+")
_COUNT = re.compile(r"\d+")


def _integer(text: str) -> int | None:
    """`" -4 "` -> -4; None when the text is not one integer."""
    text = text.strip()
    return int(text) if _INTEGER.fullmatch(text) else None


def parse_slice(text: str) -> tuple[int | None, int | None] | None:
    """`"4:6"` -> (4, 6), `" -4 : "` -> (-4, None); None when the text is not a slice string."""
    start, colon, stop = text.partition(":")
    if not colon or ":" in stop:
        return None
    bounds = [None if not part.strip() else _integer(part) for part in (start, stop)]
    if any(bound is None and part.strip() for bound, part in zip(bounds, (start, stop), strict=True)):
        return None
    return bounds[0], bounds[1]


def _index_list(text: str) -> list[int] | None:
    """`"4, 5"` -> [4, 5]; None when the text is not a comma-separated list of integers."""
    values = [_integer(part) for part in text.split(",")]
    return None if any(value is None for value in values) else values


def _shown(text: str, limit: int = 120) -> str:
    """`repr(text)`, shortened: an error message names a bad value without echoing kilobytes of it."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def _check_length(name: str, text: str) -> None:
    if len(text) > MAX_LAYERS_LENGTH:
        raise InputError(
            f"FNAConfig.{name}={_shown(text)} is invalid: {len(text)} characters, more than the {MAX_LAYERS_LENGTH} "
            "accepted (a schedule names each layer at most once)."
        )


@dataclass(frozen=True)
class LayerGroup:
    """Consecutive use of one landmark selection: FNA layers that share `num_landmarks` and one set of landmarks,
    chosen at the group's first layer."""

    layers: tuple[int, ...]
    num_landmarks: int

    @property
    def first_layer(self) -> int:
        return self.layers[0]


def is_schedule(value: Any) -> bool:
    """Whether an `FNAConfig.layers` value is a schedule of groups (`"4:6@256;6:@64"`) rather than one layer set."""
    return isinstance(value, str) and ("@" in value or ";" in value)


def _schedule_parts(text: str, name: str) -> list[tuple[str | list[int], int | None]]:
    """`"4:6@256;6:@64"` -> `[("4:6", 256), ("6:", 64)]`; a group without `@m` gets None."""
    _check_length(name, text)
    parts = []
    for piece in text.split(";"):
        spec, at, count = (part.strip() for part in piece.partition("@"))
        indices = _index_list(spec)
        layers_ok = spec in LAYER_KEYWORDS or parse_slice(spec) is not None or indices is not None
        if not layers_ok or (at and not _COUNT.fullmatch(count)):
            raise InputError(
                f"FNAConfig.{name}={_shown(text)} is invalid: group {_shown(piece.strip())} is not 'LAYERS' or "
                "'LAYERS@M' with LAYERS a slice ('4:6'), an index list ('4,5') or a keyword, e.g. '4:6@256;6:@64'."
            )
        landmarks = int(count) if at else None
        if landmarks is not None and landmarks < 1:
            raise InputError(
                f"FNAConfig.{name}={_shown(text)} is invalid: a group has {landmarks} landmarks; expected >= 1."
            )
        parts.append((spec if indices is None else indices, landmarks))
    return parts


def check_layers(name: str, value: Any) -> None:
    if is_schedule(value):
        _schedule_parts(value, name)
        return
    if isinstance(value, str):
        _check_length(name, value)
        if value in LAYER_KEYWORDS or parse_slice(value) is not None:
            return
        raise InputError(
            f"FNAConfig.{name}={_shown(value)} is invalid; expected a list of layer indices, a slice string such as "
            f"'6:' or '-4:', or one of {', '.join(repr(k) for k in LAYER_KEYWORDS)}."
        )
    if isinstance(value, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        return
    raise InputError(
        f"FNAConfig.{name}={value!r} is invalid; expected a list of integers, a slice string such as '6:', or one "
        f"of {', '.join(repr(k) for k in LAYER_KEYWORDS)}."
    )


def parse_layers(text: str | list[str] | tuple[str, ...] | None) -> str | list[int]:
    """Command-line text -> an `FNAConfig.layers` value.

    Layer indices (`"6,7,8"`, or the tokens `["6", "7", "-1"]`) become a list of integers; one keyword or slice
    string (`"auto"`, `"all"`, `"none"`, `"6:"`, `"-4:"`) or schedule (`"4:6@256;6:@64"`) is returned as is; `None`
    or nothing means `"auto"`.

    Raises:
        ValueError: naming the text and the accepted forms.
    """
    values = [text] if isinstance(text, str) else list(text or [])
    _check_length("layers", " ".join(values))
    if len(values) == 1 and is_schedule(values[0]):
        check_layers("layers", values[0].strip())
        return values[0].strip()
    tokens = [token.strip() for value in values for token in value.split(",") if token.strip()]
    if not tokens:
        return "auto"
    try:
        return [int(token) for token in tokens]
    except ValueError:
        pass
    if len(tokens) == 1 and (tokens[0] in LAYER_KEYWORDS or parse_slice(tokens[0]) is not None):
        return tokens[0]
    raise InputError(
        f"layers {_shown(' '.join(values))} is invalid; give layer indices ('6,7,8'), a slice ('6:', '-4:') or one of "
        f"{', '.join(LAYER_KEYWORDS)}."
    )


def resolve_layers(spec: str | list[int] | tuple[int, ...], num_layers: int, name: str = "layers") -> list[int]:
    """Turn a layer specification into sorted, non-negative layer indices of a tower with `num_layers` layers.

    A schedule (`"4:6@256;6:@64"`) gives the union of its groups' layers.

    Raises:
        ValueError: an index outside `[-num_layers, num_layers)`.
    """
    if is_schedule(spec):
        return sorted(i for group in resolve_groups(spec, 1, False, num_layers, name) for i in group.layers)
    if spec == "all":
        return list(range(num_layers))
    if spec == "none":
        return []
    if spec == "auto":
        return list(range(int(num_layers * AUTO_FIRST_LAYER_FRACTION), num_layers))
    if isinstance(spec, str):
        bounds = parse_slice(spec)
        if bounds is None:  # pragma: no cover - rejected at construction
            raise InputError(f"FNAConfig.{name}={_shown(spec)} is not a slice string.")
        for bound in bounds:
            if bound is not None and not -num_layers <= bound <= num_layers:
                raise InputError(
                    f"FNAConfig.{name}={spec!r} is out of range for a tower with {num_layers} layers; "
                    f"bounds must lie in [-{num_layers}, {num_layers}]."
                )
        layers = list(range(num_layers))[slice(*bounds)]
        if not layers:  # "3:1": FNA nowhere, without a word, is never what was meant
            raise InputError(
                f"FNAConfig.{name}={spec!r} selects no layer of a tower with {num_layers} layers (an empty slice); "
                "give a slice whose start comes before its stop, such as '1:3', or 'none' for exact attention in every "
                "layer."
            )
        return layers
    out = set()
    for index in spec:
        if not -num_layers <= index < num_layers:
            raise InputError(
                f"FNAConfig.{name} contains layer {index}, out of range for a tower with {num_layers} layers; "
                f"accepted indices are 0..{num_layers - 1} (or negative from the end)."
            )
        out.add(index % num_layers)
    return sorted(out)


def resolve_groups(
    spec: str | list[int] | tuple[int, ...],
    num_landmarks: int,
    resample_every_layer: bool,
    num_layers: int,
    name: str = "layers",
) -> list[LayerGroup]:
    """The selection groups of a layer specification, in layer order.

    A plain layer set is one group of `num_landmarks` (or one group per layer with `resample_every_layer`); each
    group of a schedule keeps its own count (`num_landmarks` where it gives none) and its own selection.

    Raises:
        ValueError: an index out of range, or a layer in two groups.
    """
    if not is_schedule(spec):
        layers = resolve_layers(spec, num_layers, name)
        parts = [([i], num_landmarks) for i in layers] if resample_every_layer else [(layers, num_landmarks)]
    else:
        parts = [
            (resolve_layers(layers, num_layers, name), landmarks or num_landmarks)
            for layers, landmarks in _schedule_parts(spec, name)
        ]
        if resample_every_layer:
            parts = [([i], landmarks) for layers, landmarks in parts for i in layers]
    seen: set[int] = set()
    for layers, _ in parts:
        if seen & set(layers):
            raise InputError(
                f"FNAConfig.{name}={spec!r} puts layer(s) {sorted(seen & set(layers))} in two groups; each layer may "
                "belong to one group."
            )
        seen |= set(layers)
    return sorted((LayerGroup(tuple(layers), m) for layers, m in parts if layers), key=lambda g: g.first_layer)


def schedule_string(groups: list[LayerGroup]) -> str:
    """Groups -> the `FNAConfig.layers` schedule string, e.g. `"4:6@256;6:12@64"` (`"none"` without groups)."""
    parts = []
    for group in groups:
        first, last = group.layers[0], group.layers[-1]
        contiguous = list(group.layers) == list(range(first, last + 1))
        layers = f"{first}:{last + 1}" if contiguous else ",".join(map(str, group.layers))
        parts.append(f"{layers}@{group.num_landmarks}")
    return ";".join(parts) or "none"


def schedule_from_landmarks(per_layer: list[int | None]) -> str:
    """The schedule string of per-layer landmark counts (None: exact attention), the inverse of
    `ResolvedFNAConfig.landmarks_per_layer`: consecutive layers with the same count form one selection group."""
    groups: list[LayerGroup] = []
    for layer, m in enumerate(per_layer):
        if m is None:
            continue
        if groups and groups[-1].num_landmarks == m and groups[-1].layers[-1] == layer - 1:
            groups[-1] = LayerGroup((*groups[-1].layers, layer), m)
        else:
            groups.append(LayerGroup((layer,), m))
    return schedule_string(groups)
