"""hf-fna: Fast Nyström Attention (FNA) as a Transformers attention backend.

`import hf_fna` registers `attn_implementation="fna"`:

    import hf_fna
    from transformers import AutoModel
    model = AutoModel.from_pretrained("facebook/dinov2-base", attn_implementation="fna")

Settings come from the `fna_config` dict of the tower's config (as a Hub `config.json` carries it, or as
`FNAConfig(...).apply(model)` sets it), else from an `fna_config.json` beside the model's weights, else from the
documented defaults (`layers="auto"`). `hf_fna.exact(model)` runs a block with exact attention, `hf_fna.remove(model)`
takes hf-fna off a model.

The top level holds what users call: the settings (`FNAConfig`, `MaskingConfig`), what ran (`explain`,
`last_landmarks`, `last_flagged_tokens`), switches (`exact`, `remove`, `save_pretrained`), `calibrate`, the op
(`fna_attention`) and the massive-token detectors. The building blocks live in `hf_fna.ops` (Nyström and exact
attention, the pseudo-inverse, landmark samplers) and `hf_fna.integration` (the backend, its registration, plans).
"""

from . import metrics
from .config import FNAConfig, MaskingConfig
from .integration.backend import register
from .integration.explain import Explanation, explain, last_flagged_tokens, last_landmarks
from .integration.switches import exact, remove, save_pretrained
from .ops.nystrom import fna_attention
from .ops.sinks import detect_attention_sinks, detect_high_norm_tokens, detect_massive_tokens
from .tools.calibration import CalibrationReport, calibrate

__version__ = "0.1.0"

register()

__all__ = [
    "CalibrationReport",
    "Explanation",
    "FNAConfig",
    "MaskingConfig",
    "calibrate",
    "detect_attention_sinks",
    "detect_high_norm_tokens",
    "detect_massive_tokens",
    "exact",
    "explain",
    "fna_attention",
    "last_flagged_tokens",
    "last_landmarks",
    "metrics",
    "remove",
    "save_pretrained",
]
