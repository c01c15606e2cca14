"""Faults and bad input at the command line and in files (issue 11, items 3, 7, 8 and 9).

Every bad input must end in one line on stderr and exit status 2, before any compute when the input can be checked
up front; a file that cannot be written must not take the printed table with it, and must never replace a good file
with a partial one. Tiny random models, offline.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

from hf_fna import FNAConfig, assets
from hf_fna.cli import main
from hf_fna.tools import outputs

PATCH = 4


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("dinov2"))
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        patch_size=PATCH,
        image_size=32,
    )
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    """Files that are not what their name promises."""
    root = tmp_path_factory.mktemp("bad")
    files = {
        "list_json": root / "list.json",
        "list_model_config": root / "list_model" / "config.json",
        "string_vision_config": root / "string_vision" / "config.json",
        "corrupt": root / "corrupt" / "fna_config.json",
        "binary": root / "binary" / "fna_config.json",
        "bad_field": root / "bad_field" / "fna_config.json",
        "a_file": root / "a_file",
    }
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    files["list_json"].write_text("[1, 2]")
    files["list_model_config"].write_text("[1]")
    files["string_vision_config"].write_text(json.dumps({"vision_config": "clip"}))
    files["corrupt"].write_text('{"layers": ')
    files["binary"].write_bytes(bytes(range(256)))
    files["bad_field"].write_text(json.dumps({"num_landmarks": 0}))
    files["a_file"].write_text("x")
    return files


def _one_line_error(capsys, command: str, *argv: str) -> str:
    capsys.readouterr()
    assert main([command, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith(f"hf-fna {command}: error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


# --- FNAConfig.from_pretrained on bad files (item 7) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("list_json", "expects a dict, got list"),
        ("list_model_config", "not a model config.json"),
        ("string_vision_config", "not a model config.json"),
        ("corrupt", "is not a valid JSON file"),
        ("binary", "is not a valid JSON file"),
        ("bad_field", "FNAConfig.num_landmarks=0 is invalid"),
    ],
)
def test_from_pretrained_on_a_bad_file_names_the_file(bad_files, name, expected):
    path = bad_files[name]
    source = path if name == "list_json" else path.parent
    with pytest.raises(ValueError, match=expected) as info:
        FNAConfig.from_pretrained(source)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("path", ["/nonexistent/folder", "./missing-folder", "missing/deeper/fna_config.json"])
def test_from_pretrained_on_a_missing_local_path_says_it_does_not_exist(path):
    with pytest.raises(OSError, match="does not exist") as info:
        FNAConfig.from_pretrained(path)
    assert "Repo id must" not in str(info.value)


def test_model_config_without_fna_config_still_reads_as_absent(tiny_dinov2):
    with pytest.raises(OSError, match="carries no `fna_config`"):
        FNAConfig.from_pretrained(tiny_dinov2)


# --- one line instead of a traceback (item 7) ------------------------------------------------------------------------


def test_eval_bad_counts_and_seeds(capsys, tiny_dinov2):
    base = ["--task", "probe", "--model", tiny_dinov2, "--dataset", "hf_fna:fashion_mnist", "--no-progress"]
    assert "num_workers must be >= 0" in _one_line_error(capsys, "eval", *base, "--num-workers", "-1")
    assert "seed must be an integer in [0, " in _one_line_error(capsys, "eval", *base, "--seed", "-1")
    assert "seed must be an integer in [0, " in _one_line_error(capsys, "eval", *base, "--seed", str(2**70))


def test_eval_and_inspect_missing_local_paths(capsys, tiny_dinov2):
    base = ["--task", "probe", "--dataset", "hf_fna:fashion_mnist", "--no-progress"]
    message = _one_line_error(capsys, "eval", *base, "--model", "/nonexistent/model")
    assert "does not exist" in message and "Repo id" not in message
    message = _one_line_error(capsys, "eval", *base, "--model", tiny_dinov2, "--fna-config", "/nonexistent/f.json")
    assert "does not exist" in message and "Repo id" not in message
    message = _one_line_error(capsys, "inspect", "--model", "/nonexistent/model")
    assert "does not exist" in message and "Repo id" not in message


def test_push_config_out_is_a_file_and_config_is_a_list(capsys, bad_files):
    base = ["--repo-id", "user/settings", "--base-model", "facebook/dinov2-small", "--dry-run"]
    message = _one_line_error(capsys, "push-config", *base, "--out", str(bad_files["a_file"]))
    assert "is a file" in message
    out = str(bad_files["a_file"].parent / "out")
    message = _one_line_error(capsys, "push-config", *base, "--out", out, "--config", str(bad_files["list_json"]))
    assert "expects a dict, got list" in message
    message = _one_line_error(capsys, "push-config", *base, "--out", out, "--config", str(bad_files["binary"].parent))
    assert str(bad_files["binary"]) in message


def test_unusable_cache_is_one_line_in_compare_and_inspect(capsys, monkeypatch, bad_files):
    # A cache folder that cannot be created (below a plain file; as root, a read-only folder would still be writable).
    monkeypatch.setenv("HF_FNA_CACHE", str(bad_files["a_file"] / "cache"))
    monkeypatch.delenv("HF_FNA_WHEEL_DIR", raising=False)
    assert "HF_FNA_CACHE" in _one_line_error(capsys, "compare", "--resolutions", "224")
    assert "HF_FNA_CACHE" in _one_line_error(capsys, "inspect", "--out", str(bad_files["a_file"].parent / "figures"))


def test_python_dash_m_entry_point_prints_one_line(tiny_dinov2):
    # `python -m hf_fna.cli` (used with torchrun/accelerate launch) runs cli.py as __main__.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(outputs.__file__).parents[1]), *sys.path])}
    argv = ["eval", "--task", "probe", "--model", tiny_dinov2, "--dataset", "x", "--num-workers", "-1"]
    proc = subprocess.run([sys.executable, "-m", "hf_fna.cli", *argv], capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "num_workers must be >= 0" in proc.stderr


# --- validation gaps (item 8) ----------------------------------------------------------------------------------------


def test_eval_image_size_must_be_a_multiple_of_the_patch(capsys, tiny_dinov2):
    argv = ["--task", "probe", "--model", tiny_dinov2, "--dataset", "hf_fna:fashion_mnist", "--image-size", "13"]
    assert "nearest valid sizes: 12, 16" in _one_line_error(capsys, "eval", *argv)


@pytest.mark.parametrize(("option", "value"), [("--min-gap", "-1"), ("--std-threshold", "-5"), ("--min-gap", "nan")])
def test_inspect_refuses_negative_or_nan_thresholds(capsys, tiny_dinov2, tmp_path, option, value):
    argv = ["--model", tiny_dinov2, "--out", str(tmp_path), option, value]
    assert "finite number >= 0" in _one_line_error(capsys, "inspect", *argv)


# --- output paths: checked first, written atomically, table printed anyway (item 3) ----------------------------------


def _unwritable(tmp_path: Path) -> dict[str, str]:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, so nothing can be created below it")
    return {"below a file": str(blocker / "x.json"), "a folder": str(tmp_path)}


@pytest.mark.parametrize("case", ["below a file", "a folder"])
def test_output_paths_are_checked_before_computing(capsys, monkeypatch, tiny_dinov2, tmp_path, case):
    import hf_fna.evaluation.runner
    import hf_fna.tools.compare
    import hf_fna.tools.inspection

    def no_compute(*args, **kwargs):
        raise AssertionError("computed before checking the output path")

    monkeypatch.setattr(hf_fna.evaluation.runner, "load_config", no_compute)
    monkeypatch.setattr(hf_fna.tools.compare, "load_pair", no_compute)
    monkeypatch.setattr(hf_fna.tools.inspection, "load_vision_model", no_compute)
    path = _unwritable(tmp_path)[case]
    eval_argv = ["--task", "probe", "--model", tiny_dinov2, "--dataset", "hf_fna:fashion_mnist", "--output", path]
    assert "cannot write" in _one_line_error(capsys, "eval", *eval_argv)
    for option in ("--json", "--plot"):
        assert "cannot write" in _one_line_error(capsys, "compare", "--model", tiny_dinov2, option, path)
    figures = str(tmp_path / "figures")
    message = _one_line_error(capsys, "inspect", "--model", tiny_dinov2, "--out", figures, "--json", path)
    assert "cannot write" in message
    assert not os.path.exists(figures)  # checked, not created: a failed run leaves no empty folder
    if case == "below a file":
        assert "cannot write" in _one_line_error(capsys, "inspect", "--model", tiny_dinov2, "--out", path)


def _fail_mid_write(monkeypatch):
    """Make every file write fail once its bytes are written, as a full disk would (at the final fsync)."""

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)


def test_compare_prints_the_table_and_keeps_the_old_file_when_writing_fails(capsys, monkeypatch, tiny_dinov2, tmp_path):
    report, plot = tmp_path / "report.json", tmp_path / "plot.png"
    report.write_text('{"good": true}\n')
    _fail_mid_write(monkeypatch)
    argv = ["--model", tiny_dinov2, "--resolutions", "16", "--photos", "1", "--probe-train", "0", "--probe-test", "0"]
    message = _one_line_error(
        capsys, "compare", "--threads", "1", "--no-progress", *argv, "--json", str(report), "--plot", str(plot)
    )
    assert "No space left on device" in message and "--json" in message and "--plot" in message
    assert json.loads(report.read_text()) == {"good": True}
    assert not plot.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_compare_json_is_replaced_whole_and_readable_by_others(capsys, tiny_dinov2, tmp_path):
    report = tmp_path / "report.json"
    report.write_text("old")
    argv = ["--model", tiny_dinov2, "--resolutions", "16", "--photos", "1", "--probe-train", "0", "--probe-test", "0"]
    assert main(["compare", "--threads", "1", "--no-progress", *argv, "--json", str(report)]) == 0
    assert json.loads(report.read_text())["rows"][0]["resolution"] == 16
    assert oct(report.stat().st_mode & 0o777) == oct(0o644)


def test_eval_prints_the_table_even_when_the_report_cannot_be_written(capsys, monkeypatch, tiny_dinov2, tmp_path):
    report = tmp_path / "report.json"
    _fail_mid_write(monkeypatch)
    argv = ["--task", "probe", "--model", tiny_dinov2, "--dataset", "hf_fna:fashion_mnist", "--limit", "4"]
    argv += ["--train-limit", "20", "--batch-size", "4", "--no-progress", "--output", str(report)]
    capsys.readouterr()
    assert main(["eval", *argv]) == 2
    captured = capsys.readouterr()
    assert "| probe (4 samples) | exact | fna | fna - exact |" in captured.out
    assert "the table above is complete" in captured.err and "Traceback" not in captured.err
    assert list(tmp_path.iterdir()) == []


def test_inspect_prints_the_report_even_when_figures_cannot_be_written(capsys, monkeypatch, tiny_dinov2, tmp_path):
    _fail_mid_write(monkeypatch)
    capsys.readouterr()
    argv = ["--model", tiny_dinov2, "--image", "astronaut", "--resolution", "32", "--landmarks", "4"]
    assert main(["inspect", *argv, "--out", str(tmp_path / "figures"), "--json", str(tmp_path / "r.json")]) == 2
    captured = capsys.readouterr()
    assert "landmarks: 4 chosen by FNA" in captured.out
    assert "the report above is complete" in captured.err and "No space left on device" in captured.err
    assert list((tmp_path / "figures").iterdir()) == [] and not (tmp_path / "r.json").exists()


# --- cache cleanup (item 9) ------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_cache_cleanup_removes_only_this_packages_leftovers(tmp_path):
    dead = _dead_pid()
    foreign = [tmp_path / f".tmp-{dead}-build", tmp_path / f".tmp-{dead}-dinov2-abc", tmp_path / "other"]
    ours_dead = assets._temp_dir(tmp_path, "dinov2")
    ours_dead.rename(tmp_path / ours_dead.name.replace(f"-{os.getpid()}-", f"-{dead}-"))
    ours_alive = assets._temp_dir(tmp_path, "pip")
    for folder in foreign:
        folder.mkdir()
    assets._remove_stale_temps(tmp_path)
    remaining = sorted(p.name for p in tmp_path.iterdir())
    assert remaining == sorted([*(f.name for f in foreign), ours_alive.name])
