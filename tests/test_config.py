"""FNAConfig: validation with clear errors, serialisation, layer resolution."""

from __future__ import annotations

import json

import pytest

from hf_fna import FNAConfig, MaskingConfig
from hf_fna.schedules import LayerGroup, parse_layers, resolve_groups, resolve_layers, schedule_string


def test_defaults_are_the_documented_auto_schedule():
    config = FNAConfig()
    assert config.layers == "auto" and config.num_landmarks == 64 and config.pinv_iterations == 6
    assert resolve_layers("auto", 12) == [6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_landmarks": 0}, r"FNAConfig.num_landmarks=0 is invalid; expected an integer >= 1"),
        ({"sampling": "kmeans"}, r"FNAConfig.sampling='kmeans' is not supported; accepted values: fps, random"),
        ({"sampling_features": "v"}, r"sampling_features='v' is not supported; accepted values: q, k, hidden"),
        ({"pinv": "svd"}, r"FNAConfig.pinv='svd' is not supported; accepted values: newton, exact"),
        ({"layers": "first half"}, r"FNAConfig.layers='first half' is invalid"),
        ({"layers": [1, "2"]}, r"FNAConfig.layers=\[1, '2'\] is invalid"),
        ({"min_tokens": -1}, r"FNAConfig.min_tokens=-1 is invalid"),
        ({"resample_every_layer": "yes"}, r"resample_every_layer='yes' is invalid; expected True or False"),
        (
            {"masking": {"intervention": "drop"}},
            r"masking.intervention='drop' is not supported; accepted values: none, mask, sink",
        ),
        ({"masking": {"colour": 1}}, r"masking got unknown field\(s\) \['colour'\]"),
    ],
)
def test_bad_values_name_field_value_and_accepted(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FNAConfig(**kwargs)


def test_unknown_field_in_dict():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['landmarks'\]; accepted fields: .*num_landmarks"):
        FNAConfig.from_dict({"landmarks": 3})


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("all", [0, 1, 2, 3]), ("none", []), ("2:", [2, 3]), ("-1:", [3]), (":2", [0, 1]), ([3, -4, 3], [0, 3])],
)
def test_resolve_layers(spec, expected):
    assert resolve_layers(spec, 4) == expected


def test_resolve_layers_out_of_range():
    with pytest.raises(ValueError, match="layer 4, out of range for a tower with 4 layers"):
        resolve_layers([4], 4)
    with pytest.raises(ValueError, match="out of range for a tower with 4 layers"):
        resolve_layers("6:", 4)


def test_schedule_groups_keep_their_own_counts_and_selection():
    config = FNAConfig(layers="1:3@16;3:", num_landmarks=8)
    assert config.resolve(4).groups == [LayerGroup((1, 2), 16), LayerGroup((3,), 8)]
    assert resolve_layers(config.layers, 4) == [1, 2, 3]
    # The older forms are shorthands: one group, or one group per layer with resample_every_layer.
    assert FNAConfig(layers="2:", num_landmarks=8).resolve(4).groups == [LayerGroup((2, 3), 8)]
    assert FNAConfig(layers="1:3@16;3:", num_landmarks=8, resample_every_layer=True).resolve(4).groups == [
        LayerGroup((1,), 16), LayerGroup((2,), 16), LayerGroup((3,), 8),
    ]  # fmt: skip
    assert FNAConfig(layers="none").resolve(4).groups == []
    groups = resolve_groups("0,2@4;3@32", 64, False, 4)
    assert groups == [LayerGroup((0, 2), 4), LayerGroup((3,), 32)]
    assert schedule_string(groups) == "0,2@4;3:4@32"
    assert FNAConfig(layers=schedule_string(groups)).resolve(4).groups == groups
    assert parse_layers("1,2@16;3:") == "1,2@16;3:"


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ("1:3@16;2:@8", r"puts layer\(s\) \[2\] in two groups"),
        ("1:3@0", r"a group has 0 landmarks; expected >= 1"),
        ("1:3@16;middle@8", r"group 'middle@8' is not 'LAYERS' or 'LAYERS@M'"),
        ("1:3@16;6:@8", r"'6:' is out of range for a tower with 4 layers"),
    ],
)
def test_bad_schedules_name_the_group(layers, message):
    with pytest.raises(ValueError, match=message):
        FNAConfig(layers=layers).resolve(4)


def test_json_round_trip(tmp_path):
    config = FNAConfig(layers=[1, 2], num_landmarks=32, sampling="random", masking=MaskingConfig(intervention="sink"))
    path = config.save_pretrained(tmp_path / "cfg")
    assert json.loads((tmp_path / "cfg" / "fna_config.json").read_text())["masking"]["intervention"] == "sink"
    assert FNAConfig.from_pretrained(tmp_path / "cfg") == config
    assert FNAConfig.from_pretrained(path) == config
    assert FNAConfig.from_dict(json.loads(config.to_json_string())) == config


def test_from_pretrained_reads_model_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"fna_config": {"num_landmarks": 9}}}))
    assert FNAConfig.from_pretrained(tmp_path).num_landmarks == 9
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(OSError, match="carries no `fna_config`"):
        FNAConfig.from_pretrained(tmp_path)


def test_parse_layers_from_command_line_text():
    assert parse_layers(None) == parse_layers([]) == "auto"
    assert parse_layers(["6", "7"]) == [6, 7]
    assert parse_layers("6,7,-1") == parse_layers(["6,7", "-1"]) == [6, 7, -1]
    assert parse_layers(" 6: ") == "6:"
    assert parse_layers("none") == "none"
    for bad in ("6:x", "six", "6:,7", "all,6"):
        with pytest.raises(ValueError, match=r"layers .* is invalid; give layer indices"):
            parse_layers(bad)


def test_configs_saved_with_the_old_masking_mode_key_still_load():
    with pytest.warns(FutureWarning, match="masking.mode is now called masking.intervention"):
        config = FNAConfig.from_dict({"masking": {"mode": "sink", "detect": "attention"}})
    assert config.masking.intervention == "sink" and config.masking.detect == "attention"
    assert "mode" not in config.to_dict()["masking"]
