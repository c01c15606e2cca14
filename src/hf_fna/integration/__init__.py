"""FNA inside Transformers: the `fna` attention backend (`backend`), the per-model plans that give each attention
module its layer and settings (`plans`), facts about vision towers and their families (`towers`), the mask builder
(`masks`), switching FNA off and on (`switches`), and what ran where (`explain`).

`import hf_fna` calls `register()`; `ATTENTION_NAME` is the name it registers (`attn_implementation="fna"`).
"""

from .backend import fna_attention_forward, register
from .explain import Explanation, LayerReport, explain, last_flagged_tokens, last_landmarks
from .plans import ATTENTION_NAME

__all__ = [
    "ATTENTION_NAME",
    "Explanation",
    "LayerReport",
    "explain",
    "fna_attention_forward",
    "last_flagged_tokens",
    "last_landmarks",
    "register",
]
