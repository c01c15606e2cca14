"""`torch.export` of models running FNA: no mask and padding masks export, and the program equals eager FNA."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim
from transformers import SiglipTextModel
from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

from hf_fna import FNAConfig
from hf_fna.integration.masks import fna_mask
from tiny_families import _text, family


def _fna_model(name: str, **settings):
    fam = family(name)
    torch.manual_seed(0)
    model = fam.model_class(fam.config).eval()
    FNAConfig(**{"layers": "1:", "num_landmarks": 6, "min_tokens": 0, **settings}).apply(model)
    return fam, model


@pytest.mark.parametrize("name", ["vit", "dinov2", "clip"])
def test_export_without_mask_equals_eager_fna(name, fna_calls):
    fam, model = _fna_model(name)
    inputs = fam.make_inputs(2)
    with torch.no_grad():
        expected = fam.output(model(**inputs))
    assert fna_calls, "FNA did not run in eager mode"
    fna_calls.clear()
    program = torch.export.export(model, (), inputs, dynamic_shapes={k: {0: Dim.AUTO} for k in inputs})
    assert fna_calls, "the exported program holds no Nyström attention"
    for batch in (2, 3):  # the batch size stays dynamic
        inputs = fam.make_inputs(batch)
        with torch.no_grad():
            expected = fam.output(model(**inputs))
        torch.testing.assert_close(fam.output(program.module()(**inputs)), expected, atol=1e-5, rtol=1e-5)


def test_export_with_a_padding_mask_equals_eager_fna(fna_calls):
    """A bidirectional padded text tower (SigLIP's) runs FNA under a key mask, exported and eager alike."""
    config = family("siglip").config.text_config
    torch.manual_seed(0)
    model = SiglipTextModel(config).eval()
    FNAConfig(layers="all", num_landmarks=3, min_tokens=0).apply(model)
    inputs = _text(2)
    assert inputs["attention_mask"].min() == 0
    program = torch.export.export(model, (), inputs)
    assert fna_calls
    padded, full = inputs, {**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])}
    for batch in (padded, full):  # the mask is an input of the program, not a constant
        with torch.no_grad():
            expected = model(**batch).last_hidden_state
        torch.testing.assert_close(program.module()(**batch).last_hidden_state, expected, atol=1e-5, rtol=1e-5)


def test_mask_builder_returns_no_mask_or_a_key_mask_for_bidirectional_attention():
    common = dict(batch_size=2, q_length=5, kv_length=5, allow_is_bidirectional_skip=True)
    assert fna_mask(mask_function=bidirectional_mask_function, attention_mask=None, **common) is None
    assert fna_mask(mask_function=bidirectional_mask_function, attention_mask=torch.ones(2, 5), **common) is None
    padding = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    mask = fna_mask(mask_function=bidirectional_mask_function, attention_mask=padding, **common)
    assert mask.dtype == torch.bool and mask.shape == (2, 1, 1, 5)
    assert mask[:, 0, 0].tolist() == padding.bool().tolist()
    # Everything else is SDPA's mask: a causal one varies across queries.
    causal = fna_mask(
        mask_function=causal_mask_function,
        attention_mask=None,
        **{**common, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False},
    )
    assert causal.shape == (2, 1, 5, 5) and not causal[0, 0, 0, 1] and causal[0, 0, 1, 0]
