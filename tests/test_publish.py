"""`hf-fna push-config` and the model card, without network access (HfApi methods are monkeypatched)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard

from hf_fna import FNAConfig, MaskingConfig
from hf_fna.cli import main
from hf_fna.config import field_help
from hf_fna.tools.publish import model_card, write_config_folder

BASE = "facebook/dinov2-small"
REPO = "someone/dinov2-small-fna"
SETTINGS = FNAConfig(
    layers=[6, 7, 8, 9, 10, 11],
    num_landmarks=128,
    masking=MaskingConfig(
        intervention="sink_keep_self", detect="attention", detect_layer=6, from_layer=6, max_tokens=4
    ),
)
MEASURED = {"command": "hf-fna compare --model facebook/dinov2-small", "machine": "2-core CPU", "speed-up": "1.3x"}


def _metadata(card: str) -> dict:
    assert card.startswith("---\n")
    return ModelCard(card).data.to_dict()


def test_model_card_front_matter_settings_and_usage():
    card = model_card(SETTINGS, BASE, repo_id=REPO)
    metadata = _metadata(card)
    assert metadata["library_name"] == "transformers" and metadata["base_model"] == BASE
    assert {"fna", "vision"} <= set(metadata["tags"])
    for name in [*SETTINGS.to_dict(), *(f"masking.{k}" for k in SETTINGS.to_dict()["masking"])]:
        if name != "masking":
            assert f"| `{name}` |" in card, name
            assert field_help()[name] in card
    assert '| `masking.intervention` | `"sink_keep_self"` |' in card and "| `num_landmarks` | `128` |" in card
    assert "import hf_fna" in card and f'FNAConfig.from_pretrained("{REPO}").apply(model)' in card
    assert 'attn_implementation="fna"' in card
    assert "Recommended settings, not measured" in card


def test_model_card_with_measured_figures():
    card = model_card(SETTINGS, BASE, MEASURED)
    assert "not measured" not in card
    assert "| speed-up | 1.3x |" in card and MEASURED["command"] in card and "2-core CPU" in card
    with pytest.raises(ValueError, match="machine"):
        model_card(SETTINGS, BASE, {"command": "x", "speed-up": "2x"})
    with pytest.raises(ValueError, match="figures"):
        model_card(SETTINGS, BASE, {"command": "x", "machine": "y"})


def test_write_config_folder_round_trips(tmp_path):
    paths = write_config_folder(SETTINGS, tmp_path / "card", BASE)
    assert [Path(p).name for p in paths] == ["fna_config.json", "README.md"]
    assert FNAConfig.from_pretrained(str(tmp_path / "card")) == SETTINGS
    assert _metadata(Path(paths[1]).read_text())["base_model"] == BASE


@pytest.fixture
def hub(monkeypatch):
    """Capture what `push-config` would create and upload; any other Hub call fails the test."""
    calls: dict = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, "token": self.token, **kwargs}
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {p.name: p.read_text(encoding="utf-8") for p in Path(folder_path).iterdir()}
        calls["upload_folder"] = {"repo_id": repo_id, "files": files, **kwargs}

    def forbidden(self, *args, **kwargs):
        raise AssertionError("unexpected Hub call")

    for name in ("upload_file", "create_commit", "whoami", "repo_info"):
        monkeypatch.setattr(HfApi, name, forbidden)
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_config_uploads_config_and_card(hub, tmp_path, capsys):
    config_file = tmp_path / "settings.json"
    SETTINGS.to_json_file(config_file)
    code = main([
        "push-config", "--repo-id", REPO, "--base-model", BASE, "--config", str(config_file),
        "--token", "hf_test", "--private",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert hub["create_repo"] == {"repo_id": REPO, "token": "hf_test", "exist_ok": True, "private": True}
    upload = hub["upload_folder"]
    assert upload["repo_id"] == REPO and sorted(upload["files"]) == ["README.md", "fna_config.json"]
    assert FNAConfig.from_dict(json.loads(upload["files"]["fna_config.json"])) == SETTINGS
    metadata = _metadata(upload["files"]["README.md"])
    assert metadata["base_model"] == BASE and metadata["library_name"] == "transformers"
    assert f"https://huggingface.co/{REPO}" in capsys.readouterr().out


def test_push_config_dry_run_writes_files_and_uploads_nothing(hub, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([
        "push-config", "--repo-id", REPO, "--base-model", BASE, "--layers", "6:", "--landmarks", "32",
        "--dry-run", "--out", str(out),
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert hub == {}
    assert FNAConfig.from_pretrained(str(out)) == FNAConfig(layers="6:", num_landmarks=32)
    card = (out / "README.md").read_text()
    assert _metadata(card)["tags"][:2] == ["fna", "vision"] and "Recommended settings, not measured" in card


def test_push_config_measured_file(hub, tmp_path, capsys):
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps(MEASURED))
    code = main(["push-config", "--repo-id", REPO, "--base-model", BASE, "--measured", str(measured)])
    assert code == 0, capsys.readouterr().err
    card = hub["upload_folder"]["files"]["README.md"]
    assert "| speed-up | 1.3x |" in card and "not measured" not in card


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--repo-id", "not a repo", "--base-model", BASE], "--repo-id 'not a repo' is not a Hub repo id"),
        (["--repo-id", REPO, "--base-model", "/local/folder"], "--base-model"),
        (["--repo-id", REPO, "--base-model", BASE, "--dry-run"], "--dry-run needs --out"),
        (["--repo-id", REPO, "--base-model", BASE, "--config", "x.json", "--landmarks", "8"], "not both"),
        (["--repo-id", REPO, "--base-model", BASE, "--landmarks", "0"], "num_landmarks"),
        (["--repo-id", REPO, "--base-model", BASE, "--layers", "first"], "layers"),
    ],
)
def test_push_config_user_errors(hub, capsys, extra, expected):
    assert main(["push-config", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-fna push-config: error: ") and err.count("\n") == 1 and expected in err, err
    assert hub == {}


def test_push_config_bad_files_and_failed_upload(hub, tmp_path, capsys, monkeypatch):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for option in ("--config", "--measured"):
        assert main(["push-config", "--repo-id", REPO, "--base-model", BASE, option, str(broken)]) == 2
        assert f"cannot read {option}" in capsys.readouterr().err

    def offline(self, *args, **kwargs):
        raise OSError("Network is unreachable\nmore detail")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    assert main(["push-config", "--repo-id", REPO, "--base-model", BASE]) == 2
    err = capsys.readouterr().err
    assert err == f"hf-fna push-config: error: upload to {REPO} failed: OSError: Network is unreachable\n"


MODEL_CARDS = Path(__file__).resolve().parents[1] / "model_cards"


@pytest.mark.parametrize("folder", sorted(p.name for p in MODEL_CARDS.iterdir() if p.is_dir()))
def test_bundled_model_cards_match_their_settings(folder):
    # Each bundled card is what `model_card` writes for its fna_config.json (and measured.json, when the figures were
    # measured): a setting edited in one file and not the other fails here.
    path = MODEL_CARDS / folder
    fna_config = FNAConfig.from_pretrained(path)
    card = (path / "README.md").read_text(encoding="utf-8")
    measured_path = path / "measured.json"
    measured = json.loads(measured_path.read_text(encoding="utf-8")) if measured_path.exists() else None
    assert card == model_card(fna_config, _metadata(card)["base_model"], measured)
    assert ("Recommended settings, not measured" in card) == (measured is None)


def test_card_states_the_token_count_from_which_the_settings_act():
    default = model_card(FNAConfig(), BASE)
    assert "**512 tokens or more**" in default and "257 tokens, too few for these settings" in default
    assert "The break-even on CUDA has not been measured." in default
    low = model_card(FNAConfig(min_tokens=100, num_landmarks=128), BASE)
    assert "**128 tokens or more**" in low and "257 tokens, enough for these settings" in low
