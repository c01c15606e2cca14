"""The Nyström attention math against exact attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_fna.ops import exact_attention, fna_attention, newton_schulz_pinv, nystrom_attention


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


def test_exact_rows_of_landmark_queries_are_their_exact_attention():
    q, k, v = qkv(tokens=60)
    landmarks = torch.stack([torch.arange(0, 60, 4), torch.arange(1, 60, 4)])  # 15 landmarks, token 0 in sample 0 only
    exact_rows = torch.zeros(2, 60, dtype=torch.bool)
    exact_rows[:, :2] = True  # token 1 is not a landmark of sample 0, token 0 not one of sample 1
    plain, _ = nystrom_attention(q, k, v, landmarks)
    got, weights = nystrom_attention(q, k, v, landmarks, exact_rows=exact_rows, return_weights=True)
    exact = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(got[0, :, 0], exact[0, :, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1, :, 1], exact[1, :, 1], atol=1e-5, rtol=0)
    assert (plain[0, :, 0] - exact[0, :, 0]).abs().max() > 1e-3  # the Nyström row differed
    untouched = torch.ones(2, 60, dtype=torch.bool)
    untouched[0, 0] = untouched[1, 1] = False
    torch.testing.assert_close(got[:, :, untouched[0]][0], plain[:, :, untouched[0]][0], atol=0, rtol=0)
    torch.testing.assert_close(got[1][:, untouched[1]], plain[1][:, untouched[1]], atol=0, rtol=0)
    torch.testing.assert_close(weights @ v, got, atol=1e-5, rtol=0)  # the returned matrix holds the same rows


def test_exact_rows_with_padding_and_gradients():
    q, k, v = qkv(batch=2, heads=2, tokens=12, dim=4, dtype=torch.float64)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False  # padding: masked keys are never exact rows of a landmark
    bias = torch.zeros(2, 1, 1, 12, dtype=torch.float64).masked_fill(~mask[:, None, None, :], float("-inf"))
    landmarks = torch.tensor([[0, 3, 6, 9, 11], [0, 2, 4, 6, 8]])
    exact_rows = torch.zeros(2, 12, dtype=torch.bool)
    exact_rows[:, 0] = True
    got, _ = nystrom_attention(q, k, v, landmarks, key_bias=bias, exact_rows=exact_rows)
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(got[:, :, 0], exact[:, :, 0], atol=1e-10, rtol=0)
    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: nystrom_attention(a, b, c, landmarks, key_bias=bias, exact_rows=exact_rows)[0], inputs
    )


def test_exact_rows_are_the_same_with_and_without_autograd():
    # Without autograd the rows are written in place; with it, out of place. Repeated landmarks (only the first
    # occurrence counts) and a transposed [B, N, H, d] layout, as Transformers passes it, included.
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(batch=2, heads=3, tokens=40, dim=8))
    landmarks = torch.tensor([[0, 5, 5, 9, 0, 17], [2, 3, 4, 3, 30, 31]])
    exact_rows = torch.zeros(2, 40, dtype=torch.bool)
    exact_rows[:, :4] = True
    with torch.no_grad():
        fast, fast_weights = nystrom_attention(q, k, v, landmarks, exact_rows=exact_rows, return_weights=True)
    tracked = tuple(t.clone().requires_grad_() for t in (q, k, v))
    slow, slow_weights = nystrom_attention(*tracked, landmarks, exact_rows=exact_rows, return_weights=True)
    torch.testing.assert_close(fast, slow.detach(), atol=0, rtol=0)
    torch.testing.assert_close(fast_weights, slow_weights.detach(), atol=0, rtol=0)
    exact = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(fast[0, :, 0], exact[0, :, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(fast[1, :, 3], exact[1, :, 3], atol=1e-5, rtol=0)


def test_fna_attention_gives_special_tokens_their_exact_rows():
    q, k, v = qkv(tokens=80)
    got = fna_attention(q, k, v, num_landmarks=16, num_special_tokens=1)
    torch.testing.assert_close(got[:, :, 0], F.scaled_dot_product_attention(q, k, v)[:, :, 0], atol=1e-5, rtol=0)
