"""scripts/compare_methods.sh end to end: 2 methods and a rank sweep, 1 epoch, a dozen demo utterances (slow)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    work = tmp_path_factory.mktemp("compare")
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
    command = ["bash", "scripts/compare_methods.sh", "--skip-setup", "true", "--methods", "lora sparlora", "--ranks", "4",
               "--sweep-methods", "sparlora", "--sweep-ranks", "2 4", *overrides]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return work, first.stdout + first.stderr, second.stdout + second.stderr


def test_runs_trained_and_logged(comparison):
    work, _, _ = comparison
    for tag in ("lora_r4", "sparlora_r4", "sparlora_r2"):
        run_dir = work / "exp" / tag
        assert (run_dir / "final_model" / "model.pt").is_file()
        assert "Stage 5 done" in (run_dir / "run.log").read_text(encoding="utf-8")
        assert (run_dir / ".compare_done").is_file()


def test_results_md_rows(comparison):
    work, _, _ = comparison
    text = (work / "exp" / "RESULTS.md").read_text(encoding="utf-8")

    assert re.search(r"^\| lora \| 4 \| train \| \d+\.\d\d \| \d+\.\d\d \|$", text, re.MULTILINE)
    assert re.search(r"^\| sparlora \| 4 \| train \| \d+\.\d\d \| \d+\.\d\d \|$", text, re.MULTILINE)
    assert re.search(r"^\| sparlora \| 4 \| train \| sc_test \| [\d.]+ \| [\d.]+ \| ", text, re.MULTILINE)
    # log_trainable's line reaches the table through run.log.
    assert re.search(r"^\| sparlora \| 4 \| train \| [\d,]+ \| [\d.]+ \| ", text, re.MULTILINE)
    assert "## SPaRLoRA ablation (rank 4, train)" in text
    assert "![dev CER per epoch, rank 4, train](dev_cer_per_epoch.png)" in text
    assert (work / "exp" / "dev_cer_per_epoch.png").is_file()
    assert re.search(r"^\| sparlora \| 2 \| train \| \d+\.\d\d \| \d+\.\d\d \|$", text, re.MULTILINE)
    assert "![test CER against rank, train](cer_vs_rank.png)" in text
    assert (work / "exp" / "cer_vs_rank.png").is_file()


def test_sweep_run_once_per_rank(comparison):
    _, first, _ = comparison

    assert first.count("sparlora_r4: stages 3-5") == 1
    assert first.count("sparlora_r2: stages 3-5") == 1
    assert first.index("sparlora_r4: stages 3-5") < first.index("sparlora_r2: stages 3-5")


def test_rerun_skips_finished_runs(comparison):
    _, _, second = comparison

    assert "lora_r4: finished earlier, skipped" in second
    assert "sparlora_r4: finished earlier, skipped" in second
    assert "sparlora_r2: finished earlier, skipped" in second
    assert "stages 3-5" not in second
