"""Massive-token and sink detection, and the masking interventions against explicit reference computations."""

from __future__ import annotations

import pytest
import torch

from hf_fna import FNAConfig, MaskingConfig, detect_attention_sinks, detect_high_norm_tokens, detect_massive_tokens
from hf_fna.integration.plans import layer_plan, tower_plans
from hf_fna.ops import exact_attention
from hf_fna.ops.nystrom import nystrom_attention
from tiny_families import family

MODES = ["mask", "sink", "sink_keep_self"]


def reference_attention(q, k, v, flagged, mode, scale):
    """Exact attention with the intervention written out on the full matrix."""
    logits = scale * q.double() @ k.double().transpose(-1, -2)
    columns = flagged[:, None, None, :]
    if mode == "mask":
        logits = logits.masked_fill(columns, float("-inf"))
    probs = logits.softmax(-1)
    weights = probs.masked_fill(columns, 0.0)
    if mode == "sink_keep_self":
        diagonal = torch.diagonal(probs, dim1=-2, dim2=-1) * flagged[:, None, :]
        weights = weights + torch.diag_embed(diagonal)
    return (weights @ v.double()).float()


def qkv_with_flags(tokens=24):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, tokens, 8, generator=generator) for _ in range(3))
    flagged = torch.zeros(2, tokens, dtype=torch.bool)
    flagged[0, [3, 7]] = True
    flagged[1, [11]] = True
    return q, k, v, flagged


@pytest.mark.parametrize("mode", MODES)
def test_exact_modes_equal_reference(mode):
    q, k, v, flagged = qkv_with_flags()
    expected = reference_attention(q, k, v, flagged, mode, 0.4)
    got, _ = exact_attention(q, k, v, scale=0.4, flagged=flagged, intervention=mode)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    got, weights = exact_attention(q, k, v, scale=0.4, flagged=flagged, intervention=mode, return_weights=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(weights @ v, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_fna_with_every_token_a_landmark_equals_reference(mode):
    q, k, v, flagged = qkv_with_flags()
    landmarks = torch.arange(24).expand(2, 24)
    got, _ = nystrom_attention(q, k, v, landmarks, scale=0.4, pinv="exact", flagged=flagged, intervention=mode)
    torch.testing.assert_close(got, reference_attention(q, k, v, flagged, mode, 0.4), atol=1e-5, rtol=0)


def test_detect_massive_tokens_by_norm_gap():
    hidden = torch.randn(2, 30, 16, generator=torch.Generator().manual_seed(0))
    hidden[0, [4, 9]] *= 60
    hidden[1, 17] *= 80
    hidden[:, 0] *= 200  # CLS: never flagged
    flags = detect_massive_tokens(hidden, num_special_tokens=1)
    assert flags[0].nonzero().flatten().tolist() == [4, 9]
    assert flags[1].nonzero().flatten().tolist() == [17]
    plain = torch.randn(2, 30, 16, generator=torch.Generator().manual_seed(1))
    assert not detect_massive_tokens(plain, num_special_tokens=1).any()
    assert detect_massive_tokens(hidden, num_special_tokens=1, max_tokens=1)[0].sum() <= 1


def test_detect_high_norm_tokens_by_ratio_to_the_median():
    hidden = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(0))
    norms = hidden.norm(dim=-1, keepdim=True)
    hidden[0, [4, 9, 20]] *= 12 * norms[0].median() / norms[0, [4, 9, 20]]  # 12x the median norm
    hidden[0, 30] *= 8 * norms[0].median() / norms[0, 30]  # 8x: below the threshold
    hidden[1, 17] *= 30
    hidden[:, 0] *= 200  # CLS: never flagged
    flags = detect_high_norm_tokens(hidden, num_special_tokens=1)
    assert flags[0].nonzero().flatten().tolist() == [4, 9, 20]
    assert flags[1].nonzero().flatten().tolist() == [17]
    assert detect_high_norm_tokens(hidden, min_ratio=7.0, num_special_tokens=1)[0].nonzero().flatten().tolist() == [
        4, 9, 20, 30,
    ]  # fmt: skip
    strongest = detect_high_norm_tokens(hidden, num_special_tokens=1, max_tokens=1)
    assert strongest.sum(dim=-1).tolist() == [1, 1] and strongest[1, 17]
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, 17] = False  # padding is never flagged
    assert not detect_high_norm_tokens(hidden, num_special_tokens=1, valid=valid)[1].any()
    plain = torch.randn(2, 30, 16, generator=torch.Generator().manual_seed(1))
    assert not detect_high_norm_tokens(plain, num_special_tokens=1).any()


def test_norm_gap_finds_more_massive_tokens_than_max_tokens_and_ignores_gaps_among_small_norms():
    hidden = torch.randn(1, 60, 16, generator=torch.Generator().manual_seed(0))
    hidden[0, 1:13] *= 50  # twelve massive tokens: the cut is found over all tokens, then capped
    hidden[0, 40:] *= 1e-4  # a wide gap among the smallest norms says nothing about massive tokens
    assert detect_massive_tokens(hidden, num_special_tokens=1)[0].nonzero().flatten().tolist() == list(range(1, 13))
    assert detect_massive_tokens(hidden, num_special_tokens=1, max_tokens=8)[0].sum() == 8


def test_detect_attention_sinks_iteratively():
    tokens = 40
    logits = torch.randn(2, 4, tokens, tokens, generator=torch.Generator().manual_seed(0))
    logits[0, :, :, [5, 12]] += 6.0  # everyone attends to 5 and 12
    logits[1, :, :, 30] += 7.0
    flags = detect_attention_sinks(logits.softmax(-1), std_threshold=4.0, num_special_tokens=1)
    assert flags[0].nonzero().flatten().tolist() == [5, 12]
    assert flags[1].nonzero().flatten().tolist() == [30]
    noise = torch.randn(3, 4, tokens, tokens, generator=torch.Generator().manual_seed(1))
    assert not detect_attention_sinks(noise.softmax(-1), std_threshold=4.0).any()


def _tiny_with_massive_tokens(
    tmp_path, masking: MaskingConfig, layers="none", num_landmarks=64, positions=(5, 9), pinv="exact"
):
    fam = family("dinov2")
    torch.manual_seed(0)
    model = fam.model_class(fam.config).eval()
    model.config.fna_config = FNAConfig(
        layers=layers, num_landmarks=num_landmarks, min_tokens=0, pinv=pinv, masking=masking
    ).to_dict()
    model.save_pretrained(tmp_path)
    model = fam.model_class.from_pretrained(tmp_path, attn_implementation="fna").eval()

    def make_massive(_module, _inputs, output):
        output = output.clone()
        output[:, list(positions)] *= 100.0
        return output

    model.encoder.layer[0].register_forward_hook(make_massive)
    return fam, model


def test_model_flags_massive_tokens_at_the_right_positions(tmp_path):
    masking = MaskingConfig(intervention="mask", detect="norm_gap", detect_layer=1, from_layer=2)
    fam, model = _tiny_with_massive_tokens(tmp_path, masking)
    with torch.no_grad():
        model(**fam.make_inputs(2))
    (tower,) = tower_plans(model)
    flags = tower.last_flagged[1]
    assert [row.nonzero().flatten().tolist() for row in flags] == [[5, 9], [5, 9]]


@pytest.mark.parametrize("mode", MODES)
def test_model_masking_fna_with_every_token_a_landmark_equals_exact_masking(mode, tmp_path):
    masking = MaskingConfig(intervention=mode, detect="norm_gap", detect_layer=1, from_layer=1)
    fam, exact = _tiny_with_massive_tokens(tmp_path / "exact", masking, layers="none")
    _, approximate = _tiny_with_massive_tokens(tmp_path / "fna", masking, layers="all", num_landmarks=fam.tokens)
    _, plain = _tiny_with_massive_tokens(tmp_path / "plain", MaskingConfig(), layers="none")
    inputs = fam.make_inputs(2)
    with torch.no_grad():
        masked = exact(**inputs).last_hidden_state
        torch.testing.assert_close(approximate(**inputs).last_hidden_state, masked, atol=1e-4, rtol=0)
        assert (plain(**inputs).last_hidden_state - masked).abs().max() > 1e-3  # the intervention acted


def test_attention_detection_in_model_runs(tmp_path):
    masking = MaskingConfig(intervention="sink_keep_self", detect="attention", detect_layer=2, from_layer=2)
    fam, model = _tiny_with_massive_tokens(tmp_path, masking, layers="all", num_landmarks=8, pinv="newton")
    with torch.no_grad():
        output = model(**fam.make_inputs(2)).last_hidden_state
    assert torch.isfinite(output).all()


def test_masking_layer_errors(tmp_path):
    fam = family("dinov2")
    model = fam.model_class(fam.config)
    with pytest.raises(ValueError, match="from_layer=1 precedes detect_layer=2"):
        FNAConfig(masking=MaskingConfig(intervention="mask", detect_layer=2, from_layer=1)).apply(model)
    with pytest.raises(ValueError, match="detect_layer=0 with detect='norm_gap'"):
        FNAConfig(masking=MaskingConfig(intervention="mask", detect="norm_gap", detect_layer=0)).apply(model)
    with pytest.raises(ValueError, match="detect_layer=0 with detect='norm_ratio' would read the patch embeddings"):
        FNAConfig(masking=MaskingConfig(intervention="mask", detect_layer=0, from_layer=0)).apply(model)
    with pytest.raises(ValueError, match=r"masking.detect_layer contains layer 9, out of range"):
        FNAConfig(masking=MaskingConfig(intervention="mask", detect_layer=9, from_layer=9)).apply(model)


def test_default_masking_layers_are_two_thirds_of_the_tower(tmp_path):
    fam = family("dinov2")
    model = fam.model_class(fam.config).eval()
    assert fam.config.num_hidden_layers == 4
    FNAConfig(layers="none", masking=MaskingConfig(intervention="sink")).apply(model)
    tower = layer_plan(model.encoder.layer[0].attention).tower_plan
    assert (tower.detect_layer, tower.from_layer) == (3, 3)  # round(4 * 2 / 3)
    assert FNAConfig(masking=MaskingConfig(intervention="sink")).resolve(12).detect_layer == 8
    assert FNAConfig(masking=MaskingConfig(intervention="sink")).resolve(24).detect_layer == 16
    with torch.no_grad():
        assert torch.isfinite(model(**fam.make_inputs(1)).last_hidden_state).all()
