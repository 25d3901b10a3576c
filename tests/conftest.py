"""Shared fixtures: a small random Paraformer saved in the ModelScope layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "local" / "demo" / "conf" / "base_model.yaml"
SHIPPED_BASE_MODEL = ROOT / "local" / "demo" / "base_model"

TINY_TOKENS = ["<blank>", "<s>", "</s>"] + list("今天天气很好我们去成都吃火锅巴适得") + ["<unk>"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A Paraformer with the demo base model's config and random weights, in the ModelScope layout."""
    from funasr.auto.auto_model import AutoModel

    from sparlora.model import save_model_dir, write_am_mvn, write_configuration_json

    out = tmp_path_factory.mktemp("tiny_paraformer")
    shutil.copyfile(BASE_CONFIG, out / "config.yaml")
    (out / "tokens.json").write_text(json.dumps(sorted(set(TINY_TOKENS), key=TINY_TOKENS.index), ensure_ascii=False), encoding="utf-8")
    write_configuration_json(out)
    write_am_mvn(out / "am.mvn", torch.full((560,), 10.0), torch.full((560,), 3.0))
    torch.manual_seed(0)
    model, _ = AutoModel.build_model(model=str(out), device="cpu", disable_update=True, log_level="ERROR")
    save_model_dir(model.state_dict(), out, out)
    return out
