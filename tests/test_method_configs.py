"""Every method config under conf/method composes and leaves the step-0 output unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sparlora.adapters import apply_method
from sparlora.config import load_config
from sparlora.model import load_paraformer

ROOT = Path(__file__).resolve().parents[1]
METHODS = sorted(path.stem for path in (ROOT / "conf" / "method").glob("*.yaml"))


def encoder_output(model):
    speech = torch.randn(2, 30, 560, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        return model.encode(speech, torch.tensor([30, 21]))[0]


def test_expected_methods_present():
    for name in ("full", "lora", "dora", "pissa", "pissa_niter4", "olora", "sparlora",
                 "sparlora_dft", "sparlora_phase", "sparlora_random", "sparlora_energy", "adalora"):
        assert name in METHODS


@pytest.mark.parametrize("name", METHODS)
def test_method_keeps_step0_output(name, tiny_model_dir):
    cfg = load_config(ROOT / "conf" / "demo.yaml", [f"method={name}"])
    method = OmegaConf.to_container(cfg.method, resolve=True)
    assert method["name"] == name
    model, _ = load_paraformer(tiny_model_dir)
    before = encoder_output(model)
    adapted = apply_method(model, method, total_steps=100)
    assert (encoder_output(adapted) - before).abs().max().item() <= 1e-4
    assert any(p.requires_grad for p in adapted.parameters())
