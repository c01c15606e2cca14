"""FNA on the vision families users load: special tokens per family, packed (block-diagonal) sequences, what
`FNAConfig.apply` accepts, and the fallback warnings and `hf_fna.explain` report."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from transformers.testing_utils import CaptureLogger

import hf_fna
from hf_fna import FNAConfig
from hf_fna.integration import backend as fna_backend
from hf_fna.integration import plans
from hf_fna.integration.plans import tower_plans
from hf_fna.integration.towers import SpecialTokens
from hf_fna.ops.blocks import diagonal_blocks

VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
PATCHES = 16  # 32 px images, patch 8


def _pixels(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _images() -> dict:
    return {"pixel_values": _pixels(2, 3, 32, 32)}


# name -> (model factory, forward inputs, leading special tokens, trailing special tokens)
FAMILIES = {
    "vit": (lambda: tf.ViTModel(tf.ViTConfig(**VISION, image_size=32, patch_size=8)), _images, 1, 0),
    "deit": (lambda: tf.DeiTModel(tf.DeiTConfig(**VISION, image_size=32, patch_size=8)), _images, 2, 0),
    "dinov2_registers": (
        lambda: tf.Dinov2WithRegistersModel(
            tf.Dinov2WithRegistersConfig(**VISION, image_size=32, patch_size=8, num_register_tokens=2)
        ),
        _images,
        3,
        0,
    ),
    "ijepa": (lambda: tf.IJepaModel(tf.IJepaConfig(**VISION, image_size=32, patch_size=8)), _images, 0, 0),
    "videomae": (
        lambda: tf.VideoMAEModel(tf.VideoMAEConfig(**VISION, image_size=32, patch_size=8, num_frames=2)),
        lambda: {"pixel_values": _pixels(2, 2, 3, 32, 32)},
        0,
        0,
    ),
    "aimv2": (
        lambda: tf.Aimv2VisionModel(tf.Aimv2VisionConfig(**VISION, image_size=32, patch_size=8)),
        _images,
        0,
        0,
    ),
    "siglip": (
        lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**VISION, image_size=32, patch_size=8)),
        _images,
        0,
        0,
    ),
    "siglip2": (
        lambda: tf.Siglip2VisionModel(tf.Siglip2VisionConfig(**VISION, patch_size=8, num_patches=PATCHES)),
        lambda: {
            "pixel_values": _pixels(2, PATCHES, 3 * 8 * 8),
            "pixel_attention_mask": torch.ones(2, PATCHES, dtype=torch.long),
            "spatial_shapes": torch.tensor([[4, 4], [4, 4]]),
        },
        0,
        0,
    ),
    "pixtral": (
        lambda: tf.PixtralVisionModel(tf.PixtralVisionConfig(**VISION, image_size=32, patch_size=8, head_dim=8)),
        lambda: {"pixel_values": _pixels(1, 3, 32, 32), "image_sizes": torch.tensor([[32, 32]])},
        0,
        0,
    ),
    "idefics3": (
        lambda: tf.Idefics3VisionTransformer(tf.Idefics3VisionConfig(**VISION, image_size=32, patch_size=8)),
        _images,
        0,
        0,
    ),
    "yolos": (
        lambda: tf.YolosModel(tf.YolosConfig(**VISION, image_size=[32, 32], patch_size=8, num_detection_tokens=3)),
        _images,
        1,
        3,
    ),
}


def _tiny(name: str):
    torch.manual_seed(0)
    return FAMILIES[name][0]().eval()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_special_tokens_per_family_are_the_guaranteed_landmarks(name, monkeypatch):
    _, make_inputs, leading, trailing = FAMILIES[name]
    model = _tiny(name)
    FNAConfig(layers="all", num_landmarks=leading + trailing + 2, min_tokens=0).apply(model)
    seen = []
    original = fna_backend.select_landmarks

    def recording(features, num_landmarks, **kwargs):
        seen.append(kwargs["guaranteed"])
        return original(features, num_landmarks, **kwargs)

    monkeypatch.setattr(fna_backend, "select_landmarks", recording)
    with torch.no_grad():
        model(**make_inputs())
    assert seen, "FNA never selected landmarks"
    guaranteed = seen[0]
    if leading + trailing == 0:
        assert guaranteed is None  # no CLS: token 0 is a patch and competes like any other
    else:
        tokens = guaranteed.shape[1]
        expected = [*range(leading), *range(tokens - trailing, tokens)]
        assert guaranteed[0].nonzero().flatten().tolist() == expected
        picked = set(hf_fna.last_landmarks(model)[0].tolist())
        assert set(expected) <= picked


def test_explicit_num_special_tokens_overrides_the_leading_count_only():
    model = _tiny("yolos")
    FNAConfig(num_special_tokens=0, min_tokens=0).apply(model)
    assert tower_plans(model)[0].special == SpecialTokens(leading=0, trailing=3)


# --- what FNAConfig.apply accepts -----------------------------------------------------------------------------------


def test_apply_accepts_siglip2_with_its_multihead_attention_pooling_head():
    config = tf.Siglip2Config(
        text_config=dict(VISION, vocab_size=99, max_position_embeddings=16),
        vision_config=dict(VISION, patch_size=8, num_patches=PATCHES),
    )
    model = tf.Siglip2Model(config).eval()
    FNAConfig(layers="all", num_landmarks=PATCHES, min_tokens=0, pinv="exact").apply(model)
    assert model.config.vision_config._attn_implementation == "fna"
    assert model.config.text_config._attn_implementation != "fna"
    assert any(isinstance(m, tf.models.siglip2.modeling_siglip2.Siglip2MultiheadAttentionPoolingHead)
               for m in model.modules())  # fmt: skip


def test_apply_refuses_data2vec_vision_in_one_line():
    model = tf.Data2VecVisionModel(tf.Data2VecVisionConfig(**VISION, image_size=32, patch_size=8))
    with pytest.raises(ValueError, match="_supports_attention_backend") as excinfo:
        FNAConfig().apply(model)
    assert "Data2VecVisionModel" in str(excinfo.value) and "\n" not in str(excinfo.value)


# --- fallback warnings and explain ------------------------------------------------------------------------------


def _warnings(model, inputs, passes: int = 2) -> list[str]:
    with CaptureLogger(plans.logger) as captured:
        for _ in range(passes):
            with torch.no_grad():
                model(**inputs)
    return [line for line in captured.out.splitlines() if line.startswith("hf_fna:")]


def test_short_sequences_warn_once_per_model_and_explain_says_why():
    model = _tiny("vit")
    FNAConfig(layers="all").apply(model)  # default min_tokens=512 > 17 tokens
    before = hf_fna.explain(model)
    assert [r.ran for r in before.layers] == [None, None] and all(r.configured for r in before.layers)
    assert "512 tokens or more" in before.layers[0].reason

    lines = _warnings(model, _images())
    assert len(lines) == 1 and "17 tokens < 512" in lines[0] and "min_tokens" in lines[0]
    after = hf_fna.explain(model)
    assert [(r.ran, r.tokens) for r in after.layers] == [("exact", 17), ("exact", 17)]
    assert "min_tokens=512" in after.layers[0].reason and "exact" in str(after)

    other = _tiny("vit")
    FNAConfig(layers="all").apply(other)
    assert len(_warnings(other, _images())) == 1  # a second model warns for itself

    FNAConfig(layers=[1], min_tokens=0, num_landmarks=4).apply(model)
    assert _warnings(model, _images()) == []
    report = hf_fna.explain(model)
    assert report.ran_fna() == [1] and report.layers[0].reason.startswith("layer not in FNAConfig.layers")


def test_beit_relative_position_bias_falls_back_with_a_reason():
    config = tf.BeitConfig(**VISION, image_size=32, patch_size=8, use_relative_position_bias=True)
    torch.manual_seed(0)
    model = tf.BeitModel(config).eval()
    with torch.no_grad():  # trained tables are not zero: the bias then differs between queries
        for name, parameter in model.named_parameters():
            if "relative_position_bias_table" in name:
                parameter.normal_()
    FNAConfig(layers="all", min_tokens=0, num_landmarks=4).apply(model)
    lines = _warnings(model, _images())
    assert len(lines) == 1 and "varies across queries" in lines[0] and "relative position bias" in lines[0]
    assert {r.reason for r in hf_fna.explain(model).layers} == {"mask varies across queries"}


# --- block-diagonal masks (packed images) ------------------------------------------------------------------------


def test_a_key_mask_shared_by_the_batch_runs_fna():
    config = tf.BeitConfig(**VISION, image_size=32, patch_size=8, use_relative_position_bias=True)
    torch.manual_seed(0)
    beit = tf.BeitModel(config).eval()  # zero-initialised relative position bias: the same for every query
    exact = tf.BeitModel(copy.deepcopy(config)).eval()
    exact.load_state_dict(beit.state_dict())
    FNAConfig(layers="all", num_landmarks=17, min_tokens=0, pinv="exact").apply(beit)
    with torch.no_grad():
        torch.testing.assert_close(beit(**_images()).last_hidden_state, exact(**_images()).last_hidden_state)
    assert hf_fna.explain(beit).ran_fna() == [0, 1]


def test_diagonal_blocks_finds_packed_images_and_rejects_other_masks():
    minimum = torch.finfo(torch.float32).min
    mask = torch.full((7, 7), minimum)
    mask[:3, :3] = 0
    mask[3:, 3:] = 0
    mask[3:, 6] = minimum  # a padded key inside the second block
    assert diagonal_blocks(mask[None, None]) == ((0, 0, 3), (0, 3, 7))
    assert diagonal_blocks(torch.zeros(2, 1, 4, 4)) == ((0, 0, 4), (1, 0, 4))
    causal = torch.full((5, 5), minimum).triu(1)
    assert diagonal_blocks(causal[None, None]) is None
    heads = torch.stack([mask, torch.zeros(7, 7)])[None]
    assert diagonal_blocks(heads) is None  # differs between heads


def _pixtral_pair(fna_config: FNAConfig, second_image: int = 32):
    torch.manual_seed(0)
    config = tf.PixtralVisionConfig(**VISION, image_size=48, patch_size=8, head_dim=8)
    exact = tf.PixtralVisionModel(config).eval()
    with torch.no_grad():  # peaked attention, as in trained models
        for name, parameter in exact.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(6.0)
    fna = tf.PixtralVisionModel(copy.deepcopy(config)).eval()  # apply() writes to the config: one per model
    fna.load_state_dict(exact.state_dict())
    fna_config.apply(fna)
    # Two images of 36 and (second_image / 8)^2 patches packed into one sequence (a block-diagonal mask).
    sizes = torch.tensor([[48, 48], [second_image, second_image]])
    inputs = {"pixel_values": _pixels(2, 3, 48, 48), "image_sizes": sizes}
    with torch.no_grad():
        return exact(**inputs).last_hidden_state, fna(**inputs).last_hidden_state, fna


def test_packed_images_run_fna_per_block_and_equal_exact_at_m_equal_block_size():
    fna_config = FNAConfig(layers="all", num_landmarks=36, min_tokens=0, pinv="exact")
    exact, approx, model = _pixtral_pair(fna_config, second_image=48)
    assert exact.shape[1] == 72
    torch.testing.assert_close(approx, exact, atol=1e-4, rtol=0)
    report = hf_fna.explain(model)
    assert report.ran_fna() == [0, 1] and "2 of 2 packed blocks" in report.layers[0].reason

    # Fewer landmarks than tokens per block (Newton-Schulz: the reference mode refuses that): the Nyström path ran.
    exact, approx, model = _pixtral_pair(FNAConfig(layers="all", num_landmarks=8, min_tokens=0), 48)
    assert (approx - exact).abs().max() > 1e-3


def test_packed_blocks_shorter_than_min_tokens_run_exact():
    exact, approx, model = _pixtral_pair(FNAConfig(layers="all", num_landmarks=8, min_tokens=20))
    assert "1 of 2 packed blocks" in hf_fna.explain(model).layers[0].reason
    torch.testing.assert_close(approx[:, 36:], exact[:, 36:], atol=1e-5, rtol=0)  # the 16-patch image: exact
    assert (approx[:, :36] - exact[:, :36]).abs().max() > 1e-3


def test_an_unknown_family_is_assumed_to_have_one_cls_token_and_says_so():
    model = _tiny("vit")
    model.config.model_type = "my_vit"  # as a custom model on the Hub would be
    with CaptureLogger(plans.logger) as captured:
        FNAConfig(min_tokens=0, num_landmarks=4).apply(model)
    assert "model_type 'my_vit' are not known; assuming 1 leading token" in captured.out
    assert tower_plans(model)[0].special == SpecialTokens(leading=1, trailing=0)


def test_packed_images_all_shorter_than_min_tokens_warn_as_short():
    with CaptureLogger(plans.logger) as captured:
        exact, approx, model = _pixtral_pair(FNAConfig(layers="all", num_landmarks=8, min_tokens=40), 48)
    lines = [line for line in captured.out.splitlines() if line.startswith("hf_fna:")]
    assert len(lines) == 1 and "2 packed images of at most 36 tokens each, fewer than 40" in lines[0]
    assert hf_fna.explain(model).layers[0].reason == "packed images of <= 36 tokens < min_tokens=40"
    torch.testing.assert_close(approx, exact)


def test_explain_reports_each_schedule_group_with_its_own_landmark_count():
    model = _tiny("vit")
    FNAConfig(layers="0@4;1@8", min_tokens=0).apply(model)
    with torch.no_grad():
        model(**_images())
    assert [r.reason for r in hf_fna.explain(model).layers] == ["FNA, m=4", "FNA, m=8"]
