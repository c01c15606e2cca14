"""Optional dependencies: the backend needs torch, transformers, huggingface_hub, numpy, safetensors and threadpoolctl
only; the tools (`hf-fna compare`, `inspect`, `calibrate`, `eval`, `hf_fna.assets`) need the extras named here.

`missing_extra(error)` turns the `ImportError` of a missing optional module into one line naming the extra that
installs it; `hf-fna` prints that line instead of a traceback.
"""

from __future__ import annotations

# Top-level import name -> (distribution on PyPI, hf-fna extra that installs it).
OPTIONAL_DEPENDENCIES = {
    "accelerate": ("accelerate", "eval"),
    "datasets": ("datasets", "eval"),
    "evaluate": ("evaluate", "eval"),
    "PIL": ("pillow", "eval"),
    "tqdm": ("tqdm", "eval"),
    "sklearn": ("scikit-learn", "eval"),
    "matplotlib": ("matplotlib", "eval"),
    "onnx": ("onnx", "assets"),
    "onnxruntime": ("onnxruntime", "assets"),
    "skimage": ("scikit-image", "assets"),
    "easy_vqa": ("easy-vqa", "assets"),
    "torch_quickfps": ("torch-quickfps", "quickfps"),
}


def missing_extra(error: BaseException | None) -> str | None:
    """One line naming the package and the extra to install when `error` (or an error it was raised from) is the
    `ImportError` of an optional dependency; None otherwise."""
    while error is not None:
        name = (getattr(error, "name", None) or "").split(".")[0] if isinstance(error, ImportError) else ""
        if name in OPTIONAL_DEPENDENCIES:
            package, extra = OPTIONAL_DEPENDENCIES[name]
            return f"this needs the optional package {package!r}, which is not installed: pip install 'hf-fna[{extra}]'"
        error = error.__cause__
    return None
