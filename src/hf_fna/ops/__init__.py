"""The math of FNA, pure PyTorch with no Transformers in sight: the Nyström attention (`nystrom`), landmark selection
(`landmarks`), massive-token and attention-sink detection (`sinks`), block-diagonal masks of packed sequences
(`blocks`) and the FLOP cost model (`cost`).

    from hf_fna.ops import nystrom_attention, select_landmarks
    landmarks = select_landmarks(query.mean(dim=1), 64, num_special_tokens=1)
    output, _ = nystrom_attention(query, key, value, landmarks)
"""

from .landmarks import farthest_point_sampling, random_sampling, select_landmarks
from .nystrom import exact_attention, fna_attention, newton_schulz_pinv, nystrom_attention
from .sinks import detect_attention_sinks, detect_high_norm_tokens, detect_massive_tokens, norm_statistics

__all__ = [
    "detect_attention_sinks",
    "detect_high_norm_tokens",
    "detect_massive_tokens",
    "exact_attention",
    "farthest_point_sampling",
    "fna_attention",
    "newton_schulz_pinv",
    "norm_statistics",
    "nystrom_attention",
    "random_sampling",
    "select_landmarks",
]
