"""A training process killed with SIGKILL in mid-epoch resumes to bit-identical weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from train_helpers import read_steps, write_manifest_file, write_tone_corpus

HELPER = Path(__file__).resolve().parent / "train_helpers.py"


def helper_command(model_dir: Path, data: dict, out_dir: Path, *extra: str) -> list[str]:
    # SPaRLoRA with dropout, the glancing sampler and SpecAugment on, so the resumed run
    # must restore the RNG state to match. A checkpoint is written every 4 steps.
    return [sys.executable, str(HELPER), "--model-dir", str(model_dir), "--train", str(data["train"]), "--dev", str(data["dev"]),
            "--out-dir", str(out_dir), "--method", "sparlora", "--specaug", "--epochs", "3", "--checkpoint-interval", "4", *extra]


def run_helper(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def test_sigkill_mid_epoch_then_resume(tiny_model_dir, tmp_path):
    seconds = [0.6 + 0.1 * index for index in range(10)] + [2.5]
    data = {"train": write_manifest_file(tmp_path / "train.jsonl", write_tone_corpus(tmp_path / "wav", seconds)),
            "dev": write_manifest_file(tmp_path / "dev.jsonl", write_tone_corpus(tmp_path / "dev", [0.7, 1.1], seed=1, prefix="d"))}
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_helper(helper_command(tiny_model_dir, data, straight))

    # 6 batches per epoch: epoch 2 runs steps 7-12, and its mid-epoch checkpoint is at
    # step 8 (batch 2). The process pauses after step 10 and is killed there.
    process = subprocess.Popen(helper_command(tiny_model_dir, data, interrupted, "--pause-at-step", "10"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (interrupted / "paused").is_file():
            assert process.poll() is None, f"training exited with status {process.returncode} before step 10"
            assert time.monotonic() < deadline, "training did not reach step 10 in 300 s"
            time.sleep(0.2)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    killed_at = torch.load(interrupted / "checkpoints" / "last.pt", weights_only=False)["position"]
    assert (killed_at["step"], killed_at["epoch"], killed_at["batches_done"]) == (8, 2, 2)

    run_helper(helper_command(tiny_model_dir, data, interrupted))

    assert [s["step"] for s in read_steps(interrupted)] == list(range(1, 11)) + list(range(9, 19))
    assert [s["step"] for s in read_steps(straight)] == list(range(1, 19))
    expected = torch.load(straight / "trainable.pt")
    actual = torch.load(interrupted / "trainable.pt")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt", "last.pt"]
