"""Adapters saved for the original base weights, for PiSSA, OLoRA and SPaRLoRA."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparlora.adapters import apply_method, changes_base_weights, save_adapter_for_original_base, save_initial_adapter

METHODS = {
    "pissa": dict(type="lora", rank=4, alpha=8, init="pissa"),
    "olora": dict(type="lora", rank=4, alpha=8, init="olora"),
    "sparlora": dict(type="lora", rank=4, alpha=8, init="sparlora",
                     sparlora=dict(basis="dft_complex", select="lowest", b_init="lstsq", residual=True)),
}


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.fixture(params=sorted(METHODS))
def trained(request, tmp_path):
    """A tiny model adapted on its first layer, initial adapter saved, then 5 AdamW steps."""
    pristine = tiny_model()
    method = dict(METHODS[request.param], target_modules=["0"])
    model = apply_method(copy.deepcopy(pristine), method)
    save_initial_adapter(model, tmp_path / "initial")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(8, 16, generator=generator), torch.randn(8, 4, generator=generator)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return pristine, model, tmp_path, method


def test_residual_inits_flagged():
    assert all(changes_base_weights(method) for method in METHODS.values())
    assert not changes_base_weights(dict(init="default"))
    assert not changes_base_weights(dict(init="sparlora", sparlora=dict(residual=False, b_init="zero")))


def test_converted_config_doubles_rank(trained):
    _, model, tmp_path, _ = trained
    save_adapter_for_original_base(model, tmp_path / "converted", tmp_path / "initial")
    import json

    saved = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert saved["r"] == 8
    assert saved["lora_alpha"] == 16
    assert model.peft_config["default"].r == 4
    assert model.peft_config["default"].lora_alpha == 8
    assert model.active_adapter == "default"


def test_two_saves_identical(trained):
    _, model, tmp_path, _ = trained
    save_adapter_for_original_base(model, tmp_path / "first", tmp_path / "initial")
    save_adapter_for_original_base(model, tmp_path / "second", tmp_path / "initial")
    first = (tmp_path / "first" / "adapter_model.safetensors").read_bytes()
    second = (tmp_path / "second" / "adapter_model.safetensors").read_bytes()
    assert first == second


def test_pristine_base_plus_converted_adapter(trained):
    from peft import PeftModel

    pristine, model, tmp_path, _ = trained
    save_adapter_for_original_base(model, tmp_path / "converted", tmp_path / "initial")
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        expected = model(x)
        restored = PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "converted"))
        assert (restored(x) - expected).abs().max().item() <= 1e-6
        merged = restored.merge_and_unload()
        assert (merged(x) - expected).abs().max().item() <= 1e-6
