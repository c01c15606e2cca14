"""The `fna` backend on tiny random models of every family, saved and reloaded with `from_pretrained`."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModel, CLIPModel, Dinov2Config, Dinov2Model

import hf_fna
from hf_fna import FNAConfig
from hf_fna.integration import backend as fna_backend
from hf_fna.integration.plans import layer_plan, plan_model
from tiny_families import LAYERS, Family, families, family

FAMILIES = [f.name for f in families()]


def tower_config(model, fam: Family):
    return model.config if fam.tower is None else getattr(model.config, fam.tower)


def fna_implementation(fam: Family):
    return "fna" if fam.tower is None else {fam.tower: "fna", "text_config": "sdpa"}


def save_tiny(fam: Family, folder, fna_config: FNAConfig | None) -> str:
    torch.manual_seed(0)
    model = fam.model_class(fam.config)
    with torch.no_grad():  # peaked attention, as in trained models (random init gives near-uniform attention)
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(6.0)
    if fna_config is not None:
        tower_config(model, fam).fna_config = fna_config.to_dict()
    model.save_pretrained(folder)
    return str(folder)


def load(fam: Family, folder: str, implementation, dtype=torch.float32):
    return fam.model_class.from_pretrained(folder, attn_implementation=implementation, dtype=dtype).eval()


def run(fam: Family, model, batch: int = 2) -> torch.Tensor:
    with torch.no_grad():
        return fam.output(model(**fam.make_inputs(batch)))


class LayerRecorder:
    """Records the layer index of every attention call that took the Nyström path."""

    def __init__(self, model, monkeypatch):
        self.layers: list[int] = []
        current = {}
        for module in model.modules():
            plan = layer_plan(module)
            if plan is not None:
                index = plan.index
                module.register_forward_pre_hook(lambda _m, _a, i=index: current.__setitem__("layer", i))
        original = fna_backend.nystrom_attention

        def recording(*args, **kwargs):
            self.layers.append(current["layer"])
            return original(*args, **kwargs)

        monkeypatch.setattr(fna_backend, "nystrom_attention", recording)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_token_a_landmark_equals_sdpa(name, tmp_path):
    fam = family(name)
    fna_config = FNAConfig(layers="all", num_landmarks=fam.tokens, min_tokens=0, pinv="exact")
    folder = save_tiny(fam, tmp_path, fna_config)
    exact = run(fam, load(fam, folder, "sdpa"))
    fna_model = load(fam, folder, fna_implementation(fam))
    assert tower_config(fna_model, fam)._attn_implementation == "fna"
    torch.testing.assert_close(run(fam, fna_model), exact, atol=1e-4, rtol=0)

    # One landmark fewer (the reference mode refuses that; Newton-Schulz approximates): the Nyström path really ran.
    FNAConfig(layers="all", num_landmarks=fam.tokens - 1, min_tokens=0).apply(fna_model)
    assert (run(fam, fna_model) - exact).abs().max() > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_landmarks_finite(name, dtype, tmp_path):
    fam = family(name)
    folder = save_tiny(fam, tmp_path, FNAConfig(layers="all", num_landmarks=4, min_tokens=0))
    output = run(fam, load(fam, folder, fna_implementation(fam), dtype=dtype))
    assert output.dtype == dtype
    assert torch.isfinite(output.float()).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_fna_runs_in_exactly_the_configured_layers(name, tmp_path, monkeypatch):
    fam = family(name)
    folder = save_tiny(fam, tmp_path, FNAConfig(layers=[1, 3], num_landmarks=4, min_tokens=0))
    model = load(fam, folder, fna_implementation(fam))
    run(fam, model)  # plans the model on its first forward
    recorder = LayerRecorder(model, monkeypatch)
    run(fam, model)
    assert recorder.layers == [1, 3]


def test_clip_text_tower_stays_exact_with_padding(tmp_path):
    fam = family("clip")
    folder = save_tiny(fam, tmp_path, FNAConfig(layers="all", num_landmarks=4, min_tokens=0))
    exact = load(fam, folder, "sdpa")
    # Both towers on `fna`: the causal, padded text tower must still equal SDPA.
    fna_model = load(fam, folder, "fna")
    inputs = fam.make_inputs(3)
    assert inputs["attention_mask"].min() == 0
    with torch.no_grad():
        expected = exact.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        got = fna_model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-5, rtol=0)


def test_padded_keys_are_never_landmarks_and_match_sdpa():
    torch.manual_seed(0)
    batch, heads, tokens, dim = 2, 2, 12, 8
    q, k, v = (torch.randn(batch, heads, tokens, dim) for _ in range(3))
    keep = torch.ones(batch, tokens, dtype=torch.bool)
    keep[:, 8:] = False  # every sample padded to 8 real tokens: the reference mode needs all of them as landmarks
    # Make a padded key a far outlier: FPS would pick it first were it not excluded.
    k[0, :, 10] *= 50
    q[0, :, 10] *= 50
    mask = keep[:, None, None, :]
    features = q.mean(1)
    picks = hf_fna.ops.select_landmarks(features, 8, valid=keep)
    assert not (picks[0] >= 8).any()
    assert picks[0].unique().numel() == 8
    # With every real token a landmark the padded batch equals SDPA on the real tokens.
    got = hf_fna.fna_attention(q, k, v, num_landmarks=8, attention_mask=mask, pinv="exact")
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=0)


def test_siglip_text_padding_mask_is_honoured():
    """A bidirectional padded sequence through the backend equals SDPA when every real token is a landmark."""
    config = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config.fna_config = FNAConfig(layers="all", num_landmarks=6, min_tokens=0, pinv="exact").to_dict()
    config._attn_implementation = "fna"
    model = Dinov2Model(config).eval()
    plan_model(model)
    # The module that dispatches through AttentionInterface (Dinov2SelfAttention before transformers 5.13).
    attention = next(m for m in model.encoder.layer[0].modules() if layer_plan(m) is not None)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 8) for _ in range(3))
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[:, 6:] = False
    mask = keep[:, None, None, :].expand(2, 1, 9, 9)
    out, _ = fna_backend.fna_attention_forward(attention, q, k, v, mask, scaling=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-5, rtol=0)


def test_short_sequences_fall_back_to_exact(tmp_path, monkeypatch):
    fam = family("dinov2")
    folder = save_tiny(fam, tmp_path, FNAConfig(layers="all", num_landmarks=fam.tokens + 1, min_tokens=0))
    model = load(fam, folder, "fna")
    run(fam, model)
    recorder = LayerRecorder(model, monkeypatch)
    torch.testing.assert_close(run(fam, model), run(fam, load(fam, folder, "sdpa")), atol=1e-5, rtol=0)
    assert recorder.layers == []
    FNAConfig(layers="all", num_landmarks=4, min_tokens=fam.tokens + 1).apply(model)
    run(fam, model)
    assert recorder.layers == []


def test_saved_fna_config_round_trips(tmp_path):
    fam = family("clip")
    fna_config = FNAConfig(layers="-2:", num_landmarks=5, sampling="random", seed=3, min_tokens=0)
    folder = save_tiny(fam, tmp_path / "a", None)
    model = load(fam, folder, "sdpa")
    fna_config.apply(model)
    assert model.config.vision_config._attn_implementation == "fna"
    assert model.config.text_config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path / "b")
    reloaded = CLIPModel.from_pretrained(tmp_path / "b", attn_implementation={"vision_config": "fna"})
    assert FNAConfig.from_model_config(reloaded.config.vision_config) == fna_config
    assert FNAConfig.from_pretrained(tmp_path / "b") == fna_config
    # AutoModel path with the plain string: the text tower runs causal attention, hence exact.
    auto = AutoModel.from_pretrained(tmp_path / "b", attn_implementation="fna")
    assert FNAConfig.from_model_config(auto.config.vision_config) == fna_config


def test_landmarks_shared_across_layers_unless_resampling(tmp_path, monkeypatch):
    fam = family("dinov2")
    calls = []
    original = fna_backend.select_landmarks

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fna_backend, "select_landmarks", counting)
    folder = save_tiny(fam, tmp_path, FNAConfig(layers="all", num_landmarks=6, min_tokens=0))
    model = load(fam, folder, "fna")
    run(fam, model)
    assert len(calls) == 1
    FNAConfig(layers="all", num_landmarks=6, min_tokens=0, resample_every_layer=True).apply(model)
    calls.clear()
    run(fam, model)
    assert len(calls) == LAYERS


def test_each_group_of_a_schedule_selects_its_own_landmarks(tmp_path, monkeypatch):
    fam = family("dinov2")
    counts = []
    original = fna_backend.select_landmarks

    def recording(features, num_landmarks, *args, **kwargs):
        counts.append(num_landmarks)
        return original(features, num_landmarks, *args, **kwargs)

    monkeypatch.setattr(fna_backend, "select_landmarks", recording)
    folder = save_tiny(fam, tmp_path, FNAConfig(layers="0:2@6;2:@4", min_tokens=0))
    model = load(fam, folder, "fna")
    run(fam, model)  # plans the model on its first forward
    recorder = LayerRecorder(model, monkeypatch)
    counts.clear()
    run(fam, model)
    assert counts == [6, 4] and recorder.layers == [0, 1, 2, 3]
    assert hf_fna.last_landmarks(model).shape == (2, 4)  # the last selection: layer 2's group


def test_a_schedule_with_every_token_a_landmark_equals_sdpa(tmp_path):
    fam = family("dinov2")
    n = fam.tokens
    folder = save_tiny(fam, tmp_path, FNAConfig(layers=f"0@{n};1:3@{n};3@{n}", min_tokens=0, pinv="exact"))
    exact = run(fam, load(fam, folder, "sdpa"))
    torch.testing.assert_close(run(fam, load(fam, folder, "fna")), exact, atol=1e-4, rtol=0)


def test_apply_rejects_overlapping_groups(tmp_path):
    fam = family("dinov2")
    model = load(fam, save_tiny(fam, tmp_path, None), "sdpa")
    with pytest.raises(ValueError, match=r"puts layer\(s\) \[2\] in two groups"):
        FNAConfig(layers="1:3@8;2:@4").apply(model)
    assert getattr(model.config, "fna_config", None) is None  # nothing changed


def test_changing_batch_size_grad_modes_and_checkpointing(tmp_path):
    fam = family("vit")
    folder = save_tiny(fam, tmp_path, FNAConfig(layers="1:", num_landmarks=6, min_tokens=0))
    model = load(fam, folder, "fna")
    single = [run(fam, model, batch=1)]
    with torch.inference_mode():
        batched = fam.output(model(**fam.make_inputs(3)))
    assert batched.shape[0] == 3 and torch.isfinite(batched).all()

    # A batch of two equals two single runs.
    inputs = fam.make_inputs(2)
    with torch.no_grad():
        both = model(**inputs).last_hidden_state
        first = model(pixel_values=inputs["pixel_values"][:1]).last_hidden_state
        second = model(pixel_values=inputs["pixel_values"][1:]).last_hidden_state
    torch.testing.assert_close(both, torch.cat([first, second]), atol=1e-5, rtol=1e-5)
    assert single[0].shape[0] == 1

    # Gradient checkpointing recomputes layers in backward with the same landmarks: same gradients.
    model.train()
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(**inputs).last_hidden_state.square().mean().backward()
        grads.append(model.layers[2].attention.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    assert grads[0].abs().sum() > 0


def test_two_models_and_two_threads_do_not_trample(tmp_path):
    fam = family("dinov2")
    folder_a = save_tiny(fam, tmp_path / "a", FNAConfig(layers="all", num_landmarks=5, min_tokens=0))
    folder_b = save_tiny(fam, tmp_path / "b", FNAConfig(layers="2:", num_landmarks=9, min_tokens=0))
    model_a, model_b = load(fam, folder_a, "fna"), load(fam, folder_b, "fna")
    expected = {1: run(fam, model_a, 1), 2: run(fam, model_b, 2)}
    results, errors = {}, []

    def work(model, batch):
        try:
            for _ in range(5):
                results[batch] = run(fam, model, batch)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(model_a, 1)), threading.Thread(target=work, args=(model_b, 2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for batch in (1, 2):
        torch.testing.assert_close(results[batch], expected[batch])


def test_output_attentions_returns_approximate_matrix(tmp_path):
    fam = family("dinov2")
    folder = save_tiny(fam, tmp_path, FNAConfig(layers="all", num_landmarks=fam.tokens, min_tokens=0, pinv="exact"))
    with torch.no_grad():
        fna_out = load(fam, folder, "fna")(**fam.make_inputs(2), output_attentions=True)
        eager_out = load(fam, folder, "eager")(**fam.make_inputs(2), output_attentions=True)
    assert len(fna_out.attentions) == LAYERS
    for got, expected in zip(fna_out.attentions, eager_out.attentions, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_torch_compile_matches_eager(tmp_path):
    fam = family("dinov2")
    folder = save_tiny(fam, tmp_path, FNAConfig(layers="2:", num_landmarks=6, min_tokens=0))
    model = load(fam, folder, "fna")
    expected = run(fam, model)  # eager first: plans the model
    compiled = torch.compile(model)
    torch.testing.assert_close(run(fam, compiled), expected, atol=1e-5, rtol=1e-5)


def test_apply_rejects_models_that_bypass_the_attention_interface():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="PreTrainedModel"):
        FNAConfig().apply(model)


def test_apply_rejects_out_of_range_layers(tmp_path):
    fam = family("vit")
    model = load(fam, save_tiny(fam, tmp_path, None), "sdpa")
    with pytest.raises(ValueError, match=r"layer 7, out of range for a tower with 4 layers"):
        FNAConfig(layers=[0, 7]).apply(model)
    with pytest.raises(ValueError, match="out of range"):
        FNAConfig(layers="9:").apply(model)


@pytest.mark.parametrize("features", ["k", "hidden"])
def test_sampling_features(features, tmp_path):
    fam = family("vit")
    folder = save_tiny(
        fam, tmp_path, FNAConfig(layers="all", num_landmarks=6, min_tokens=0, sampling_features=features)
    )
    model = load(fam, folder, "fna")
    attention = model.layers[0].attention
    seen = {}

    def remember_input(_module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    attention.register_forward_pre_hook(remember_input, with_kwargs=True)
    assert torch.isfinite(run(fam, model)).all()
    if features == "hidden":
        x = seen["x"]
        value = attention.v_proj(x).view(*x.shape[:2], -1, 8).transpose(1, 2)
        recovered = fna_backend._selection_features(attention, None, None, value, "hidden")
        torch.testing.assert_close(recovered, x, atol=1e-4, rtol=1e-4)


def test_backbone_config_towers_such_as_upernet(monkeypatch):
    from transformers import UperNetConfig, UperNetForSemanticSegmentation

    backbone = Dinov2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, image_size=32,
        patch_size=8, out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=True,
    )  # fmt: skip
    config = UperNetConfig(backbone_config=backbone, hidden_size=16, auxiliary_in_channels=32, num_labels=3)
    torch.manual_seed(0)
    model = UperNetForSemanticSegmentation(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
    FNAConfig(layers="all", num_landmarks=17, min_tokens=0, pinv="exact").apply(model)
    assert model.config.backbone_config._attn_implementation == "fna"
    recorder = LayerRecorder(model, monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).logits, expected, atol=1e-4, rtol=0)
    assert recorder.layers == [0, 1, 2, 3]


@pytest.mark.parametrize("name", ["dinov2_registers", "siglip"])
def test_special_tokens_get_their_exact_attention_rows(name, tmp_path, monkeypatch):
    # CLS and registers are landmarks; their own rows come from the landmark queries' exact attention (no special
    # token in SigLIP: no exact row).
    fam = family(name)
    folder = save_tiny(fam, tmp_path, FNAConfig(layers="all", num_landmarks=6, min_tokens=0))
    model = load(fam, folder, fna_implementation(fam))
    seen = []
    original = fna_backend.nystrom_attention

    def recording(query, *args, **kwargs):
        seen.append(kwargs["exact_rows"])
        output, weights = original(query, *args, **kwargs)
        if kwargs["exact_rows"] is not None:
            key, value = args[0], args[1]
            exact = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=kwargs["scale"])
            torch.testing.assert_close(output[:, :, :3], exact[:, :, :3], atol=1e-5, rtol=0)
        return output, weights

    monkeypatch.setattr(fna_backend, "nystrom_attention", recording)
    run(fam, model)
    assert len(seen) == LAYERS
    if name == "siglip":
        assert all(rows is None for rows in seen)
    else:  # CLS and two registers
        assert all(rows.shape == (2, fam.tokens) and rows[:, :3].all() and not rows[:, 3:].any() for rows in seen)
