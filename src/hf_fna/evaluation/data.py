"""Datasets for `hf-fna eval`: Hub names, local folders, the offline built-ins, and column checks.

A dataset source is one of:
- a Hub dataset name (`"nlphuji/flickr30k"`), loaded with `datasets.load_dataset(name, split=...)` (needs a network);
- a local folder: written by `save_to_disk` (loaded with `load_from_disk`), or anything `load_dataset` reads from a
  folder (an imagefolder of `<class>/<image>` files, parquet, csv...);
- a built-in offline dataset, `hf_fna:<name>` (see `BUILTIN_DATASETS`);
- a `datasets.Dataset` or `DatasetDict` (Python API).
A single `Dataset` without splits counts as the split "test".
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import assets
from ..errors import InputError, first_line
from ..locations import check_local_path

BUILTIN_PREFIX = "hf_fna:"
# Usual names of the integer class column, tried in order when no --label-column is given.
LABEL_COLUMNS = ("label", "labels", "fine_label")
FASHION_MNIST_GARMENT_THRESHOLD = 16


def fashion_mnist_segmentation(threshold: int = FASHION_MNIST_GARMENT_THRESHOLD) -> Any:
    """Fashion-MNIST with a derived two-class segmentation mask: `image`, `label`, `annotation`.

    This is not a human-annotated segmentation set: the mask is computed from the image itself, garment (1) where the
    pixel intensity exceeds `threshold` (of 255) and background (0) elsewhere; Fashion-MNIST backgrounds are black,
    so the mask is the garment's silhouette. It is real image data with an exactly known answer, good for checking
    that FNA keeps patch features as useful for dense prediction as exact attention does, not as a segmentation
    benchmark. Masks are computed on access (a `with_transform`), so building the dataset costs nothing.
    """
    from PIL import Image

    def add_masks(batch: dict[str, list]) -> dict[str, list]:
        masks = [(np.asarray(image.convert("L")) > threshold).astype(np.uint8) for image in batch["image"]]
        return {**batch, "annotation": [Image.fromarray(mask) for mask in masks]}

    splits = assets.fashion_mnist()
    for name in splits:
        splits[name] = splits[name].with_transform(add_masks)
    return splits


_SHAPES = ("circle", "rectangle", "triangle")
_COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")


def _caption_facts(question: str, answer: str) -> dict[str, str]:
    """What one easy-vqa question and its answer say about the image's shape and colour ({"shape": ..., ...})."""
    words = re.findall(r"[a-z]+", question.lower())
    facts: dict[str, str] = {}
    if answer in ("yes", "no"):
        negated = "not" in words or "no" in words
        if (answer == "yes") != negated:  # the named shape or colour is present
            facts.update(_named_shape_and_colour(words))
        return facts
    # "what is the color of the triangle?" -> colour; "what is the red shape?" -> shape
    facts["shape" if answer in _SHAPES else "colour"] = answer
    facts.update(_named_shape_and_colour(words))
    return facts


def _named_shape_and_colour(words: list[str]) -> dict[str, str]:
    """The shape and colour words a question names (the last of each kind)."""
    return {("shape" if word in _SHAPES else "colour"): word for word in words if word in _SHAPES or word in _COLOURS}


def easy_vqa_captions() -> Any:
    """easy-vqa as an image-text retrieval set: one row per image, `image`, `caption` ("a red triangle") and
    `image_id`, with `train` and `test` splits.

    The caption is derived from the image's own questions and answers ("what is the color of the triangle?" ->
    "red"; "is there a blue shape?" -> "no"...); images whose questions do not name both the shape and its colour
    are left out. Eight colours and three shapes make 24 distinct captions, so many images share one: recall then
    measures how far FNA keeps the ranking of exact attention, not a retrieval benchmark.
    """
    import datasets

    out = {}
    for name, split in assets.easy_vqa().items():
        facts: dict[int, dict[str, str]] = {}
        first_row: dict[int, int] = {}
        columns = zip(split["question"], split["answer"], split["image_id"], strict=True)
        for row, (question, answer, image_id) in enumerate(columns):
            first_row.setdefault(image_id, row)
            facts.setdefault(image_id, {}).update(_caption_facts(question, answer))
        image_ids = sorted(i for i, known in facts.items() if len(known) == 2)
        rows = split.select([first_row[i] for i in image_ids]).select_columns(["image", "image_id"])
        captions = [f"a {facts[i]['colour']} {facts[i]['shape']}" for i in image_ids]
        out[name] = rows.add_column("caption", captions)
    return datasets.DatasetDict(out)


def _builtin_datasets() -> dict[str, Callable[[], Any]]:
    return {
        "fashion_mnist": assets.fashion_mnist,
        "digits": assets.digits,
        "fashion_mnist_segmentation": fashion_mnist_segmentation,
        "easy_vqa": assets.easy_vqa,
        "easy_vqa_captions": easy_vqa_captions,
        "photos": assets.photos,
        "textiles": assets.textiles,
    }


BUILTIN_DATASETS = (
    "fashion_mnist",
    "fashion_mnist_segmentation",
    "digits",
    "easy_vqa",
    "easy_vqa_captions",
    "photos",
    "textiles",
)


@dataclass
class TaskData:
    """The rows a task evaluates (and fits its probe on), and the column that plays each role."""

    test: Any
    columns: dict[str, str]
    train: Any | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def task_data(settings: Any, roles: dict[str, str | Sequence[str]], with_train: bool = False) -> TaskData:
    """Load `settings.split` (and `settings.train_split`) of `settings.dataset` and find the columns of `roles`.

    Raises:
        InputError: unknown dataset, missing split, empty split, missing columns.
    """
    splits = [settings.split, settings.train_split] if with_train else [settings.split]
    source = open_dataset(settings.dataset, splits)
    test = take_split(source, settings.split, settings.limit, settings.seed)
    train = take_split(source, settings.train_split, settings.train_limit, settings.seed) if with_train else None
    columns = resolve_columns(test, roles)
    if train is not None:
        resolve_columns(train, columns)
    return TaskData(test, columns, train)


def load_split(source: Any, split: str, limit: int | None = None, seed: int = 0) -> Any:
    """One split of a dataset source, shuffled with `seed` and cut to `limit` rows when `limit` is given."""
    return take_split(open_dataset(source, [split]), split, limit, seed)


def open_dataset(source: Any, splits: Sequence[str]) -> Any:
    """A `DatasetDict` from a source (see the module docstring); from the Hub, only `splits` are loaded.

    Raises:
        InputError: an unknown built-in, an unreadable folder, an unreachable Hub dataset or a split it lacks.
    """
    import datasets

    if isinstance(source, str) and source.startswith(BUILTIN_PREFIX):
        name = source.removeprefix(BUILTIN_PREFIX)
        if name not in BUILTIN_DATASETS:
            available = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_DATASETS)
            raise InputError(f"unknown built-in dataset {source!r}; available: {available}")
        source = _builtin_datasets()[name]()
    elif isinstance(source, str):
        source = _load_source(source, splits)
    if isinstance(source, datasets.Dataset):
        source = datasets.DatasetDict({"test": source})
    if not isinstance(source, datasets.DatasetDict):
        raise InputError(f"expected a dataset name, a folder or a datasets.Dataset, got {type(source).__name__}")
    return source


def take_split(source: Any, split: str, limit: int | None = None, seed: int = 0) -> Any:
    """`source[split]`, shuffled with `seed` and cut to `limit` rows when `limit` is smaller than the split."""
    if split not in source:
        raise InputError(f"the dataset has no split {split!r}; available splits: {', '.join(source)}")
    dataset = source[split]
    if len(dataset) == 0:
        raise InputError(f"split {split!r} of the dataset is empty")
    if limit is not None and limit < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(limit))
    return dataset


def _load_source(source: str, splits: Sequence[str]) -> Any:
    """A `DatasetDict` (or `Dataset`) from a local folder, or the requested splits of a Hub dataset."""
    import datasets

    if os.path.isdir(source):
        saved = any(os.path.isfile(os.path.join(source, name)) for name in ("dataset_dict.json", "state.json"))
        try:
            return datasets.load_from_disk(source) if saved else datasets.load_dataset(source)
        except Exception as error:
            raise InputError(
                f"could not read the dataset folder {source!r}: {first_line(error, with_type=True)}"
            ) from error
    try:  # a mistyped local folder fails now, naming it, instead of after minutes of Hub retries
        check_local_path(source, kind="dataset")
    except OSError as error:
        raise InputError(f"could not load the dataset {source!r}: {error}") from None
    loaded = {}
    for split in dict.fromkeys(splits):
        try:
            loaded[split] = datasets.load_dataset(source, split=split)
        except ValueError as error:  # an unknown split: the message lists the available ones
            raise InputError(f"could not load split {split!r} of {source!r}: {first_line(error)}") from error
        except Exception as error:
            raise InputError(
                f"could not load the dataset {source!r} (not a folder, a {BUILTIN_PREFIX}name, or a reachable Hub "
                f"dataset): {first_line(error, with_type=True)}"
            ) from error
    return datasets.DatasetDict(loaded)


def resolve_columns(dataset: Any, requested: dict[str, str | Sequence[str]]) -> dict[str, str]:
    """Map each role (e.g. "image", "label") to a column of `dataset`.

    `requested` gives, per role, a column name or candidate names (the first present one wins).

    Raises:
        InputError: naming every role without a column, what was looked for, and the available columns.
    """
    available = list(dataset.column_names)
    # A with_transform dataset (e.g. the derived segmentation masks) adds columns only visible on access.
    if dataset.format.get("type") == "custom" and len(dataset):
        available = list(dict.fromkeys([*available, *dataset[0].keys()]))
    found, missing = {}, []
    for role, names in requested.items():
        candidates = [names] if isinstance(names, str) else list(names)
        present = [name for name in candidates if name in available]
        if present:
            found[role] = present[0]
        else:
            missing.append(f"{role} ({' or '.join(repr(n) for n in candidates)})")
    if missing:
        raise InputError(
            f"the dataset lacks the expected column(s) {', '.join(missing)}; available columns: "
            f"{', '.join(available)} (choose others with the --*-column options)"
        )
    return found


def class_names(dataset: Any, label_column: str) -> list[str] | None:
    """The names of a `ClassLabel` column, or None for a plain integer column."""
    feature = dataset.features.get(label_column)
    return list(feature.names) if hasattr(feature, "names") else None


def to_rgb(image: Any) -> Any:
    """A PIL RGB image (datasets decode grayscale and palette images in their own modes)."""
    return image if image.mode == "RGB" else image.convert("RGB")
