"""Stage 3 (`sparlora.train.main`) with every method config on tiny data: dev CER per epoch, checkpoint averaging."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sparlora.train import main as train_main
from train_helpers import write_manifest_file, write_tone_corpus

ROOT = Path(__file__).resolve().parents[1]
METHODS = sorted(path.stem for path in (ROOT / "conf" / "method").glob("*.yaml"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("method_data")
    write_manifest_file(folder / "train" / "data.jsonl", write_tone_corpus(folder / "wav", [0.6, 0.7, 0.8, 0.9, 1.0, 1.2]))
    write_manifest_file(folder / "dev" / "data.jsonl", write_tone_corpus(folder / "dev_wav", [0.7, 1.0], seed=1, prefix="d"))
    return folder


def run_stage3(model_dir: Path, data_dir: Path, exp_root: Path, method: str, *overrides: str) -> Path:
    """Run stage 3 on conf/demo.yaml with the tiny model and data, and return the experiment folder."""
    arguments = ["--config", str(ROOT / "conf" / "demo.yaml"), f"method={method}", f"data_dir={data_dir}", f"exp_root={exp_root}",
                 f"model.dir={model_dir}", f"model.name_or_path={model_dir}", "train.epochs=2", "train.warmup_steps=1",
                 "train.max_frames_per_batch=250", "train.num_threads=1", "train.device=cpu", "train.log_interval=1",
                 "train.keep_last=1", "train.keep_best=1", "train.average_best=2", *overrides]
    assert train_main(arguments) == 0
    exp_dirs = [path for path in exp_root.iterdir() if path.is_dir()]
    assert len(exp_dirs) == 1
    return exp_dirs[0]


def merged_checkpoint(model_dir: Path, exp_dir: Path, checkpoint: Path) -> dict[str, torch.Tensor]:
    """Return the merged state dict of a checkpoint, built the way PEFT users would: fresh model, load, merge_and_unload."""
    from peft import PeftModel

    from sparlora.adapters import apply_method
    from sparlora.checkpoint import load_trainable
    from sparlora.model import load_paraformer
    from sparlora.train import frozen_weights_digest, seed_everything

    cfg = OmegaConf.load(exp_dir / "config.yaml")
    seed_everything(cfg.train.seed)  # randomized inits (pissa_niter_K) draw the same numbers as in training
    # The thread count changes the rounding of OLoRA's QR, so it must be training's.
    model, _ = load_paraformer(model_dir, num_threads=cfg.train.num_threads)
    model = apply_method(model, OmegaConf.to_container(cfg.method, resolve=True), total_steps=6)
    state = torch.load(checkpoint, weights_only=False)
    assert frozen_weights_digest(model) == state["frozen_digest"]
    load_trainable(model, state["model"], checkpoint)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_and_averages(tiny_model_dir, data_dir, tmp_path, method):
    exp_dir = run_stage3(tiny_model_dir, data_dir, tmp_path, method)

    history = torch.load(exp_dir / "checkpoints" / "last.pt", weights_only=False)["position"]["history"]
    assert [record["epoch"] for record in history] == [1, 2]
    log = (exp_dir / "train.log").read_text(encoding="utf-8")
    for record in history:
        assert isinstance(record["dev_cer"], float) and record["dev_cer"] >= 0.0
        assert re.search(rf"epoch {record['epoch']} done: .*dev_cer {record['dev_cer']:.4f}", log)

    summary = json.loads((exp_dir / "final_model" / "averaged_checkpoints.json").read_text(encoding="utf-8"))
    assert sorted(entry["epoch"] for entry in summary["checkpoints"]) == [1, 2]
    assert "final_model is the average of epochs" in log
    snapshots = exp_dir / "checkpoints"
    assert sorted(p.name for p in snapshots.iterdir()) == ["epoch_1.pt", "epoch_2.pt", "last.pt"]

    first = merged_checkpoint(tiny_model_dir, exp_dir, snapshots / "epoch_1.pt")
    second = merged_checkpoint(tiny_model_dir, exp_dir, snapshots / "epoch_2.pt")
    final = torch.load(exp_dir / "final_model" / "model.pt")
    last = torch.load(exp_dir / "last_model" / "model.pt")
    assert final.keys() == first.keys() == last.keys()
    changed = [key for key in first if not torch.equal(first[key], second[key])]
    assert changed, "training changed no merged weight"
    for key in first:
        assert torch.allclose(last[key].float(), second[key].float(), atol=1e-6), key
        if first[key].is_floating_point():
            assert torch.allclose(final[key], (first[key] + second[key]) / 2, atol=1e-6), key
        else:
            assert torch.equal(final[key], second[key]), key


def test_snapshots_kept_by_recency_and_cer(tiny_model_dir, data_dir, tmp_path):
    exp_dir = run_stage3(tiny_model_dir, data_dir, tmp_path, "sparlora", "train.epochs=4", "train.average_best=2",
                         "train.keep_best=1", "train.keep_last=1")

    history = torch.load(exp_dir / "checkpoints" / "last.pt", weights_only=False)["position"]["history"]
    summary = json.loads((exp_dir / "final_model" / "averaged_checkpoints.json").read_text(encoding="utf-8"))
    averaged = [entry["epoch"] for entry in summary["checkpoints"]]
    assert len(averaged) == 2
    cer = {record["epoch"]: record["dev_cer"] for record in history}
    assert max(cer[epoch] for epoch in averaged) <= min(cer[epoch] for epoch in cer if epoch not in averaged)
    expected_epochs = sorted({4, *averaged})  # the last epoch and the two best
    assert sorted(p.name for p in (exp_dir / "checkpoints").iterdir()) == [f"epoch_{epoch}.pt" for epoch in expected_epochs] + ["last.pt"]


def test_no_averaging_writes_last_only(tiny_model_dir, data_dir, tmp_path):
    exp_dir = run_stage3(tiny_model_dir, data_dir, tmp_path, "lora", "train.average_best=0", "train.keep_last=1", "train.keep_best=0")

    assert (exp_dir / "final_model" / "model.pt").is_file()
    assert not (exp_dir / "last_model").exists()
    assert not (exp_dir / "final_model" / "averaged_checkpoints.json").exists()
    assert sorted(p.name for p in (exp_dir / "checkpoints").iterdir()) == ["epoch_2.pt", "last.pt"]
