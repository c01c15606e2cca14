"""Faults, bad input and unusual but legitimate use of the library.

Tiny random models (tests/tiny_families.py), CPU, a few seconds in all. The command-line side of the issue is in
tests/test_faults_cli.py.
"""

from __future__ import annotations

import copy
import gc
import io
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
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


NORM_GAP = MaskingConfig(intervention="mask", detect="norm_gap", detect_layer=1, from_layer=2)


# --- torch.compile ----------------------------------------------------------------------------------------------------


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
    hidden(compiled)  # settled: per-pass state that exists from the second pass on is guarded on too
    frames = counter.frame_count
    del earlier
    gc.collect()
    # The guards of the compiled model must not index into state keyed by other models' modules.
    torch.testing.assert_close(hidden(compiled), expected, atol=0, rtol=0)
    assert counter.frame_count == frames


# --- validation before anything changes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fna_config", "expected"),
    [
        ({"layers": "all", "num_landmark": 8}, "unknown field"),
        ({"layers": [7]}, "out of range for a tower with 4 layers"),
        (["layers", "all"], "expects a dict"),
        ({"masking": {"intervention": "mask", "detect_layer": 9}}, "masking.detect_layer contains layer 9"),
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
    bad = FNAConfig(layers="all", masking=MaskingConfig(intervention="mask", detect_layer=2, from_layer=1))
    with pytest.raises(ValueError, match="precedes detect_layer"):
        bad.apply(model)
    assert getattr(model.config, "fna_config", None) is None
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(hidden(model), before, atol=0, rtol=0)
    FNAConfig(layers="all", num_landmarks=8, min_tokens=0).apply(model)  # and a good config still applies
    assert hf_fna.last_landmarks(model) is None and hidden(model).shape == before.shape


# --- state that leaks -------------------------------------------------------------------------------------------------


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
        if type(hook).__name__ == "NormDetector"
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


# --- validation gaps --------------------------------------------------------------------------------------------------


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


# --- settings that cannot work ----------------------------------------------------------------------------------------


def test_pinv_iterations_is_bounded_and_warns_outside_the_measured_range():
    with pytest.raises(ValueError, match=r"FNAConfig.pinv_iterations=100 is invalid; expected an integer in \[1, 20\]"):
        FNAConfig(pinv_iterations=100)
    for iterations in (3, 6, 10):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            FNAConfig(pinv_iterations=iterations)
    for iterations in (1, 12, 20):
        with pytest.warns(UserWarning, match=f"pinv_iterations={iterations} is outside the recommended 3-10"):
            FNAConfig(pinv_iterations=iterations)
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"pinv_iterations=100 is invalid"):
        hf_fna.fna_attention(q, k, v, num_landmarks=8, pinv_iterations=100)


def test_many_newton_iterations_converge_to_the_exact_pseudo_inverse():
    # Why more iterations are not better: Newton-Schulz tends to the exact pseudo-inverse of the landmark kernel,
    # the mode that fails with m < N, while the default 6 stays a regularised inverse far from it.
    q, k, _ = qkv(tokens=64)
    kernel = (q[:, :, :16] @ k[:, :, :16].transpose(-1, -2) * 2.0).softmax(-1).double()
    exact = torch.linalg.pinv(kernel)

    def distance(iterations: int) -> float:
        return float((hf_fna.ops.newton_schulz_pinv(kernel, iterations) - exact).norm() / exact.norm())

    assert distance(6) > 0.5
    assert distance(20) < distance(12) < distance(6)
    assert distance(40) < 1e-6


def test_reference_mode_refuses_fewer_landmarks_than_tokens_training_and_backward():
    # a forward pass with autograd on is allowed (a model's weights require gradients even in
    # eval()); what is refused is training mode and a backward pass that reaches the exact pseudo-inverse.
    q, k, v = qkv()
    with pytest.raises(hf_fna.errors.ReferenceModeError, match="needs every unmasked token as a landmark"):
        hf_fna.fna_attention(q, k, v, num_landmarks=8, pinv="exact")
    q.requires_grad_(True)
    got = hf_fna.fna_attention(q, k, v, num_landmarks=q.shape[2], pinv="exact")
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=0)
    with pytest.raises(hf_fna.errors.ReferenceModeError, match="pinv='exact' cannot be differentiated"):
        got.sum().backward()
    assert q.grad is None

    model = tiny_dinov2(layers="all", num_landmarks=8, min_tokens=0, pinv="exact")
    with pytest.raises(ValueError, match="needs every unmasked token as a landmark, got 8 landmarks for 17 tokens"):
        hidden(model)
    FNAConfig(layers="all", num_landmarks=17, min_tokens=0, pinv="exact").apply(model)
    model.train()
    with pytest.raises(ValueError, match="cannot be trained through"):
        model(pixel_values=pixels())
    model.eval()
    assert torch.is_grad_enabled()
    output = model(pixel_values=pixels()).last_hidden_state  # the plain `model.eval(); model(x)` of the issue
    torch.testing.assert_close(output.detach(), hidden(tiny_dinov2()), atol=1e-5, rtol=0)
    with pytest.raises(hf_fna.errors.ReferenceModeError, match="cannot be differentiated"):
        output.sum().backward()


def test_reference_mode_with_every_token_a_landmark_is_as_close_as_eager_to_sdpa():
    # near-uniform attention (a random ViT, pixels in [0, 1)) makes the 226 x 226 kernel
    # condition number about 2e15; the default cut of torch.linalg.pinv left the result 1e-4 off exact attention.
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, image_size=60, patch_size=4
    )
    torch.manual_seed(0)
    sdpa = ViTModel(config, add_pooling_layer=False).eval()
    eager, reference = copy.deepcopy(sdpa), copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    FNAConfig(layers="all", num_landmarks=226, min_tokens=0, pinv="exact").apply(reference)
    x = torch.rand(2, 3, 60, 60, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = sdpa(pixel_values=x).last_hidden_state
        eager_error = (eager(pixel_values=x).last_hidden_state - expected).abs().max()
        reference_error = (reference(pixel_values=x).last_hidden_state - expected).abs().max()
    assert eager_error < 2e-6 and reference_error < 2e-6, (eager_error, reference_error)


def test_compare_refuses_the_reference_mode_with_fewer_landmarks_than_tokens(tmp_path, capsys):
    from hf_fna.cli import main

    tiny_dinov2().save_pretrained(tmp_path)
    capsys.readouterr()
    argv = ["--model", str(tmp_path), "--resolutions", "32", "--pinv", "exact", "--landmarks", "8", "--min-tokens", "0"]
    assert main(["compare", *argv]) == 2
    assert "17 tokens at 32 px, 8 landmarks; pass --landmarks 17 or use --pinv newton" in capsys.readouterr().err


# --- the masks of scaled_dot_product_attention ------------------------------------------------------------------------


def qkv(batch: int = 2, heads: int = 3, tokens: int = 12, dim: int = 8):
    generator = torch.Generator().manual_seed(tokens)
    return tuple(torch.randn(batch, heads, tokens, dim, generator=generator) for _ in range(3))


def _keep(batch: int, tokens: int, real: tuple[int, ...]) -> torch.Tensor:
    keep = torch.zeros(batch, tokens, dtype=torch.bool)
    for row, count in enumerate(real):
        keep[row, :count] = True
    return keep


def _masks(batch: int, tokens: int) -> dict[str, torch.Tensor]:
    """Masks that are the same for every query, in every form SDPA accepts."""
    keep = _keep(batch, tokens, (9, 7))
    floats = torch.zeros(batch, 1, 1, tokens).masked_fill(~keep[:, None, None, :], float("-inf"))
    first = keep[0]
    return {
        "2-D [N, N] bool": first[None, :].expand(tokens, tokens),
        "[1, 1, N, N] bool": first[None, None, None, :].expand(1, 1, tokens, tokens),
        "[1, 1, 1, N] float": floats[:1],
        "[N] broadcast as [1, N] float": floats[0, 0],
        "[B, 1, 1, N] bool": keep[:, None, None, :],
        "[B, 1, N, N] float -inf": floats.expand(batch, 1, tokens, tokens),
        "[B, 1, 1, N] float finfo.min": torch.zeros(batch, 1, 1, tokens).masked_fill(~keep[:, None, None, :], -3e38),
        "3-D [1, N, N] bool": first[None, None, :].expand(1, tokens, tokens),
        "per-head [1, H, 1, N] bool": torch.stack([_keep(1, tokens, (n,))[0] for n in (10, 12, 6)])[None, :, None],
        "one head fully masked, bool": torch.stack([_keep(1, tokens, (n,))[0] for n in (0, 12, 6)])[None, :, None],
        "fully masked sample, bool": _keep(batch, tokens, (0, 7))[:, None, None, :],
        "fully masked sample, float -inf": torch.zeros(batch, 1, 1, tokens).index_fill(0, torch.tensor([0]), -math.inf),
        "fully masked sample, float finfo.min": torch.zeros(batch, 1, 1, tokens).index_fill(
            0, torch.tensor([0]), -3e38
        ),
    }


@pytest.mark.parametrize("case", list(_masks(2, 12)))
def test_masks_match_sdpa_side_by_side(case):
    q, k, v = qkv()
    mask = _masks(2, 12)[case]
    tokens = q.shape[2]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = hf_fna.fna_attention(q, k, v, num_landmarks=tokens, attention_mask=mask, pinv="exact")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # Landmarks are chosen among the unmasked keys of each sample.
    landmarks = hf_fna.fna_attention(q, k, v, num_landmarks=5, attention_mask=mask)
    assert landmarks.shape == q.shape and landmarks.isfinite().all()


def test_fully_masked_rows_are_zero_as_in_sdpa():
    q, k, v = qkv()
    masks = _masks(2, 12)
    for case in ("fully masked sample, bool", "fully masked sample, float -inf"):
        out = hf_fna.fna_attention(q, k, v, num_landmarks=6, attention_mask=masks[case])
        assert F.scaled_dot_product_attention(q, k, v, attn_mask=masks[case])[0].abs().max() == 0
        assert out[0].abs().max() == 0 and out[1].abs().max() > 0
    # A finite minimum is not a mask to SDPA either: the row attends uniformly (mean of V).
    out = hf_fna.fna_attention(q, k, v, num_landmarks=12, attention_mask=masks["fully masked sample, float finfo.min"])
    torch.testing.assert_close(out[0], v[0].mean(dim=-2, keepdim=True).expand_as(v[0]), atol=1e-5, rtol=0)


def test_a_causal_2d_mask_is_refused_even_when_batch_equals_tokens():
    # With B == N a [N, N] causal mask used to be read as a [B, N] padding mask: a silently wrong result.
    q, k, v = qkv(batch=12)
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="varies across queries"):
        hf_fna.fna_attention(q, k, v, num_landmarks=12, attention_mask=causal, pinv="exact")


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (torch.ones(2, 1, 1, 12, dtype=torch.long), "dtype torch.int64 is not supported"),
        (torch.ones(12, 12, dtype=torch.int32), "dtype torch.int32 is not supported"),
        (torch.zeros(12, 12, dtype=torch.float64), "dtype torch.float64 is not supported"),
        (torch.ones(2, 12, dtype=torch.bool).T.T[:, :5], "not broadcastable"),
        (torch.ones(3, 1, 1, 12, dtype=torch.bool), "not broadcastable"),
        (torch.ones(2, 1, 1, 1, 12, dtype=torch.bool), "expected 2 to 4 dimensions"),
    ],
)
def test_masks_sdpa_refuses_are_refused(mask, expected):
    q, k, v = qkv()
    with pytest.raises(RuntimeError):  # side by side: SDPA refuses them too
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with pytest.raises(ValueError, match=expected):
        hf_fna.fna_attention(q, k, v, num_landmarks=6, attention_mask=mask)


def test_backend_with_a_mask_broadcast_over_the_batch():
    # A fresh BEiT's relative position bias is zero, hence the same for every query: a [1, H, N, N] per-key mask.
    from transformers import BeitConfig, BeitModel

    config = BeitConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        use_relative_position_bias=True,
    )
    torch.manual_seed(0)
    exact = BeitModel(config).eval()
    model = copy.deepcopy(exact)
    FNAConfig(layers="all", num_landmarks=17, min_tokens=0, pinv="exact").apply(model)
    torch.testing.assert_close(hidden(model), hidden(exact), atol=1e-5, rtol=0)
    FNAConfig(layers="all", num_landmarks=8, min_tokens=0).apply(model)
    assert hidden(model).isfinite().all() and hf_fna.last_landmarks(model).shape == (2, 8)
    # A trained bias differs between queries: exact attention, with the [1, H, N, N] bias broadcast over the batch.
    with torch.no_grad():
        for m in (exact, model):
            for name, table in m.named_parameters():
                if name.endswith("relative_position_bias_table"):
                    table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(hidden(model), hidden(exact), atol=1e-5, rtol=0)


# --- random sampling does not depend on the batch ---------------------------------------------------------------------


def test_random_landmarks_of_a_sample_do_not_depend_on_its_batch_neighbours():
    valid = torch.ones(4, 40, dtype=torch.bool)
    valid[1, 30:] = False
    batch = hf_fna.ops.random_sampling(40, 8, 4, valid=valid, seed=3)
    for row in range(4):
        alone = hf_fna.ops.random_sampling(40, 8, 1, valid=valid[row : row + 1], seed=3)
        assert torch.equal(batch[row], alone[0]), row
    assert (batch[1] < 30).all()
    assert torch.equal(batch, hf_fna.ops.random_sampling(40, 8, 4, valid=valid, seed=3))  # still seeded
    assert not torch.equal(batch, hf_fna.ops.random_sampling(40, 8, 4, valid=valid, seed=4))

    model = tiny_dinov2(layers="all", num_landmarks=8, min_tokens=0, sampling="random")
    x = pixels(batch=4)
    with torch.no_grad():
        together = model(pixel_values=x).last_hidden_state
        for row in range(4):
            alone = model(pixel_values=x[row : row + 1]).last_hidden_state
            torch.testing.assert_close(together[row], alone[0], atol=1e-5, rtol=0)


# --- a fully masked sample has finite gradients -----------------------------------------------------------------------


@pytest.mark.parametrize("num_landmarks", [6, 12])
@pytest.mark.parametrize("case", ["fully masked sample, bool", "fully masked sample, float -inf"])
def test_fully_masked_sample_has_finite_gradients_and_leaves_its_neighbour_alone(case, num_landmarks):
    q, k, v = qkv()
    mask = _masks(2, 12)[case]
    weights = torch.linspace(-1, 1, q.numel()).view_as(q)

    def gradients(rows: slice):
        states = [t[rows].clone().requires_grad_(True) for t in (q, k, v)]
        out = hf_fna.fna_attention(*states, num_landmarks=num_landmarks, attention_mask=mask[rows])
        (out * weights[rows]).sum().backward()
        return out, [t.grad for t in states]

    out, grads = gradients(slice(0, 2))
    assert out[0].abs().max() == 0
    for grad in grads:
        assert grad.isfinite().all()
        assert grad[0].abs().max() == 0  # the output of a dead sample does not depend on its inputs, as in SDPA
    _, alone = gradients(slice(1, 2))
    for grad, expected in zip(grads, alone, strict=True):
        torch.testing.assert_close(grad[1:], expected, atol=1e-5, rtol=1e-5)


def test_newton_schulz_of_an_all_zero_kernel_is_zero():
    kernel = torch.zeros(2, 5, 5, requires_grad=True)
    pinv = hf_fna.ops.newton_schulz_pinv(kernel)
    assert torch.equal(pinv, torch.zeros(2, 5, 5))
    pinv.sum().backward()
    assert kernel.grad.isfinite().all()


# --- a finite float32 mask in half precision --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("num_landmarks", "pinv"), [(6, "newton"), (12, "newton"), (12, "exact")])
def test_finite_float32_mask_in_half_precision_attends_as_sdpa(monkeypatch, dtype, num_landmarks, pinv):
    q, k, v = (t.to(dtype) for t in qkv())
    mask = torch.zeros(2, 1, 1, 12)
    mask[0] = -1e9  # every key: SDPA attends uniformly (the mean of V), it does not return 0
    mask[1, ..., 8:] = -1e9  # some keys: masked
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    mean = v[0].float().mean(dim=-2, keepdim=True).expand(3, 12, 8)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(expected[0].float(), mean, atol=tolerance, rtol=0)
    if dtype == torch.bfloat16 and pinv == "exact":
        return  # bfloat16 holds -1e9, which the float64 reference mode adds exactly: see the test below
    sdpa = F.scaled_dot_product_attention

    def kernels_need_the_query_dtype(query, key, value, attn_mask=None, **kwargs):
        # CUDA's memory-efficient kernel refuses a float32 bias with half-precision queries.
        assert attn_mask is None or attn_mask.dtype in (torch.bool, query.dtype), (attn_mask.dtype, query.dtype)
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", kernels_need_the_query_dtype)
    got = hf_fna.fna_attention(q, k, v, num_landmarks=num_landmarks, attention_mask=mask, pinv=pinv)
    assert got.dtype == dtype
    torch.testing.assert_close(got[0].float(), mean, atol=tolerance, rtol=0)
    if pinv == "exact":
        torch.testing.assert_close(got[1].float(), expected[1].float(), atol=tolerance, rtol=0)
    exact, _ = hf_fna.ops.exact_attention(q, k, v, key_bias=hf_fna.ops.nystrom.additive_mask(mask, dtype))
    torch.testing.assert_close(exact.float(), expected.float(), atol=tolerance, rtol=0)


def test_reference_mode_adds_a_finite_mask_exactly():
    # Documented: in float64, -1e9 on every key is a constant shift of the logits (the exact softmax), where SDPA in
    # float32 rounds the logits away (the mean of V); the float32 minimum swamps float64 too (the mean of V).
    q, k, v = qkv()
    for value, uniform in ((-1e9, False), (torch.finfo(torch.float32).min, True)):
        mask = torch.zeros(2, 1, 1, 12)
        mask[0] = value
        got = hf_fna.fna_attention(q, k, v, num_landmarks=12, attention_mask=mask, pinv="exact")
        expected = v[0].mean(dim=-2, keepdim=True) if uniform else F.scaled_dot_product_attention(q, k, v)[0]
        torch.testing.assert_close(got[0], expected.expand_as(got[0]), atol=1e-5, rtol=0)


# --- float64 stays float64 in sink_keep_self --------------------------------------------------------------------------


@pytest.mark.parametrize("intervention", ["mask", "sink", "sink_keep_self"])
def test_interventions_pass_gradcheck_in_float64(intervention):
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=generator, dtype=torch.float64, requires_grad=True) for _ in "qkv")
    flagged = torch.zeros(1, 6, dtype=torch.bool)
    flagged[0, [1, 4]] = True
    landmarks = torch.tensor([[1, 4, 0, 2]])

    def exact(q, k, v):
        return hf_fna.ops.exact_attention(q, k, v, flagged=flagged, intervention=intervention)[0]

    def nystrom(q, k, v):
        return hf_fna.ops.nystrom_attention(q, k, v, landmarks, flagged=flagged, intervention=intervention)[0]

    assert torch.autograd.gradcheck(exact, (q, k, v))
    assert torch.autograd.gradcheck(nystrom, (q, k, v))
    # The O(N) correction equals the quadratic reference in float64 precision, not float32's.
    with torch.no_grad():
        fast = exact(q, k, v)
        slow = hf_fna.ops.exact_attention(q, k, v, flagged=flagged, intervention=intervention, return_weights=True)[0]
    assert fast.dtype == torch.float64 and (fast - slow).abs().max() < 1e-12


# --- the op validates its arguments -----------------------------------------------------------------------------------


def _op_call(name: str, **changes):
    q, k, v = qkv()
    if name == "fna_attention":
        return lambda: hf_fna.fna_attention(q, k, v, **{"num_landmarks": 6, **changes})
    if name == "nystrom_attention":
        return lambda: hf_fna.ops.nystrom_attention(q, k, v, **{"landmarks": torch.arange(6).expand(2, 6), **changes})
    features = q.mean(dim=1)
    if name == "select_landmarks":
        return lambda: hf_fna.ops.select_landmarks(**{"features": features, "num_landmarks": 6, **changes})
    return lambda: hf_fna.ops.farthest_point_sampling(**{"features": features, "num_landmarks": 6, **changes})


@pytest.mark.parametrize(
    ("op", "changes", "error", "expected"),
    [
        ("fna_attention", {"num_landmarks": 2.5}, TypeError, r"num_landmarks=2\.5 is a float; expected an integer"),
        ("fna_attention", {"num_landmarks": None}, TypeError, r"num_landmarks=None is a NoneType; expected an int"),
        ("fna_attention", {"num_landmarks": 0}, ValueError, r"num_landmarks=0 is out of range; expected an integer >="),
        ("fna_attention", {"seed": 2**64}, ValueError, r"seed=18446744073709551616 is out of range; expected an .*\["),
        ("fna_attention", {"num_special_tokens": -2}, ValueError, r"num_special_tokens=-2 is out of range; expected"),
        ("fna_attention", {"sampling": "grid"}, ValueError, r"sampling='grid' is not supported; accepted values: fps"),
        ("fna_attention", {"landmarks": torch.tensor([[0, 1, 12]] * 2)}, ValueError, r"index 12; .* \[0, 11\]"),
        ("fna_attention", {"landmarks": torch.tensor([[0, -1, 2]] * 2)}, ValueError, r"index -1; .* \[0, 11\]"),
        ("fna_attention", {"landmarks": torch.zeros(2, 3)}, TypeError, r"landmarks is a torch\.float32 tensor; exp"),
        ("fna_attention", {"landmarks": torch.arange(3)}, ValueError, r"landmarks has shape \(3,\); expected \[B, m\]"),
        ("fna_attention", {"flagged": torch.zeros(2, 5, dtype=torch.bool)}, ValueError, r"flagged has shape \(2, 5\)"),
        ("fna_attention", {"flagged": torch.zeros(2, 12)}, TypeError, r"flagged is a torch\.float32 tensor; expected"),
        ("nystrom_attention", {"landmarks": torch.tensor([[0, 99]] * 2)}, ValueError, r"holds index 99; token ind"),
        ("nystrom_attention", {"landmarks": [[0, 1]] * 2}, TypeError, r"landmarks is a list; expected an integer"),
        ("nystrom_attention", {"landmarks": torch.arange(4).view(1, 4)}, ValueError, r"shape \(1, 4\); expected \[B"),
        ("nystrom_attention", {"pinv": "svd"}, ValueError, r"pinv='svd' is not supported; accepted values: newton, e"),
        ("nystrom_attention", {"dropout_p": 2.0}, ValueError, r"dropout_p=2\.0 is invalid; expected a number in \[0"),
        ("select_landmarks", {"num_landmarks": 2.5}, TypeError, r"num_landmarks=2\.5 is a float; expected an integer"),
        ("select_landmarks", {"seed": 2**64}, ValueError, r"seed=18446744073709551616 is out of range"),
        ("select_landmarks", {"num_special_tokens": -2}, ValueError, r"num_special_tokens=-2 is out of range"),
        ("select_landmarks", {"valid": torch.ones(2, 12)}, TypeError, r"valid is a torch\.float32 tensor; expected a"),
        ("farthest_point_sampling", {"features": torch.randn(12, 4)}, ValueError, r"features has shape \(12, 4\); ex"),
        ("farthest_point_sampling", {"features": torch.ones(1, 12, 4, dtype=torch.long)}, TypeError, r"features is a"),
        ("farthest_point_sampling", {"guaranteed": torch.ones(2, 11, dtype=torch.bool)}, ValueError, r"guaranteed has"),
    ],
)
def test_op_arguments_are_validated_with_the_value_and_what_is_accepted(op, changes, error, expected):
    with pytest.raises(error, match=expected):
        _op_call(op, **changes)()


# --- a model called from a module that does not contain it ------------------------------------------------------------


class _Loss(torch.nn.Module):
    """A loss module that takes the model as an argument (it does not contain it)."""

    def forward(self, model, x):
        return model(pixel_values=x).last_hidden_state


class _Holder(torch.nn.Module):
    """A wrapper that holds the model outside its registered submodules."""

    def __init__(self, model) -> None:
        super().__init__()
        self.__dict__["inner"] = model

    def forward(self, x):
        return self.inner(pixel_values=x).last_hidden_state


@pytest.mark.parametrize("caller", ["loss module", "unregistered holder"])
def test_model_loaded_with_fna_is_planned_when_called_from_a_module_that_does_not_contain_it(tmp_path, caller):
    model = tiny_dinov2()
    model.config.fna_config = FNAConfig(layers="all", num_landmarks=8, min_tokens=0).to_dict()
    model.save_pretrained(tmp_path)
    expected = hidden(Dinov2Model.from_pretrained(tmp_path, attn_implementation="fna").eval())
    loaded = Dinov2Model.from_pretrained(tmp_path, attn_implementation="fna").eval()
    with torch.no_grad():
        got = _Loss()(loaded, pixels()) if caller == "loss module" else _Holder(loaded)(pixels())
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert hf_fna.last_landmarks(loaded).shape == (2, 8)  # FNA ran, planned on the model itself


# --- the layer parser is linear ---------------------------------------------------------------------------------------


def test_layer_strings_are_parsed_in_linear_time_and_bounded():
    # Each of these backtracked cubically (1600 spaces: 22 s); 100k characters must not hang.
    for padding in (1600, 4000):
        with pytest.raises(ValueError, match=r"group '1 +'\.\.\. \(\d+ characters\) is not 'LAYERS' or 'LAYERS@M'"):
            FNAConfig(layers="1" + " " * padding + "x@5")
        with pytest.raises(ValueError, match=r"is invalid; expected a list of layer indices, a slice string"):
            FNAConfig(layers="1" + " " * padding + "x:")
    with pytest.raises(ValueError, match=r"\(100004 characters\) is invalid: 100004 characters, more than the 4096"):
        FNAConfig(layers="1" + " " * 100_000 + "x@5")
    with pytest.raises(ValueError, match=r"more than the 4096 accepted"):
        hf_fna.schedules.parse_layers(["1"] + [" "] * 5000)
    # What the grammar accepts is unchanged.
    accepted = {" 6 : ": [6, 7, 8, 9, 10, 11], "4, 5 @ 32": [4, 5], "-4:": [8, 9, 10, 11], ":": list(range(12))}
    for text, layers in accepted.items():
        assert FNAConfig(layers=text).resolve(12).fna_layers == layers, text
    assert [g.num_landmarks for g in FNAConfig(layers="4:6 @256; 6:@64").resolve(12).groups] == [256, 64]
    for text in ("6:@", "4:6@-1", "4@5@6", "--1:", "1::2", "4,,5@3", "@5", "4:6@2x", "+1:"):
        with pytest.raises(ValueError, match="is invalid"):
            FNAConfig(layers=text)


# --- model config files and empty slices ------------------------------------------------------------------------------


def test_from_pretrained_reads_the_fna_config_entry_of_a_model_config_file(tmp_path):
    model = tiny_dinov2()
    settings = FNAConfig(layers="2:", num_landmarks=12, min_tokens=0)
    model.config.fna_config = settings.to_dict()
    model.save_pretrained(tmp_path / "with")
    assert FNAConfig.from_pretrained(tmp_path / "with" / "config.json") == settings
    tiny_dinov2().save_pretrained(tmp_path / "without")
    config_file = tmp_path / "without" / "config.json"
    with pytest.raises(OSError, match=r"config\.json is a model config\.json that carries no `fna_config`") as info:
        FNAConfig.from_pretrained(config_file)
    assert str(config_file) in str(info.value) and "unknown" not in str(info.value)


@pytest.mark.parametrize("layers", ["3:1", "4:", "-1:-3", "0:2@8;3:1@8"])
def test_an_empty_slice_is_refused_at_resolve_time(layers):
    with pytest.raises(ValueError, match=r"selects no layer of a tower with 4 layers \(an empty slice\)") as info:
        FNAConfig(layers=layers).resolve(4)
    assert repr(layers.split(";")[-1].split("@")[0]) in str(info.value)
    with pytest.raises(ValueError, match="an empty slice"):
        tiny_dinov2(layers=layers)  # apply refuses it before the model changes
