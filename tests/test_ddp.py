"""Two-process DDP training (gloo on CPU, started by torchrun) against one process.

Tolerance: the per-step loss is within 1e-5 (absolute) of the one-process run with the
same global batches, and the trained parameters, which are of order 0.1, are within
1e-4. The difference is float rounding, because the rank slices are summed in another
order. AdamW divides each coordinate's gradient by its running RMS. Where a gradient is
near zero, rounding noise therefore becomes a step of up to lr, for example in the key
part of an attention's fused q/k/v bias, whose gradient is zero in exact arithmetic. After
10 steps at lr 1e-3 the largest parameter differences measured were 1.6e-5 (SPaRLoRA),
1.1e-8 (AdaLoRA) and 5.0e-5 (full fine-tuning), and the largest loss difference 1.2e-6.

The test model has dropout, the glancing sampler and SpecAugment off, and its CIF
predictor always fires an utterance's last token, a choice that float rounding would
otherwise decide (see `train_helpers.make_deterministic`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train_helpers import read_steps, write_manifest_file, write_tone_corpus

HELPER = Path(__file__).resolve().parent / "train_helpers.py"
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-4


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_training(model_dir: Path, data: dict, out_dir: Path, method: str, processes: int, *extra: str) -> None:
    arguments = [str(HELPER), "--model-dir", str(model_dir), "--train", str(data["train"]), "--dev", str(data["dev"]),
                 "--out-dir", str(out_dir), "--method", method, *extra]
    if processes == 1:
        command = [sys.executable, *arguments]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory):
    """Utterances of different durations whose global batches (max 300 frames) hold 3, 2, 2, 1 and 1 of them.

    The one-utterance batches leave rank 1 an empty slice, and the three-utterance batch
    splits 2 + 1, so rank 1's slice is padded less than in the global batch.
    """
    folder = tmp_path_factory.mktemp("ddp_data")
    seconds = [0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.5, 2.5]
    return {"train": write_manifest_file(folder / "train.jsonl", write_tone_corpus(folder / "wav", seconds)),
            "dev": write_manifest_file(folder / "dev.jsonl", write_tone_corpus(folder / "dev", [0.7, 0.9, 1.1], seed=1, prefix="d"))}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, ddp_data, tmp_path_factory):
    """Trained output folders by (method, processes), each run once per module."""
    cache = {}

    def get(method: str, processes: int) -> Path:
        if (method, processes) not in cache:
            out_dir = tmp_path_factory.mktemp(f"{method}_{processes}")
            run_training(tiny_model_dir, ddp_data, out_dir, method, processes, "--deterministic")
            cache[method, processes] = out_dir
        return cache[method, processes]

    return get


def history(out_dir: Path) -> list[dict]:
    return torch.load(out_dir / "checkpoints" / "last.pt", weights_only=False)["position"]["history"]


def assert_close_weights(expected_dir: Path, actual_dir: Path, tolerance: float) -> None:
    expected = torch.load(expected_dir / "trainable.pt")
    actual = torch.load(actual_dir / "trainable.pt")
    assert expected.keys() == actual.keys()
    for name in expected:
        difference = (expected[name] - actual[name]).abs().max().item()
        assert difference <= tolerance, f"{name}: max abs difference {difference}"


@pytest.mark.parametrize("method", ["sparlora", "adalora", pytest.param("full", marks=pytest.mark.slow)])
def test_two_processes_match_one(runs, method):
    single, double = runs(method, 1), runs(method, 2)

    single_steps, double_steps = read_steps(single), read_steps(double)
    assert [s["step"] for s in double_steps] == list(range(1, 11))
    assert [s["step"] for s in single_steps] == list(range(1, 11))
    assert [s["lr"] for s in double_steps] == [s["lr"] for s in single_steps]
    for single_step, double_step in zip(single_steps, double_steps):
        assert abs(single_step["loss"] - double_step["loss"]) <= LOSS_TOLERANCE, (single_step, double_step)
    assert_close_weights(single, double, WEIGHT_TOLERANCE)

    single_history, double_history = history(single), history(double)
    assert [r["dev_cer"] for r in double_history] == [r["dev_cer"] for r in single_history]
    for single_record, double_record in zip(single_history, double_history):
        assert double_record["dev_loss"] == pytest.approx(single_record["dev_loss"], abs=LOSS_TOLERANCE)
        assert double_record["train_loss"] == pytest.approx(single_record["train_loss"], abs=LOSS_TOLERANCE)


def test_only_rank_zero_writes(runs):
    out_dir = runs("sparlora", 2)
    log = (out_dir / "train.log").read_text(encoding="utf-8")
    assert log.count("epoch 1 done") == 1
    assert len(list((out_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (out_dir / "checkpoints").iterdir()) == ["epoch_1.pt", "epoch_2.pt", "last.pt"]
    assert len(torch.load(out_dir / "checkpoints" / "last.pt", weights_only=False)["rng"]) == 2


def test_resume_under_ddp(tiny_model_dir, ddp_data, tmp_path):
    # Dropout, the glancing sampler and SpecAugment are on, so each rank must get its own RNG state back.
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_training(tiny_model_dir, ddp_data, straight, "sparlora", 2, "--specaug")
    run_training(tiny_model_dir, ddp_data, resumed, "sparlora", 2, "--specaug", "--max-steps", "7")
    stopped_at = torch.load(resumed / "checkpoints" / "last.pt", weights_only=False)["position"]
    assert (stopped_at["step"], stopped_at["epoch"], stopped_at["batches_done"]) == (7, 2, 2)

    run_training(tiny_model_dir, ddp_data, resumed, "sparlora", 2, "--specaug")

    assert [s["step"] for s in read_steps(resumed)] == list(range(1, 11))
    assert [s["loss"] for s in read_steps(resumed)] == [s["loss"] for s in read_steps(straight)]
    assert_close_weights(straight, resumed, 0.0)
