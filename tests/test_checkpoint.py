"""Checkpoints: atomic saves, retention by recency and dev CER, and averaging of merged weights."""

from __future__ import annotations

import errno

import pytest
import torch
from torch import nn

from sparlora import checkpoint as checkpoint_module
from sparlora.adapters import apply_method
from sparlora.checkpoint import (average_checkpoints, epoch_snapshots, epochs_to_keep, load_checkpoint, prune_snapshots,
                                 rank_epochs_by_dev_cer, save_checkpoint, snapshot)
from sparlora.train import frozen_weights_digest


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def lora_model(rank: int = 2, alpha: float = 4.0):
    return apply_method(small_model(), dict(type="lora", rank=rank, alpha=alpha, init="default", target_modules=["0"]))


def write_state(path, model, optimizer, step: int) -> None:
    save_checkpoint(path, model, optimizer, {"step": step}, frozen_weights_digest(model))


def failing_save(real_save, fail_on_call: int):
    """Return a torch.save stand-in that writes half of the bytes and raises ENOSPC on call `fail_on_call`."""
    calls = {"count": 0}

    def save(obj, handle):
        calls["count"] += 1
        if calls["count"] != fail_on_call:
            return real_save(obj, handle)
        handle.write(b"\x00" * 1024)
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters())
    path = tmp_path / "checkpoints" / "last.pt"
    write_state(path, model, optimizer, step=1)
    saved_weight = model[0].weight.detach().clone()

    with torch.no_grad():
        model[0].weight.add_(1.0)
    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save(torch.save, fail_on_call=1))
    with pytest.raises(OSError) as raised:
        write_state(path, model, optimizer, step=2)
    monkeypatch.undo()

    assert raised.value.errno == errno.ENOSPC
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    restored = small_model()
    position = load_checkpoint(path, restored, torch.optim.AdamW(restored.parameters()), frozen_weights_digest(restored))
    assert position == {"step": 1}
    assert torch.equal(restored[0].weight, saved_weight)


def test_snapshot_keeps_old_content(tmp_path):
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters())
    last = tmp_path / "last.pt"
    write_state(last, model, optimizer, step=5)
    snapshot(last, tmp_path / "epoch_1.pt")
    write_state(last, model, optimizer, step=9)

    assert torch.load(tmp_path / "epoch_1.pt", weights_only=False)["position"] == {"step": 5}
    assert torch.load(last, weights_only=False)["position"] == {"step": 9}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1.pt", "last.pt"]


HISTORY = [
    {"epoch": 1, "dev_cer": 0.5, "dev_loss": 3.0},
    {"epoch": 2, "dev_cer": 0.3, "dev_loss": 2.0},
    {"epoch": 3, "dev_cer": 0.4, "dev_loss": 2.5},
    {"epoch": 4, "dev_cer": 0.3, "dev_loss": 1.5},
    {"epoch": 5, "dev_cer": 0.6, "dev_loss": 2.2},
    {"epoch": 6, "dev_cer": 0.7, "dev_loss": 2.1},
]


def test_rank_by_dev_cer_then_loss():
    assert rank_epochs_by_dev_cer(HISTORY) == [4, 2, 3, 1, 5, 6]


def test_rank_tie_prefers_later_epoch():
    history = [{"epoch": 1, "dev_cer": 0.2, "dev_loss": 1.0}, {"epoch": 2, "dev_cer": 0.2, "dev_loss": 1.0},
               {"epoch": 3, "train_loss": 0.1}]
    assert rank_epochs_by_dev_cer(history) == [2, 1]


@pytest.mark.parametrize("keep_last, keep_best, average_best, expected", [
    (2, 2, 0, {5, 6, 4, 2}),
    (1, 0, 0, {6}),
    (1, 1, 3, {6, 4, 2, 3}),
    (0, 0, 0, {1, 2, 3, 4, 5, 6}),
    (3, 1, 0, {4, 5, 6}),
])
def test_epochs_to_keep_table(keep_last, keep_best, average_best, expected):
    assert epochs_to_keep(HISTORY, keep_last, keep_best, average_best) == expected


def test_prune_leaves_exact_files(tmp_path):
    for epoch in range(1, 7):
        (tmp_path / f"epoch_{epoch}.pt").write_bytes(b"x")
    (tmp_path / "last.pt").write_bytes(b"x")
    (tmp_path / "epoch_notes.txt").write_bytes(b"x")

    removed = prune_snapshots(tmp_path, epochs_to_keep(HISTORY, 2, 2, 0))

    assert sorted(p.name for p in removed) == ["epoch_1.pt", "epoch_3.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_2.pt", "epoch_4.pt", "epoch_5.pt", "epoch_6.pt",
                                                          "epoch_notes.txt", "last.pt"]
    assert sorted(epoch_snapshots(tmp_path)) == [2, 4, 5, 6]


def set_factors(model, a: torch.Tensor, b: torch.Tensor) -> None:
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)


def test_average_merges_before_averaging(tmp_path):
    """The average of s·B·A over checkpoints, which differs from s·mean(B)·mean(A)."""
    model = lora_model(rank=2, alpha=4.0)  # scale s = alpha / rank = 2
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    a1 = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    b1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    a2 = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    b2 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    set_factors(model, a1, b1)
    write_state(tmp_path / "epoch_1.pt", model, optimizer, step=1)
    set_factors(model, a2, b2)
    write_state(tmp_path / "epoch_2.pt", model, optimizer, step=2)
    base_weight = model.base_model.model[0].base_layer.weight.detach().clone()

    averaged = average_checkpoints(model, [tmp_path / "epoch_1.pt", tmp_path / "epoch_2.pt"], frozen_weights_digest(model))

    assert sorted(averaged) == ["0.weight"]
    expected_update = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                                    [0.0, 1.0, 1.0, 0.0],
                                    [0.0, 0.0, 0.0, 1.0]])  # s (B1 A1 + B2 A2) / 2
    assert torch.allclose(averaged["0.weight"] - base_weight, expected_update, atol=1e-6)
    product_of_means = 2.0 * ((b1 + b2) / 2) @ ((a1 + a2) / 2)
    assert (product_of_means - expected_update).abs().max() == pytest.approx(0.5)


def test_average_restores_model(tmp_path):
    model = lora_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    set_factors(model, torch.randn(2, 4), torch.randn(3, 2))
    write_state(tmp_path / "epoch_1.pt", model, optimizer, step=1)
    set_factors(model, torch.randn(2, 4), torch.randn(3, 2))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    average_checkpoints(model, [tmp_path / "epoch_1.pt"], frozen_weights_digest(model))

    after = dict(model.named_parameters())
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert model.base_model.model[0].merged is False


def test_average_single_equals_merge(tmp_path):
    model = lora_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    set_factors(model, torch.randn(2, 4), torch.randn(3, 2))
    write_state(tmp_path / "epoch_1.pt", model, optimizer, step=1)
    layer = model.base_model.model[0]
    expected = layer.base_layer.weight + layer.get_delta_weight("default")

    averaged = average_checkpoints(model, [tmp_path / "epoch_1.pt"], frozen_weights_digest(model))

    assert torch.allclose(averaged["0.weight"], expected, atol=1e-6)


def test_average_full_parameters(tmp_path):
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters())
    first = {name: p.detach().clone() for name, p in model.named_parameters()}
    write_state(tmp_path / "epoch_1.pt", model, optimizer, step=1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(2.0)
    write_state(tmp_path / "epoch_2.pt", model, optimizer, step=2)

    averaged = average_checkpoints(model, [tmp_path / "epoch_1.pt", tmp_path / "epoch_2.pt"], frozen_weights_digest(model))

    assert sorted(averaged) == sorted(first)
    for name, value in first.items():
        assert torch.allclose(averaged[name], value + 1.0, atol=1e-6), name


def test_average_rejects_other_base(tmp_path):
    model = lora_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    write_state(tmp_path / "epoch_1.pt", model, optimizer, step=1)
    with torch.no_grad():
        model.base_model.model[2].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="other frozen weights"):
        average_checkpoints(model, [tmp_path / "epoch_1.pt"], frozen_weights_digest(model))
