"""The attention math: Fast Nyström Attention, the exact attention it falls back to, and the sink interventions.

With queries/keys/values `[B, H, N, d]`, landmark indices `idx` `[B, m]` and scale `s`:

    A  = softmax(s qp kp^T)            [B, H, m, m]   qp = Q[idx], kp = K[idx]   (float32)
    Bv = softmax(s qp K^T) V           [B, H, m, d]   exact attention of the landmark queries (SDPA)
    vp = pinv(A) Bv                    [B, H, m, d]                                (float32)
    out = softmax(s Q kp^T) vp         [B, H, N, d]                                (SDPA)

which is the Nyström form softmax(Q kp^T) A^+ softmax(qp K^T) V at cost O(N m d). The rows of `exact_rows` (the
backend passes the special tokens: CLS and registers, always landmarks) are not reconstructed: they are the exact
attention of those landmark queries, which Bv holds already, at no cost. On the two real models here this leaves
patch tokens as faithful and makes the CLS token far more so (README, "Landmark rows"). With every token a landmark
and an exact pseudo-inverse it equals exact attention (`pinv="exact"`, the reference mode, computes the whole chain in
float64, `exact_pinv`). A, its pseudo-inverse and vp are computed in float32 whatever the model dtype (float64
stays float64), because the landmark kernel is ill-conditioned.

Masks follow `scaled_dot_product_attention`: a bool mask (True = attend) or an additive float mask (float32 or the
query dtype), broadcastable to `[B, H, N, N]` (a 2-D mask is `[N, N]`), and a query whose keys are all masked (False
or -inf) gets an output of 0. A row whose every key carries the same finite minimum attends uniformly (the mean of
V), as SDPA does when that minimum swamps the logits: finfo(float32).min, or -1e9 in float32 arithmetic. A float32
mask given with half-precision inputs is cast to their dtype (the kernels of SDPA require it) with finite values
clamped into its range, so -1e9 on every key becomes float16's minimum, not -inf (a dead row), and attends uniformly
as SDPA does with the float32 mask. (The reference mode adds a finite mask in float64, where -1e9 on every key of a
float32 or bfloat16 input is a constant shift of the logits: it returns the exact softmax, SDPA the mean of V.) A
mask that is the same for every query (padding) is honoured in all three softmaxes.
Interventions on flagged (massive / artifact) tokens, all O(N):
- "mask": their logits become -inf (a key bias);
- "sink": every query's weight on them is zeroed without renormalisation, i.e. their values are zeroed;
- "sink_keep_self": as "sink", but a flagged token keeps its own weight, added back from its exact diagonal
  attention probability.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InputError, ReferenceModeError
from .checks import check_choice, check_indices, check_int, check_seed, check_token_mask
from .landmarks import SAMPLING_METHODS, select_landmarks

# What happens to the keys of flagged massive/artifact tokens (see `exact_attention`).
INTERVENTIONS = ("none", "mask", "sink", "sink_keep_self")
PINV_METHODS = ("newton", "exact")
# More Newton-Schulz iterations converge to the exact pseudo-inverse of the ill-conditioned landmark kernel, which fails
# with fewer landmarks than tokens (the measurements are at `hf_fna.config.RECOMMENDED_PINV_ITERATIONS`).
MAX_PINV_ITERATIONS = 20


# --- pseudo-inverse ------------------------------------------------------------------------------------------------


def newton_schulz_pinv(matrix: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Approximate Moore-Penrose inverse of a batch of square matrices (Nyströmformer's iteration).

    Z0 = A^T / max_j sum_i A_ij, then Z <- Z (13 I - AZ (15 I - AZ (7 I - AZ))) / 4. Truncated after a few steps it
    acts as a regulariser on the ill-conditioned landmark kernel, which is why it beats an exact inverse there.
    """
    a = matrix.to(torch.promote_types(matrix.dtype, torch.float32))
    shape = a.shape
    a = a.reshape(-1, shape[-1], shape[-1])
    identity = torch.eye(shape[-1], device=a.device, dtype=a.dtype)
    seven, fifteen, thirteen_quarters = 7 * identity, 15 * identity, 3.25 * identity
    # An all-zero kernel (a fully masked sample) gets Z = 0, its exact pseudo-inverse, instead of 0 / 0 = NaN, which
    # the backward pass would carry into every gradient of the batch. A softmax kernel's largest column sum is >= 1:
    # its numbers do not change.
    scale = a.sum(dim=-2).amax(dim=-1)
    z = a.transpose(-1, -2) / scale.masked_fill(scale == 0, 1.0)[:, None, None]
    for _ in range(iterations):
        az = torch.bmm(a, z)
        # The identity terms and the factor 1/4 ride on the matrix products (baddbmm) instead of separate passes.
        inner = torch.baddbmm(fifteen, az, seven - az, alpha=-1.0)
        z = torch.bmm(z, torch.baddbmm(thirteen_quarters, az, inner, alpha=-0.25))
    return z.reshape(shape)


def landmark_pinv(matrix: torch.Tensor, method: str = "newton", iterations: int = 6) -> torch.Tensor:
    """Pseudo-inverse of the landmark kernel A: "newton" (default) or "exact" (`exact_pinv`)."""
    if method == "newton":
        valid = isinstance(iterations, int) and not isinstance(iterations, bool)
        if not valid or not 1 <= iterations <= MAX_PINV_ITERATIONS:
            raise InputError(
                f"pinv_iterations={iterations!r} is invalid; expected an integer in [1, {MAX_PINV_ITERATIONS}] (more "
                "iterations converge to the exact pseudo-inverse, which fails with fewer landmarks than tokens)."
            )
        return newton_schulz_pinv(matrix, iterations)
    if method == "exact":
        return exact_pinv(matrix)
    raise InputError(f"pinv={method!r} is not supported; accepted values: newton, exact.")


def exact_pinv(matrix: torch.Tensor) -> torch.Tensor:
    """The pseudo-inverse of the reference mode: `torch.linalg.pinv` with singular values below sqrt(eps) of the
    largest cut (1.5e-8 in float64).

    With every token a landmark the kernel is the attention matrix itself, whose condition number reaches 1e15 and
    more when attention is nearly uniform. `torch.linalg.pinv`'s default cut (about N eps) keeps directions whose
    rounding errors it then amplifies by up to 1 / (N eps): 1e-4 off exact attention on a 4-layer ViT with 226
    tokens. Cutting at sqrt(eps) bounds both the amplified rounding and the dropped part by about 1e-8: the same
    model then matches exact attention to 7e-7, as close as eager and SDPA attention agree (8e-7).

    The result refuses to be differentiated: a backward pass through it raises `ReferenceModeError`.
    """
    inverse = torch.linalg.pinv(matrix, rtol=torch.finfo(matrix.dtype).eps ** 0.5)
    if inverse.requires_grad:
        inverse.register_hook(_refuse_gradient)
    return inverse


def _refuse_gradient(_gradient: torch.Tensor) -> None:
    raise ReferenceModeError(
        "pinv='exact' cannot be differentiated: gradients through the exact pseudo-inverse of the ill-conditioned "
        "landmark kernel explode. Its forward pass runs with autograd on; for gradients use pinv='newton'."
    )


# --- masks ---------------------------------------------------------------------------------------------------------


def _mask_4d(attention_mask: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...] | None) -> torch.Tensor:
    """`attention_mask` checked with SDPA's rules and viewed as 4-D (leading dimensions of size 1 added)."""
    mask = attention_mask
    if mask.dtype != torch.bool and mask.dtype not in (torch.float32, dtype):
        raise InputError(
            f"attention_mask of dtype {mask.dtype} is not supported; as in scaled_dot_product_attention, pass a bool "
            f"mask (True = attend) or an additive float mask of dtype torch.float32 or {dtype} (convert a 0/1 integer "
            "mask with mask.bool())."
        )
    if not 2 <= mask.dim() <= 4:
        raise InputError(
            f"attention_mask of shape {tuple(mask.shape)} is not supported; expected 2 to 4 dimensions broadcastable "
            "to [B, H, N, N] (a 2-D mask is [N, N], as in scaled_dot_product_attention)."
        )
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if shape is not None and any(size not in (1, full) for size, full in zip(mask.shape, shape, strict=True)):
        raise InputError(
            f"attention_mask of shape {tuple(attention_mask.shape)} is not broadcastable to {tuple(shape)} "
            "([B, H, N, N]; a 2-D mask is [N, N], as in scaled_dot_product_attention)."
        )
    return mask


def additive_mask(
    attention_mask: torch.Tensor | None, dtype: torch.dtype, shape: tuple[int, ...] | None = None
) -> torch.Tensor | None:
    """An attention mask as a 4-D additive float mask broadcastable to `shape` (`[B, H, Nq, Nk]`).

    Accepts what `scaled_dot_product_attention` accepts: a bool mask (True = attend; False becomes -inf) or an
    additive float mask, returned in `dtype` with finite values clamped into its range; other dtypes (integer 0/1
    masks) raise `ValueError`.
    """
    if attention_mask is None:
        return None
    mask = _mask_4d(attention_mask, dtype, shape)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    if mask.dtype != dtype:
        # A plain cast would turn a float32 -1e9 into float16's -inf, and its row into a dead one (output 0) where
        # SDPA attends: finite values stay finite (clamped to float16's minimum, which `_uniform_rows` then reads).
        limits = torch.finfo(dtype)
        mask = torch.where(mask.isfinite(), mask.clamp(limits.min, limits.max), mask)
    return mask.to(dtype)


def key_bias_from_mask(
    attention_mask: torch.Tensor | None, dtype: torch.dtype, shape: tuple[int, ...] | None = None
) -> tuple[torch.Tensor | None, bool]:
    """Reduce an attention mask to an additive key bias `[B, 1|H, 1, N]` (batch and keys expanded to `shape`).

    Returns `(bias, ok)`; `ok` is False when the mask differs between queries (a causal or structured mask), which
    the Nyström path cannot honour: the caller must then run exact attention. Masked keys are -inf.
    """
    mask = additive_mask(attention_mask, dtype, shape)
    if mask is None:
        return None, True
    if mask.shape[-2] > 1:
        if not bool((mask == mask[..., :1, :]).all()):
            return None, False
        mask = mask[..., :1, :]
    if shape is not None:  # a mask broadcast over the batch or the keys still needs one row per sample and key
        mask = mask.expand(shape[0], -1, -1, shape[-1])
    return mask, True


def valid_keys(key_bias: torch.Tensor | None, per_head: bool = False) -> torch.Tensor | None:
    """`[B, N]` bool of keys not masked out for any head (padding never becomes a landmark); with `per_head`, the
    `[B, H|1, N]` bool of each head's unmasked keys.

    Masked means far below the sample's largest bias (-inf, or a float mask's large negative value); in a row where
    every key carries the same finite minimum nothing is masked, since SDPA then attends uniformly.
    """
    if key_bias is None:
        return None
    bias = key_bias.to(torch.promote_types(key_bias.dtype, torch.float32))
    threshold = bias.amax(dim=-1, keepdim=True) + torch.finfo(key_bias.dtype).min / 2  # -inf for such a row
    valid = (bias > threshold)[:, :, 0, :]
    return valid if per_head else valid.all(dim=1)


def _dead_queries(bias: torch.Tensor | None) -> torch.Tensor | None:
    """`[..., 1]` bool of queries whose keys are all masked out (-inf): SDPA returns 0 for them."""
    return None if bias is None else torch.isneginf(bias).all(dim=-1, keepdim=True)


def _finite(bias: torch.Tensor | None) -> torch.Tensor | None:
    """-inf entries raised to the dtype's minimum, so that a fully masked query yields no NaN on the way."""
    return None if bias is None else bias.clamp_min(torch.finfo(bias.dtype).min)


def _uniform_rows(query: torch.Tensor, key_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(query, key_bias)` with the rows whose every key carries the bias dtype's finite minimum made uniform: their
    queries and biases zeroed, so that every softmax over their keys is uniform.

    SDPA attends uniformly there because the minimum swamps the logits in its arithmetic (finfo(float32).min, or a
    float32 -1e9); float16's minimum, where a wider mask's -1e9 is clamped to, does not swamp float32 arithmetic, so
    the uniform rows are made explicit. A mask without such rows is returned unchanged.
    """
    if key_bias is None:
        return query, key_bias
    uniform = (key_bias == torch.finfo(key_bias.dtype).min).all(dim=-1, keepdim=True)  # [B, H|1, 1, 1]
    if torch.compiler.is_compiling() or bool(uniform.any()):
        query, key_bias = query.masked_fill(uniform, 0.0), key_bias.masked_fill(uniform, 0.0)
    return query, key_bias


def _zero_dead(tensor: torch.Tensor | None, dead: torch.Tensor | None) -> torch.Tensor | None:
    return tensor if tensor is None or dead is None else tensor.masked_fill(dead, 0.0)


def _flag_bias(flagged: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(flagged.shape, dtype=dtype, device=flagged.device).masked_fill(flagged, torch.finfo(dtype).min)[
        :, None, None, :
    ]


def _merge_bias(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or b is None:
        return a if b is None else b
    return (a + b).clamp_min(torch.finfo(a.dtype).min)


def _prepare_intervention(
    value: torch.Tensor, key_bias: torch.Tensor | None, flagged: torch.Tensor | None, intervention: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold an intervention on flagged keys into (values, key bias)."""
    if intervention not in INTERVENTIONS:
        raise InputError(
            f"intervention={intervention!r} is not supported; accepted values: {', '.join(INTERVENTIONS)}."
        )
    if flagged is None or intervention == "none":
        return value, key_bias
    if intervention == "mask":
        return value, _merge_bias(key_bias, _flag_bias(flagged, value.dtype))
    # Zeroing every query's weight on a key is the same as zeroing that key's value.
    return value.masked_fill(flagged[:, None, :, None], 0.0), key_bias


def _keep_self_correction(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_bias: torch.Tensor | None,
    flagged: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For "sink_keep_self": the exact self-attention weight p_ii of each flagged token, at cost O(G N d).

    Returns `(positions [B, G], present [B, G], p_ii v_i [B, H, G, d])` for the G = max flagged per sample.
    """
    count = int(flagged.sum(dim=-1).max())
    positions = flagged.float().topk(max(count, 1), dim=-1).indices
    present = flagged.gather(1, positions)
    gather = positions[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[-1])
    precise = torch.promote_types(query.dtype, torch.float32)  # float64 stays float64 (gradcheck)
    q_f, k_f, v_f = (t.gather(2, gather).to(precise) for t in (query, key, value))
    logits = scale * q_f @ key.to(precise).transpose(-1, -2)
    if key_bias is not None:
        logits = logits + key_bias.to(precise)
    self_logit = scale * (q_f * k_f).sum(-1)
    if key_bias is not None:
        self_logit = self_logit + key_bias.to(precise).expand(-1, query.shape[1], -1, -1)[:, :, 0, :].gather(
            2, positions[:, None, :].expand(-1, query.shape[1], -1)
        )
    p_self = (self_logit - logits.logsumexp(dim=-1)).exp()
    correction = (p_self.unsqueeze(-1) * v_f) * present[:, None, :, None]
    return positions, present, correction


def _add_at(output: torch.Tensor, positions: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """`output[b, h, positions[b, g]] += update[b, h, g]` for `output` `[B, H, N, d]`."""
    index = positions[:, None, :, None].expand(-1, output.shape[1], -1, output.shape[-1])
    return output.scatter_add(2, index, update.to(output.dtype))


# --- attention -----------------------------------------------------------------------------------------------------


def exact_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_bias: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    flagged: torch.Tensor | None = None,
    intervention: str = "none",
    return_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact attention `[B, H, N, d]` with a key bias and an optional intervention on flagged keys.

    Uses `scaled_dot_product_attention` unless `return_weights` asks for the (quadratic) attention matrix.
    """
    _check_states(query, key, value, "exact_attention")
    check_token_mask("flagged", flagged, query.shape[0], key.shape[2])
    _check_rate_and_scale(dropout_p, scale)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    query, key_bias = _uniform_rows(query, key_bias)
    dead = _dead_queries(key_bias)
    value_used, bias = _prepare_intervention(value, _finite(key_bias), flagged, intervention)
    weights = None
    if return_weights:
        precise = torch.promote_types(query.dtype, torch.float32)
        logits = scale * query.to(precise) @ key.to(precise).transpose(-1, -2)
        if bias is not None:
            logits = logits + bias.to(precise)
        weights = logits.softmax(dim=-1)
        if flagged is not None and intervention in ("sink", "sink_keep_self"):
            kept = weights * flagged[:, None, None, :]
            weights = weights - kept
            if intervention == "sink_keep_self":
                weights = weights + torch.diag_embed(torch.diagonal(kept, dim1=-2, dim2=-1))
        weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0)
        output = (weights @ value.to(precise)).to(value.dtype)
        return _zero_dead(output, dead), _zero_dead(weights.to(query.dtype), dead)
    output = F.scaled_dot_product_attention(query, key, value_used, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    if flagged is not None and intervention == "sink_keep_self":
        positions, _, correction = _keep_self_correction(query, key, value, bias, flagged, scale)
        output = _add_at(output, positions, correction)
    return _zero_dead(output, dead), weights


def nystrom_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    landmarks: torch.Tensor,
    key_bias: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    pinv: str = "newton",
    pinv_iterations: int = 6,
    flagged: torch.Tensor | None = None,
    intervention: str = "none",
    return_weights: bool = False,
    valid: torch.Tensor | None = None,
    exact_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Nyström attention `[B, H, N, d]` given landmark indices `[B, m]` (shared by all heads of a sample).

    `exact_rows` (`[B, N]` bool) marks queries whose output is their exact attention instead of its Nyström
    reconstruction; it applies to those that are (unmasked) landmarks, whose exact attention the Nyström form computes
    anyway.

    `valid` (`[B, N]` bool of unmasked keys, or `[B, H|1, N]` per head) defaults to `valid_keys(key_bias,
    per_head=True)`; masked or repeated landmarks take no part (per head), so a sample with fewer unmasked tokens than
    landmarks, or a head masking some landmarks, is still handled exactly where that is possible.

    Flagged tokens handled by an intervention should be among the landmarks (`fna_attention` and the Transformers
    backend make them so): their columns then act through the landmark kernel exactly as in exact attention.
    Dropout (training) applies to the queries' weights over the landmarks. `return_weights` also returns the
    approximate `[B, H, N, N]` attention matrix, which is quadratic in N.

    Raises:
        TypeError, ValueError: an argument of the wrong kind, shape or value (landmark indices outside [0, N), a
            `flagged` or `valid` mask that is not a bool mask over the tokens...), named with what is accepted.
        ReferenceModeError: `pinv="exact"` with fewer landmarks than unmasked tokens (at once), or a backward pass
            through `pinv="exact"` (when it runs).
    """
    _check_states(query, key, value, "nystrom_attention")
    batch, num_tokens = query.shape[0], key.shape[2]
    landmarks = check_indices("landmarks", landmarks, batch, num_tokens)
    check_token_mask("flagged", flagged, batch, num_tokens)
    check_token_mask("valid", valid, batch, num_tokens, per_head=True)
    check_token_mask("exact_rows", exact_rows, batch, num_tokens)
    check_choice("pinv", pinv, PINV_METHODS)
    _check_rate_and_scale(dropout_p, scale)
    head_dim = query.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    if valid is None and key_bias is not None:
        valid = valid_keys(key_bias, per_head=True)  # in the mask's own dtype, before a float64 cast blurs its minimum
    query, key_bias = _uniform_rows(query, key_bias)  # likewise
    if pinv == "exact":
        check_reference_mode(query, key, value, landmarks, valid)
    if pinv == "exact" and query.dtype != torch.float64:
        # The reference mode: the whole chain in float64, so that with every token a landmark the (ill-conditioned)
        # kernel still reproduces exact attention.
        output, weights = nystrom_attention(
            *(t.double() for t in (query, key, value)),
            landmarks,
            key_bias=None if key_bias is None else key_bias.double(),
            scale=scale,
            dropout_p=dropout_p,
            pinv=pinv,
            flagged=flagged,
            intervention=intervention,
            return_weights=return_weights,
            valid=valid,
            exact_rows=exact_rows,
        )
        return output.to(query.dtype), None if weights is None else weights.to(query.dtype)
    dead = _dead_queries(key_bias)
    value_used, bias = _prepare_intervention(value, _finite(key_bias), flagged, intervention)

    q_land, k_land = _take_tokens(query, landmarks), _take_tokens(key, landmarks)
    bias_land = None if bias is None else bias.gather(3, landmarks[:, None, None, :].expand(*bias.shape[:3], -1))
    # A sample with fewer unmasked tokens than landmarks gets masked or repeated landmarks (selection pads with
    # them). Each must not act at all: as a key its column is masked, as a landmark query its row of the kernel and of
    # the landmark attention is dropped. With every unmasked token a landmark the result is then exact attention.
    rows = None
    if valid is not None:
        heads = valid if valid.dim() == 3 else valid[:, None, :]
        index = landmarks[:, None, :].expand(heads.shape[0], heads.shape[1], -1)
        usable = heads.gather(2, index) & _first_occurrences(landmarks, key.shape[2])[:, None, :]  # [B, H|1, m]
        rows = usable[..., None]
        unusable = torch.zeros(usable.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~usable, torch.finfo(query.dtype).min
        )
        bias_land = _merge_bias(bias_land, unusable[:, :, None, :])

    precise = torch.promote_types(query.dtype, torch.float32)  # float32, or float64 in the reference mode
    logits = scale * q_land.to(precise) @ k_land.to(precise).transpose(-1, -2)
    if bias_land is not None:
        logits = logits + bias_land.to(precise)
    kernel = logits.softmax(dim=-1)
    if rows is not None:
        kernel = kernel * rows
    kernel_pinv = landmark_pinv(kernel, pinv, pinv_iterations)

    # Bv and the output are skinny attentions (m queries over N keys, N queries over m keys): SDPA computes them without
    # materialising the m x N logits, and returns its output in the [B, N, H, d] layout that the Transformers
    # backend transposes to, so that its `transpose(1, 2).contiguous()` copies nothing. (A per-sample bmm + softmax
    # path was measured on 2 CPU threads, H=6, d=64, m=64: 1.4x slower at N=1025 and 1.1-1.2x slower at N=4097.)
    landmark_output = F.scaled_dot_product_attention(q_land, key, value_used, attn_mask=bias, scale=scale)
    landmark_output = landmark_output if rows is None else landmark_output * rows
    v_land = kernel_pinv @ landmark_output.to(precise)
    output = F.scaled_dot_product_attention(
        query, k_land, v_land.to(query.dtype), attn_mask=bias_land, dropout_p=dropout_p, scale=scale
    )
    exact_landmarks = None
    if exact_rows is not None:  # [B, H|1, m]: landmarks whose own row is exact (first occurrences, unmasked)
        usable_rows = rows[..., 0] if rows is not None else _first_occurrences(landmarks, num_tokens)[:, None, :]
        exact_landmarks = exact_rows.gather(1, landmarks)[:, None, :] & usable_rows
        output = _with_landmark_rows(output, landmarks, landmark_output, exact_landmarks)
    if flagged is not None and intervention == "sink_keep_self":
        positions, _, correction = _keep_self_correction(query, key, value, bias, flagged, scale)
        output = _add_at(output, positions, correction)

    weights = None
    if return_weights:
        weights = _nystrom_weights(query, key, k_land, q_land, bias, bias_land, kernel_pinv, scale, rows)
        if exact_landmarks is not None:
            exact_weights = scale * q_land.to(weights.dtype) @ key.to(weights.dtype).transpose(-1, -2)
            exact_weights = exact_weights if bias is None else exact_weights + bias.to(weights.dtype)
            weights = _with_landmark_rows(weights, landmarks, exact_weights.softmax(dim=-1), exact_landmarks)
        if flagged is not None and intervention in ("sink", "sink_keep_self"):
            kept = weights * flagged[:, None, None, :]
            weights = weights - kept
            if intervention == "sink_keep_self":
                weights = weights + torch.diag_embed(torch.diagonal(kept, dim1=-2, dim2=-1))
        weights = weights.to(query.dtype)
    return _zero_dead(output, dead), _zero_dead(weights, dead)


def check_reference_mode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    landmarks: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> None:
    """Refuse what `pinv="exact"` cannot do: it reproduces exact attention only with every unmasked token a landmark.

    A forward pass with autograd on is allowed (a model's weights require gradients even in `eval()`); the backward
    pass through the exact pseudo-inverse is what `exact_pinv` refuses, when it runs.

    Raises:
        ReferenceModeError: fewer landmarks than unmasked tokens (the exact pseudo-inverse of a partial landmark
            kernel is not an approximation of attention).
    """
    unmasked = None if valid is None else valid if valid.dim() == 2 else valid.any(dim=1)  # unmasked in some head
    tokens = key.shape[2] if unmasked is None else int(unmasked.sum(dim=-1).max())
    if landmarks.shape[-1] < tokens:
        raise ReferenceModeError(
            f"pinv='exact' is the reference mode: it needs every unmasked token as a landmark, got "
            f"{landmarks.shape[-1]} landmarks for {tokens} tokens; use pinv='newton' to approximate attention."
        )


def _check_states(query: Any, key: Any, value: Any, caller: str) -> None:
    """query/key/value: floating `[B, H, N, d]` tensors with equal B, H, N (and equal d for query and key)."""
    states = (query, key, value)
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in states):
        kinds = ", ".join(str(t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__ for t in states)
        raise TypeError(f"{caller} expects floating-point query/key/value tensors; got {kinds}.")
    if query.dim() != 4 or key.shape != query.shape[:3] + key.shape[3:] or value.shape[:3] != key.shape[:3]:
        raise InputError(
            f"{caller} expects query/key/value of shape [B, H, N, d] with equal B, H, N; got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}."
        )


def _check_rate_and_scale(dropout_p: Any, scale: Any) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise InputError(f"dropout_p={dropout_p!r} is invalid; expected a number in [0, 1].")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale={scale!r} is a {type(scale).__name__}; expected a number or None (d ** -0.5).")


def _first_occurrences(landmarks: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """`[B, m]` bool: True where a landmark index appears for the first time in its row."""
    positions = torch.arange(landmarks.shape[1], device=landmarks.device).expand_as(landmarks)
    first = torch.full((landmarks.shape[0], num_tokens), landmarks.shape[1], device=landmarks.device)
    first = first.scatter_reduce(1, landmarks, positions, reduce="amin")
    return first.gather(1, landmarks) == positions


def _take_tokens(states: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
    """`states[b, :, landmarks[b]]` for `[B, H, N, d]` states: `[B, H, m, d]`.

    Transformers passes the transpose of a `[B, N, H, d]` tensor: whole token rows are then gathered at once
    (advanced indexing), much faster than an element-wise `gather` over the strided view.
    """
    rows = torch.arange(states.shape[0], device=states.device)[:, None]
    if states.transpose(1, 2).is_contiguous():
        return states.transpose(1, 2)[rows, landmarks].transpose(1, 2)
    index = landmarks[:, None, :, None].expand(states.shape[0], states.shape[1], -1, states.shape[3])
    return states.gather(2, index)


def _with_landmark_rows(
    rows: torch.Tensor, landmarks: torch.Tensor, landmark_rows: torch.Tensor, take: torch.Tensor
) -> torch.Tensor:
    """`rows` `[B, H, N, C]` with the rows of the landmarks replaced by `landmark_rows` `[B, H, m, C]` where `take`
    (`[B, H|1, m]` bool, at most one True per token) holds; others unchanged. Without autograd `rows` is updated in
    place and returned."""
    batch, heads, _, width = rows.shape
    if take.shape[1] == 1 and not (torch.is_grad_enabled() and (rows.requires_grad or landmark_rows.requires_grad)):
        # Without autograd, write the few rows in place (whole token rows at once, as `_take_tokens` reads them):
        # the general path below makes three passes over an `[B, H, N, C]` tensor to replace one row per image.
        sample, position = take[:, 0].nonzero(as_tuple=True)
        rows[sample, :, landmarks[sample, position]] = landmark_rows[sample, :, position].to(rows.dtype)
        return rows
    weight = take.expand(batch, heads, -1)[..., None].to(rows.dtype)
    index = landmarks[:, None, :, None].expand(batch, heads, -1, width)
    replaced = torch.zeros_like(rows).scatter_add(2, index, landmark_rows.to(rows.dtype) * weight)
    hit = torch.zeros_like(rows[..., :1]).scatter_add(2, index[..., :1], weight)
    return torch.where(hit > 0, replaced, rows)


def _nystrom_weights(query, key, k_land, q_land, bias, bias_land, kernel_pinv, scale, rows=None) -> torch.Tensor:
    """The approximate attention matrix softmax(Q kp^T) A^+ softmax(qp K^T), `[B, H, N, N]`."""
    precise = kernel_pinv.dtype
    left = scale * query.to(precise) @ k_land.to(precise).transpose(-1, -2)
    right = scale * q_land.to(precise) @ key.to(precise).transpose(-1, -2)
    if bias is not None:
        left = left + bias_land.to(precise)
        right = right + bias.to(precise)
    right = right.softmax(-1)
    return left.softmax(-1) @ kernel_pinv @ (right if rows is None else right * rows)


def fna_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    num_landmarks: int,
    attention_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    sampling: str = "fps",
    sampling_features: str = "q",
    num_special_tokens: int = 0,
    pinv: str = "newton",
    pinv_iterations: int = 6,
    seed: int = 0,
    landmarks: torch.Tensor | None = None,
    flagged: torch.Tensor | None = None,
    intervention: str = "none",
) -> torch.Tensor:
    """Fast Nyström Attention on `[B, H, N, d]` tensors, landmark selection included.

    A drop-in for `torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p,
    scale=scale)` on non-causal attention, at cost O(N m d) with m = `num_landmarks`.

    Args:
        query, key, value: `[B, H, N, d]`.
        num_landmarks: landmarks per sample; with `num_landmarks >= N` every token is a landmark.
        attention_mask: optional mask with the rules of `scaled_dot_product_attention`: bool (True = attend) or
            additive float (float32 or the query dtype), broadcastable to `[B, H, N, N]` (2-D is `[N, N]`); it must
            be the same for every query (a padding mask). Masked keys never become landmarks; a query whose keys are
            all masked (False or -inf) gets 0, as in SDPA.
        scale: softmax scale, `d ** -0.5` by default.
        dropout_p: attention dropout (pass 0.0 at evaluation).
        sampling: "fps" or "random".
        sampling_features: "q" or "k" (mean over heads); use `select_landmarks` for other features.
        num_special_tokens: leading tokens that are always landmarks; their own output rows are exact attention.
        pinv, pinv_iterations: pseudo-inverse of the landmark kernel ("newton" or "exact").
        seed: seed of random sampling.
        landmarks: precomputed `[B, m]` indices; selection is skipped.
        flagged: optional `[B, N]` bool of massive/artifact tokens, made landmarks, for `intervention`.
        intervention: "none", "mask", "sink" or "sink_keep_self" on the flagged keys.

    Returns:
        `[B, H, N, d]`.

    Raises:
        ValueError: a mask that differs between queries (e.g. causal), a mask SDPA would refuse (integer dtype, a
            shape not broadcastable to `[B, H, N, N]`), or a bad option value; `TypeError` for an argument of the
            wrong kind (`num_landmarks=2.5`, float `landmarks`); `ReferenceModeError` for `pinv="exact"` with fewer
            landmarks than unmasked tokens, or when a backward pass reaches `pinv="exact"`.
    """
    _check_states(query, key, value, "fna_attention")
    if sampling_features not in ("q", "k"):
        raise InputError(f"sampling_features={sampling_features!r} is not supported here; accepted values: q, k.")
    check_int("num_landmarks", num_landmarks, 1)
    check_int("num_special_tokens", num_special_tokens, 0)
    check_choice("sampling", sampling, SAMPLING_METHODS)
    check_seed(seed)
    check_token_mask("flagged", flagged, query.shape[0], key.shape[2])
    key_bias, per_key = key_bias_from_mask(attention_mask, query.dtype, (*query.shape[:3], key.shape[2]))
    if not per_key:
        raise InputError(
            "fna_attention supports masks that are the same for every query (padding masks); got a mask of shape "
            f"{tuple(attention_mask.shape)} that varies across queries. Use exact attention for causal masks."
        )
    if landmarks is None:
        num_landmarks = min(num_landmarks, query.shape[2])
        features = (query if sampling_features == "q" else key).mean(dim=1)
        landmarks = select_landmarks(
            features,
            num_landmarks,
            method=sampling,
            num_special_tokens=num_special_tokens,
            guaranteed=flagged if intervention != "none" else None,
            valid=None if key_bias is None else valid_keys(key_bias, per_head=True).any(dim=1),
            seed=seed,
        )
    output, _ = nystrom_attention(
        query,
        key,
        value,
        landmarks,
        key_bias=key_bias,
        scale=scale,
        dropout_p=dropout_p,
        pinv=pinv,
        pinv_iterations=pinv_iterations,
        flagged=flagged,
        intervention=intervention,
        exact_rows=_leading(num_special_tokens, query.shape[0], key.shape[2], query.device),
    )
    return output


def _leading(count: int, batch: int, num_tokens: int, device: torch.device) -> torch.Tensor | None:
    """`[B, N]` bool, True on the first `count` tokens; None for none."""
    if count <= 0:
        return None
    return (torch.arange(num_tokens, device=device) < count).expand(batch, num_tokens)
