"""hf-fna: Fast Nyström Attention (FNA) as a Transformers attention backend.

`import hf_fna` registers `attn_implementation="fna"`:

    import hf_fna
    from transformers import AutoModel
    model = AutoModel.from_pretrained("facebook/dinov2-base", attn_implementation="fna")

Settings come from the `fna_config` dict of the tower's config (as a Hub `config.json` carries it, or as
`FNAConfig(...).apply(model)` sets it), else from an `fna_config.json` beside the model's weights, else from the
documented defaults (`layers="auto"`). `hf_fna.exact(model)` runs a block with exact attention, `hf_fna.remove(model)`
takes hf-fna off a model.
"""

from . import metrics
from .config import FNAConfig, MaskingConfig
from .integration.backend import ATTENTION_NAME, fna_attention_forward, register
from .integration.explain import Explanation, LayerReport, explain, last_flagged_tokens, last_landmarks
from .integration.switches import exact, remove, save_pretrained
from .ops.landmarks import farthest_point_sampling, random_sampling, select_landmarks
from .ops.nystrom import exact_attention, fna_attention, newton_schulz_pinv, nystrom_attention
from .ops.sinks import detect_attention_sinks, detect_high_norm_tokens, detect_massive_tokens, norm_statistics
from .tools.calibration import CalibrationReport, calibrate

__version__ = "0.1.0"

register()

__all__ = [
    "ATTENTION_NAME",
    "CalibrationReport",
    "Explanation",
    "FNAConfig",
    "LayerReport",
    "MaskingConfig",
    "calibrate",
    "detect_attention_sinks",
    "detect_high_norm_tokens",
    "detect_massive_tokens",
    "exact",
    "exact_attention",
    "explain",
    "farthest_point_sampling",
    "fna_attention",
    "fna_attention_forward",
    "last_flagged_tokens",
    "last_landmarks",
    "metrics",
    "newton_schulz_pinv",
    "norm_statistics",
    "nystrom_attention",
    "random_sampling",
    "register",
    "remove",
    "save_pretrained",
    "select_landmarks",
]
