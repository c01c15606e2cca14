"""The backend runs without the tools' optional dependencies, and the tools name the extra to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from hf_fna.extras import OPTIONAL_DEPENDENCIES, missing_extra

# Everything optional but tqdm, which Transformers itself requires.
HIDDEN = sorted(name for name in OPTIONAL_DEPENDENCIES if name != "tqdm")

SCRIPT = textwrap.dedent(
    """
    import importlib.machinery, json, os, sys

    HIDDEN = set(sys.argv[1].split(","))


    class Hiding:
        '''The path finder, blind to the hidden packages: as if they were not installed (find_spec gives None).'''

        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in HIDDEN:
                return None
            return self.finder.find_spec(name, path, target)

        def find_distributions(self, *args, **kwargs):  # importlib.metadata asks the finders too
            return self.finder.find_distributions(*args, **kwargs)

        def invalidate_caches(self):
            self.finder.invalidate_caches()


    sys.meta_path[:] = [Hiding(f) if f is importlib.machinery.PathFinder else f for f in sys.meta_path]

    import torch
    from transformers import AutoModel, Dinov2Config, Dinov2Model

    import hf_fna
    from hf_fna.cli import main

    folder, out = sys.argv[2], {}
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                          image_size=32, patch_size=8)
    Dinov2Model(config).save_pretrained(folder)
    model = AutoModel.from_pretrained(folder, attn_implementation="fna").eval()
    hf_fna.FNAConfig(layers="2:", num_landmarks=6, min_tokens=0).apply(model)
    with torch.no_grad():
        model(pixel_values=torch.randn(2, 3, 32, 32))
    out["ran_fna"] = hf_fna.explain(model).ran_fna()
    with open(f"{folder}/photo.png", "wb") as f:  # an image file for calibrate --images: reading it needs pillow
        f.write(b"not decoded: pillow is missing first")
    report = hf_fna.calibrate(model, torch.randn(4, 3, 32, 32), target=0.5, candidates=(8,), progress=False)
    out["calibrated"] = report.config.layers
    out["codes"] = [
        main(["compare", "--model", folder, "--resolutions", "32", "--photos", "1", "--probe-train", "0",
              "--probe-test", "0"]),
        main(["calibrate", "--model", folder, "--images", folder, "--resolution", "32"]),
    ]
    out["loaded"] = sorted({m.partition(".")[0] for m in sys.modules} & HIDDEN)
    print(json.dumps(out))
    """
)


def test_the_backend_runs_without_the_optional_dependencies_and_tools_name_the_extra(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, ",".join(HIDDEN), str(tmp_path / "model")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["ran_fna"] == [2, 3] and out["calibrated"] == "none"
    assert out["loaded"] == []  # nothing optional was imported
    assert out["codes"] == [2, 2]
    lines = [line for line in result.stderr.splitlines() if line.startswith("hf-fna ")]
    assert len(lines) == 2, result.stderr[-3000:]
    for line in lines:
        assert "which is not installed: pip install 'hf-fna[" in line, line
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("module", "extra"),
    [("datasets", "eval"), ("PIL.Image", "eval"), ("skimage", "assets"), ("torch_quickfps", "quickfps")],
)
def test_missing_extra_names_the_package_and_extra(module, extra):
    error = ModuleNotFoundError(f"No module named {module!r}", name=module)
    assert missing_extra(error).endswith(f"pip install 'hf-fna[{extra}]'")
    wrapped = ImportError("hf_fna.assets needs it")
    wrapped.__cause__ = error
    assert missing_extra(wrapped) == missing_extra(error)
    assert missing_extra(ModuleNotFoundError("No module named 'numpy'", name="numpy")) is None


def test_version_flag_prints_the_package_version(capsys):
    import hf_fna
    from hf_fna.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"hf-fna {hf_fna.__version__}"


def test_import_hf_fna_loads_none_of_the_tools_heavy_dependencies():
    """`import hf_fna` (the backend, FNAConfig, explain, calibrate) imports no package only the tools need, although
    all of them are installed here: the tools import theirs when they run."""
    heavy = ("datasets", "evaluate", "sklearn", "matplotlib", "onnx", "onnxruntime")
    code = f"import sys, hf_fna; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"import hf_fna imported {result.stdout.strip()}"
