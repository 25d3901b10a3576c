"""The shipped demo base model matches what local/demo/train_base.py documents."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from sparlora.kaldi_io import read_token_list
from sparlora.model import MODEL_FILES, load_paraformer

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "local" / "demo" / "base_model"
sys.path.insert(0, str(ROOT / "local" / "demo"))

import make_corpus  # noqa: E402


@pytest.fixture(scope="module")
def info() -> dict:
    return json.loads((BASE / "base_model_info.json").read_text(encoding="utf-8"))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_complete():
    assert [name for name in MODEL_FILES if not (BASE / name).is_file()] == []


def test_size_within_budget():
    assert (BASE / "model.pt").stat().st_size < 20 * 1024 * 1024


def test_config_matches_record(info):
    assert sha256_of(BASE / "config.yaml") == info["config_sha256"]
    assert sha256_of(BASE / "config.yaml") == sha256_of(ROOT / "local" / "demo" / "conf" / "base_model.yaml")


def test_tokens_match_record(info):
    assert sha256_of(BASE / "tokens.json") == info["tokens_sha256"]


def test_tokens_rebuilt_from_fortunes():
    segments = make_corpus.read_fortune_segments(make_corpus.FORTUNE_FILE, 4, 10)
    vocabulary = make_corpus.build_vocabulary(segments, 800)
    expected = make_corpus.SPECIAL_TOKENS_HEAD + vocabulary + [make_corpus.UNK_TOKEN]
    assert read_token_list(BASE / "tokens.json") == expected


def test_parameter_count(info):
    model, _ = load_paraformer(BASE)
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]


def test_mandarin_test_cer_reproduces(info, tmp_path):
    from train_base import kaldi_entries

    from sparlora.data import AsrDataset
    from sparlora.decode import decode_dataset
    from sparlora.score import cer_counts
    from sparlora.text import TextNormConfig

    assert make_corpus.main(["--out-dir", str(tmp_path), "--sets", "cmn_test"]) == 0
    entries = kaldi_entries(tmp_path / "cmn_test")
    model, kwargs = load_paraformer(BASE)
    dataset = AsrDataset(entries, kwargs["frontend"], kwargs["tokenizer"], 16000, "mean")
    hyps = decode_dataset(model, dataset, kwargs["tokenizer"], kwargs["frontend"], batch_size=32, device="cpu", progress=False)
    cer = 100 * cer_counts({e.key: e.target for e in entries}, hyps, TextNormConfig()).cer
    assert abs(cer - info["test_cer_percent"]["cmn_test"]) <= 1.0


@pytest.mark.parametrize("select", ["lowest", "energy"])
def test_sparlora_keeps_shipped_model_outputs(select):
    from sparlora.adapters import apply_method

    from test_adapters import paraformer_outputs

    model, _ = load_paraformer(BASE)
    encoder_before, decoder_before = paraformer_outputs(model)
    method = dict(type="lora", rank=32, alpha=64, init="sparlora",
                  sparlora=dict(basis="dft_complex", select=select, b_init="lstsq", residual=True))
    encoder_after, decoder_after = paraformer_outputs(apply_method(model, method))
    assert (encoder_after - encoder_before).abs().max().item() <= 1e-4
    assert (decoder_after - decoder_before).abs().max().item() <= 1e-4
