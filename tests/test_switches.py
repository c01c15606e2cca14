"""Where settings come from (config attribute > fna_config.json beside the weights > defaults), saving a model so that a
plain reload runs FNA, and turning FNA off: `hf_fna.exact`, `set_attn_implementation`, `hf_fna.remove`."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModel

import hf_fna
from hf_fna import FNAConfig
from tiny_families import family


def _save(fam, folder, fna_config: FNAConfig | None = None, file_config: FNAConfig | None = None) -> str:
    torch.manual_seed(0)
    model = fam.model_class(copy.deepcopy(fam.config))
    if fna_config is not None:
        (model.config if fam.tower is None else getattr(model.config, fam.tower)).fna_config = fna_config.to_dict()
    model.save_pretrained(folder)
    if file_config is not None:
        file_config.save_pretrained(folder)  # fna_config.json beside the weights
    return str(folder)


def _configured(model) -> dict[int, str]:
    """The vision tower's layers configured for FNA (a CLIP text tower loaded with "fna" has a plan of its own)."""
    return {r.layer: r.reason for r in hf_fna.explain(model).layers if r.configured and r.tower != "text_config"}


@pytest.mark.parametrize("name", ["dinov2", "clip"])
def test_fna_config_json_beside_the_weights_is_used_when_the_config_carries_none(name, tmp_path, fna_calls):
    fam = family(name)
    folder = _save(fam, tmp_path, file_config=FNAConfig(layers="2:", num_landmarks=5, min_tokens=0))
    model = AutoModel.from_pretrained(folder, attn_implementation="fna").eval()
    assert sorted(_configured(model)) == [2, 3]  # the defaults ("auto" = 2:) would agree on layers: check m too
    with torch.no_grad():
        model(**fam.make_inputs(2))
    assert fna_calls == [fam.tokens, fam.tokens]
    assert hf_fna.explain(model).layers[-1].reason == "FNA, m=5"
    tower = model.config if fam.tower is None else getattr(model.config, fam.tower)
    assert FNAConfig.from_model_config(tower) == FNAConfig(layers="2:", num_landmarks=5, min_tokens=0)


def test_the_config_attribute_wins_over_fna_config_json_and_defaults_apply_without_either(tmp_path):
    fam = family("dinov2")
    attribute, file = FNAConfig(layers="3:", num_landmarks=4, min_tokens=0), FNAConfig(layers="1:", min_tokens=0)
    model = AutoModel.from_pretrained(_save(fam, tmp_path / "both", attribute, file), attn_implementation="fna")
    assert sorted(_configured(model)) == [3]
    model = AutoModel.from_pretrained(_save(fam, tmp_path / "none"), attn_implementation="fna")
    assert sorted(_configured(model)) == [2, 3]  # layers="auto": the second half
    assert getattr(model.config, "fna_config", None) is None


def test_an_invalid_fna_config_json_is_named_before_attention_runs(tmp_path):
    fam = family("dinov2")
    folder = _save(fam, tmp_path)
    (tmp_path / "fna_config.json").write_text(json.dumps({"sampling": "kmeans"}))
    model = AutoModel.from_pretrained(folder, attn_implementation="fna")
    with pytest.raises(ValueError, match=r"fna_config\.json.*sampling='kmeans'"):
        model(**fam.make_inputs(1))


@pytest.mark.parametrize("name", ["dinov2", "clip"])
def test_hf_fna_save_pretrained_makes_a_plain_reload_run_fna(name, tmp_path):
    fam = family(name)
    torch.manual_seed(0)
    model = fam.model_class(fam.config).eval()
    FNAConfig(layers="1:", num_landmarks=6, min_tokens=0).apply(model)
    inputs = fam.make_inputs(2)
    with torch.no_grad():
        expected = fam.output(model(**inputs))

    model.save_pretrained(tmp_path / "plain")  # Transformers keeps the settings, not the backend
    plain = AutoModel.from_pretrained(tmp_path / "plain").eval()
    assert not hf_fna.explain(plain).layers
    assert FNAConfig.from_pretrained(tmp_path / "plain") == FNAConfig(layers="1:", num_landmarks=6, min_tokens=0)

    hf_fna.save_pretrained(model, tmp_path / "kept")
    assert not hasattr(model.config, "attn_implementation")  # the model itself is unchanged
    reloaded = AutoModel.from_pretrained(tmp_path / "kept").eval()
    with torch.no_grad():
        torch.testing.assert_close(fam.output(reloaded(**inputs)), expected, atol=1e-6, rtol=0)
    assert hf_fna.explain(reloaded).ran_fna() == [1, 2, 3]
    exact = AutoModel.from_pretrained(tmp_path / "kept", attn_implementation="sdpa")
    assert not hf_fna.explain(exact).layers


def test_save_pretrained_refuses_a_model_without_fna(tmp_path):
    fam = family("vit")
    with pytest.raises(ValueError, match="runs FNA in no tower"):
        hf_fna.save_pretrained(fam.model_class(fam.config), tmp_path)


def test_exact_runs_sdpa_inside_the_block_and_restores_fna_after_it_even_on_error(fna_calls):
    fam = family("clip")
    torch.manual_seed(0)
    model = fam.model_class(fam.config).eval()
    with torch.no_grad():  # peaked attention, as in trained models (random init gives near-uniform attention)
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(6.0)
    sdpa = fam.model_class(copy.deepcopy(fam.config)).eval()
    sdpa.load_state_dict(model.state_dict())
    FNAConfig(layers="1:", num_landmarks=6, min_tokens=0).apply(model)
    inputs = fam.make_inputs(2)
    with torch.no_grad():
        fna_output, reference = fam.output(model(**inputs)), fam.output(sdpa(**inputs))
        assert not torch.allclose(fna_output, reference, atol=1e-3)  # FNA approximates here
        fna_calls.clear()
        with hf_fna.exact(model):
            with hf_fna.exact(model):  # nested
                torch.testing.assert_close(fam.output(model(**inputs)), reference, atol=1e-6, rtol=0)
            torch.testing.assert_close(fam.output(model(**inputs)), reference, atol=1e-6, rtol=0)
            assert not hf_fna.explain(model).layers
        assert fna_calls == []
        with pytest.raises(RuntimeError, match="boom"), hf_fna.exact(model):
            raise RuntimeError("boom")
        torch.testing.assert_close(fam.output(model(**inputs)), fna_output, atol=0, rtol=0)
    assert model.config.vision_config._attn_implementation == "fna"
    assert model.config.text_config._attn_implementation == "sdpa"
    assert fna_calls  # FNA ran again after the blocks


def test_set_attn_implementation_and_remove_turn_fna_off(fna_calls):
    fam = family("dinov2")
    torch.manual_seed(0)
    model = fam.model_class(fam.config).eval()
    FNAConfig(layers="2:", num_landmarks=6, min_tokens=0).apply(model)
    with torch.no_grad():
        model(**fam.make_inputs(1))
    assert hf_fna.explain(model).ran_fna() == [2, 3]
    model.set_attn_implementation("sdpa")
    assert not hf_fna.explain(model).layers
    model.set_attn_implementation("fna")
    assert hf_fna.explain(model).ran_fna() == [2, 3]  # the plans survive a round trip

    hf_fna.remove(model)
    assert model.config._attn_implementation == "sdpa"
    assert getattr(model.config, "fna_config", None) is None
    fna_calls.clear()
    with torch.no_grad():
        model(**fam.make_inputs(1))
    assert fna_calls == [] and not hf_fna.explain(model).layers
    with pytest.raises(ValueError, match="would keep FNA"):
        hf_fna.remove(model, attn_implementation="fna")
