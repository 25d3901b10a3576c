"""End-to-end smoke run of run.sh stages 0-5 on a few demo utterances."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from sparlora.kaldi_io import read_table

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_BASE_MODEL = ROOT / "local" / "demo" / "base_model"


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    if not (SHIPPED_BASE_MODEL / "model.pt").is_file():
        pytest.fail(f"shipped base model missing in {SHIPPED_BASE_MODEL}")
    work = tmp_path_factory.mktemp("recipe")
    overrides = [
        f"corpus.source_dir={work}/corpus",
        f"corpus.make_cmd='python local/demo/make_corpus.py --out-dir {work}/corpus --max-utts 12'",
        f"data_dir={work}/data",
        f"exp_root={work}/exp",
        f"model.dir={work}/pretrained",
        "train.epochs=1",
        "train.warmup_steps=2",
        "decode.batch_size=8",
    ]
    result = subprocess.run(
        ["bash", "run.sh", "--skip-setup", "true", "--stage", "0", "--stop-stage", "5", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return work, result.stdout + result.stderr


def test_stage0_prepares_every_split(recipe_run):
    work, _ = recipe_run
    for split in ("train", "dev", "sc_test", "cmn_test"):
        assert len(read_table(work / "data" / split / "wav.scp")) == 12


def test_stage1_keeps_raw_text(recipe_run):
    work, _ = recipe_run
    assert (work / "data" / "train" / "text.raw").is_file()
    assert (work / "data" / "train" / "oov.txt").is_file()


def test_stage2_writes_manifests(recipe_run):
    work, _ = recipe_run
    lines = (work / "data" / "train" / "data.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 12
    assert (work / "pretrained" / "model.pt").exists()


def test_stage3_writes_merged_model(recipe_run):
    work, _ = recipe_run
    final = work / "exp" / "sparlora_r32" / "final_model"
    for name in ("config.yaml", "model.pt", "am.mvn", "tokens.json", "configuration.json"):
        assert (final / name).is_file()
    assert list((work / "exp" / "sparlora_r32" / "tensorboard").iterdir())


def test_stage4_decodes_base_and_finetuned(recipe_run):
    work, _ = recipe_run
    for exp in ("base", "sparlora_r32"):
        hyps = read_table(work / "exp" / exp / "decode_sc_test" / "hyp")
        assert len(hyps) == 12


def test_stage5_reports_cer(recipe_run):
    work, output = recipe_run
    results = (work / "exp" / "sparlora_r32" / "RESULTS.md").read_text(encoding="utf-8")
    assert "sc_test" in results
    assert re.search(r"sc_test.*CER", output)
