"""Faults, bad input and unusual but legitimate use of the library (issue 11, items 1, 2, 4, 5, 6 and 8).

Tiny random models (tests/tiny_models.py), CPU, a few seconds in all. The command-line side of the issue is in
tests/test_faults_cli.py.
"""

from __future__ import annotations

import copy
import gc
import io
import json
import math

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

import hf_fna
from hf_fna import FNAConfig, MaskingConfig


def tiny_dinov2(depth: int = 4, **fna: object) -> Dinov2Model:
    """A tiny random DINOv2 (patch 8: 17 tokens at 32 px) with FNA applied with `fna` settings."""
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=depth, num_attention_heads=4, intermediate_size=64, patch_size=8
    )
    torch.manual_seed(0)
    model = Dinov2Model(config).eval()
    if fna:
        FNAConfig(**fna).apply(model)
    return model


def pixels(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))


def hidden(model, batch: int = 2, size: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixels(batch, size)).last_hidden_state


class MassiveTokens:
    """Forward hook making some tokens massive in the residual stream (as in trained ViTs); picklable."""

    def __init__(self, positions=(5, 9)) -> None:
        self.positions = list(positions)

    def __call__(self, _module, _args, output) -> None:
        output = output[0] if isinstance(output, tuple) else output
        output[:, self.positions] *= 100.0


def _massive_tokens(model) -> None:
    model.encoder.layer[0].register_forward_hook(MassiveTokens())


NORM_GAP = MaskingConfig(mode="mask", detect="norm_gap", detect_layer=1, from_layer=2)


# --- item 2: torch.compile ---------------------------------------------------------------------------------------


def test_compiled_model_loaded_with_fna_matches_eager(tmp_path):
    # Planned on its first (compiled) forward pass: the call-stack walk must not be traced by Dynamo.
    model = tiny_dinov2()
    model.config.fna_config = FNAConfig(layers="all", num_landmarks=8, min_tokens=0).to_dict()
    model.save_pretrained(tmp_path)
    expected = hidden(Dinov2Model.from_pretrained(tmp_path, attn_implementation="fna").eval())
    torch._dynamo.reset()
    compiled = torch.compile(Dinov2Model.from_pretrained(tmp_path, attn_implementation="fna").eval(), backend="eager")
    torch.testing.assert_close(hidden(compiled), expected, atol=1e-5, rtol=0)


def test_compiled_fna_survives_the_collection_of_an_earlier_model():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    settings = dict(layers="all", num_landmarks=8, min_tokens=0)
    earlier = tiny_dinov2(**settings)
    hidden(earlier)
    earlier.cycle = [earlier]  # garbage only a collection frees, as a compiled model's reference cycles are
    counter = CompileCounter()
    compiled = torch.compile(tiny_dinov2(**settings), backend=counter)
    expected = hidden(compiled)
    frames = counter.frame_count
    del earlier
    gc.collect()
    # The guards of the compiled model must not index into state keyed by other models' modules.
    torch.testing.assert_close(hidden(compiled), expected, atol=0, rtol=0)
    assert counter.frame_count == frames


# --- item 4: validation before anything changes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fna_config", "expected"),
    [
        ({"layers": "all", "num_landmark": 8}, "unknown field"),
        ({"layers": [7]}, "out of range for a tower with 4 layers"),
        (["layers", "all"], "expects a dict"),
        ({"masking": {"mode": "mask", "detect_layer": 9}}, "masking.detect_layer contains layer 9"),
    ],
)
def test_malformed_fna_config_in_config_json_is_named_before_any_attention_runs(tmp_path, fna_config, expected):
    model = tiny_dinov2()
    model.config.fna_config = fna_config
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["fna_config"] == fna_config
    loaded = Dinov2Model.from_pretrained(tmp_path, attn_implementation="fna").eval()
    ran = []
    loaded.encoder.layer[0].register_forward_hook(lambda *_: ran.append(True))
    with pytest.raises(ValueError, match=rf"Dinov2Config\.fna_config is invalid: .*{expected}"):
        hidden(loaded)
    assert not ran  # raised in the first attention call, before any layer finished
    with pytest.raises(ValueError, match=expected):  # the documented way to check right after loading
        FNAConfig.from_model_config(loaded.config).apply(loaded)


def test_apply_with_bad_masking_layers_leaves_the_model_unchanged():
    model = tiny_dinov2()
    before = hidden(model)
    bad = FNAConfig(layers="all", masking=MaskingConfig(mode="mask", detect_layer=2, from_layer=1))
    with pytest.raises(ValueError, match="precedes detect_layer"):
        bad.apply(model)
    assert getattr(model.config, "fna_config", None) is None
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(hidden(model), before, atol=0, rtol=0)
    FNAConfig(layers="all", num_landmarks=8, min_tokens=0).apply(model)  # and a good config still applies
    assert hf_fna.last_landmarks(model) is None and hidden(model).shape == before.shape


# --- item 6: state that leaks ------------------------------------------------------------------------------------


def test_torch_save_of_a_model_with_norm_gap_masking_round_trips():
    model = tiny_dinov2(layers="none", masking=NORM_GAP)
    _massive_tokens(model)
    expected = hidden(model)
    flags = hf_fna.last_flagged_tokens(model)
    assert [row.nonzero().flatten().tolist() for row in flags] == [[5, 9], [5, 9]]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    torch.testing.assert_close(hidden(loaded), expected, atol=0, rtol=0)
    assert torch.equal(hf_fna.last_flagged_tokens(loaded), flags)
    detectors = [
        hook
        for m in loaded.modules()
        for hook in m._forward_pre_hooks.values()
        if type(hook).__name__ == "NormGapDetector"
    ]
    assert len(detectors) == 1  # the pickled hook is reused, not doubled, when the copy is planned


def test_deepcopy_writes_its_flags_into_its_own_state_only():
    model = tiny_dinov2(layers="none", masking=NORM_GAP)
    _massive_tokens(model)
    twin = copy.deepcopy(model)
    hidden(twin, batch=3)
    hidden(twin, batch=3)  # the second pass runs the copy's hook with the copy's plan
    assert hf_fna.last_flagged_tokens(model) is None
    assert hf_fna.last_flagged_tokens(twin).shape == (3, 17)
    hidden(model)
    assert hf_fna.last_flagged_tokens(model).shape == (2, 17)
    assert hf_fna.last_flagged_tokens(twin).shape == (3, 17)


def test_last_landmarks_is_cleared_by_a_pass_that_fell_back_to_exact():
    model = tiny_dinov2(layers="all", num_landmarks=8, min_tokens=10)
    hidden(model, size=32)  # 17 tokens: FNA
    assert hf_fna.last_landmarks(model).shape == (2, 8)
    hidden(model, size=16)  # 5 tokens < min_tokens: exact attention, no landmarks
    assert hf_fna.last_landmarks(model) is None


def test_in_place_edit_of_fna_config_takes_effect():
    model = tiny_dinov2(layers="all", num_landmarks=8, min_tokens=0)
    hidden(model)
    assert hf_fna.last_landmarks(model).shape == (2, 8)
    model.config.fna_config["num_landmarks"] = 12
    hidden(model)
    assert hf_fna.last_landmarks(model).shape == (2, 12)
    model.config.fna_config["layers"] = "none"
    assert torch.equal(hidden(model), hidden(tiny_dinov2()))


# --- item 8: validation gaps -------------------------------------------------------------------------------------


def test_seed_range_is_what_torch_generator_accepts():
    with pytest.raises(ValueError, match=r"FNAConfig.seed=1180591620717411303424 is invalid; expected an integer in"):
        FNAConfig(seed=2**70)
    largest = FNAConfig(seed=2**64 - 1, sampling="random", layers="all", num_landmarks=8, min_tokens=0)
    model = tiny_dinov2()
    largest.apply(model)
    assert hidden(model).isfinite().all()


@pytest.mark.parametrize("name", ["std_threshold", "min_gap"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
def test_masking_thresholds_must_be_finite_and_non_negative(name, value):
    with pytest.raises(ValueError, match=rf"FNAConfig.masking.{name}=.* expected a finite number >= 0"):
        MaskingConfig(**{name: value})
