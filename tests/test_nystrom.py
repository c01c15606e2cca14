"""The Nyström attention math against exact attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_fna import exact_attention, fna_attention, newton_schulz_pinv, nystrom_attention


def qkv(batch=2, heads=3, tokens=40, dim=16, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, tokens, dim, generator=generator).to(dtype) for _ in range(3))


def test_every_token_a_landmark_is_exact_with_scale():
    q, k, v = qkv()
    got = fna_attention(q, k, v, num_landmarks=40, scale=0.7, pinv="exact")
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, scale=0.7), atol=1e-5, rtol=0)


def test_fewer_landmarks_approximate_and_improve_with_more():
    q, k, v = qkv(tokens=200)
    q, k = q * 0.5, k * 0.5
    exact = F.scaled_dot_product_attention(q, k, v)
    errors = [(fna_attention(q, k, v, num_landmarks=m) - exact).abs().mean().item() for m in (8, 32, 128)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.25 * errors[0]


def test_newton_schulz_approaches_the_inverse_of_a_well_conditioned_kernel():
    logits = torch.randn(2, 16, 16) + 6 * torch.eye(16)
    kernel = logits.softmax(-1)
    approx = newton_schulz_pinv(kernel, iterations=20)
    torch.testing.assert_close(approx @ kernel, torch.eye(16).expand(2, 16, 16), atol=1e-3, rtol=0)


def test_half_precision_runs_the_kernel_in_float32():
    q, k, v = qkv(tokens=300)
    reference = fna_attention(q, k, v, num_landmarks=32)
    for dtype in (torch.bfloat16, torch.float16):
        got = fna_attention(*(t.to(dtype) for t in (q, k, v)), num_landmarks=32)
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert (got.float() - reference).abs().mean() < 0.02


def test_dropout_applies_only_in_training():
    q, k, v = qkv()
    torch.manual_seed(0)
    a = fna_attention(q, k, v, num_landmarks=10, dropout_p=0.5)
    b = fna_attention(q, k, v, num_landmarks=10, dropout_p=0.0)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(fna_attention(q, k, v, num_landmarks=10), b)


def test_additive_key_bias_is_honoured_in_every_softmax():
    q, k, v = qkv()
    bias = torch.randn(2, 1, 1, 40)
    got = fna_attention(q, k, v, num_landmarks=40, attention_mask=bias, pinv="exact")
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=bias), atol=1e-5, rtol=0)


def test_weights_are_the_approximate_matrix():
    q, k, v = qkv()
    landmarks = torch.arange(12).expand(2, 12)
    output, weights = nystrom_attention(q, k, v, landmarks, return_weights=True)
    assert weights.shape == (2, 3, 40, 40)
    torch.testing.assert_close(weights @ v, output, atol=1e-4, rtol=1e-4)
    _, exact_weights = exact_attention(q, k, v, return_weights=True)
    torch.testing.assert_close(exact_weights.sum(-1), torch.ones(2, 3, 40))


def test_bad_inputs():
    q, k, v = qkv()
    causal = torch.ones(40, 40, dtype=torch.bool).tril()[None, None]
    with pytest.raises(ValueError, match=r"varies across queries\. Use exact attention for causal masks"):
        fna_attention(q, k, v, num_landmarks=8, attention_mask=causal)
    with pytest.raises(ValueError, match=r"expects query/key/value of shape \[B, H, N, d\]"):
        fna_attention(q[0], k[0], v[0], num_landmarks=8)
    with pytest.raises(ValueError, match="sampling_features='hidden' is not supported here; accepted values: q, k"):
        fna_attention(q, k, v, num_landmarks=8, sampling_features="hidden")
    with pytest.raises(ValueError, match="pinv='svd' is not supported; accepted values: newton, exact"):
        fna_attention(q, k, v, num_landmarks=8, pinv="svd")
