"""Every example's `--smoke` mode runs offline on bundled material."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.real_weights
def test_trainer_with_fna_decreases_loss_and_trains_attention():
    result = load_example("finetune_trainer").main(["--smoke"])
    assert result["last_epoch_loss"] < result["first_epoch_loss"]
    fna_layers = result["fna_layers"]
    assert fna_layers == [6, 7, 8, 9, 10, 11]
    norms = result["attention_grad_norms"]
    for layer in fna_layers:
        (name,) = [n for n in norms if f".layer.{layer}." in n]
        assert norms[name] > 0, name
