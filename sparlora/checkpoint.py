"""Training checkpoints: atomic writes, retention by recency and dev CER, and averaging.

Layout under `<exp_dir>/checkpoints/`:

- `last.pt`: the resume state (trainable parameters, optimizer, position, RNG states of
  every rank, AdaLoRA allocator, fp16 loss scaler), rewritten at every checkpoint.
- `epoch_<N>.pt`: a snapshot of `last.pt` taken at the end of epoch N (a hard link
  where the file system allows it, else a copy).

Every file is written to `<name>.tmp`, fsynced and renamed over the old one, so a crash
or a full disk during a save leaves the previous file intact.

Averaging follows the ESPnet/WeNet convention: the best K epoch snapshots by dev score
are averaged. For adapters the average is taken over each checkpoint's merged weight
(the frozen weight plus the adapter update, as PEFT merges it). The factors A and B are
never averaged separately, because the mean of the products B·A is not the product of
the means.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

LAST_NAME = "last.pt"
EPOCH_NAME = re.compile(r"^epoch_(\d+)\.pt$")


def epoch_checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch}.pt"


def fsync_directory(directory: Path) -> None:
    """Flush a directory's entries (a rename) to disk. Does nothing outside POSIX systems."""
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_torch_save(obj, path: Path) -> None:
    """Write `obj` with torch.save to `path` through `<path>.tmp`, fsync and rename.

    When the write fails (for example with ENOSPC), the temporary file is removed, the
    error is raised again and `path` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def snapshot(source: Path, target: Path) -> None:
    """Make `target` a snapshot of `source`, atomically: a hard link, or a copy where links fail.

    `source` is only ever replaced by a rename, never rewritten in place, so a hard
    link keeps the content `source` had when the snapshot was taken.
    """
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        # This file system has no hard links (EPERM, EXDEV, ENOTSUP), so copy instead.
        try:
            with source.open("rb") as reader, tmp.open("wb") as writer:
                while chunk := reader.read(1 << 24):
                    writer.write(chunk)
                writer.flush()
                os.fsync(writer.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, target)
    fsync_directory(target.parent)


def remove_temporaries(directory: Path) -> list[Path]:
    """Delete the `*.tmp` files that a killed save left behind, and return their paths."""
    removed = sorted(Path(directory).glob("*.tmp")) if Path(directory).is_dir() else []
    for path in removed:
        path.unlink(missing_ok=True)
        logger.warning("removed %s, left by an interrupted checkpoint save", path)
    return removed


def rng_state(device: str = "cpu") -> dict:
    """Return the Python, NumPy and torch RNG states (and the CUDA one when training on CUDA)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if str(device).startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def set_rng_state(state: dict, device: str = "cpu") -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and str(device).startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Return CPU copies of the parameters that require gradients, by name."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, values: dict[str, torch.Tensor], source) -> None:
    """Copy saved trainable parameters into `model`. Raise RuntimeError when a name is unknown or missing."""
    parameters = dict(model.named_parameters())
    unknown = [name for name in values if name not in parameters]
    if unknown:
        raise RuntimeError(f"{source} has parameters this model lacks, e.g. {unknown[0]}. Was the method changed?")
    missing = [name for name, p in parameters.items() if p.requires_grad and name not in values]
    if missing:
        raise RuntimeError(f"{source} is missing trainable parameters of this model, e.g. {missing[0]}. Was the method changed?")
    with torch.no_grad():
        for name, value in values.items():
            parameters[name].copy_(value)


def save_checkpoint(path: Path, model, optimizer, position: dict, frozen_digest: str, hooks=None,
                    rng_states: Sequence[dict] | None = None, scaler=None) -> None:
    """Write the trainable parameters, optimizer, position and RNG states, atomically.

    `position` contains `step`, `epoch`, `batches_done` (batches of that epoch already
    trained), the epoch's running loss sums and the per-epoch history, so a resumed run
    continues with the next batch of the same shuffled order. `rng_states` has one entry
    per rank (default: this process's states). The method hooks' state (AdaLoRA's
    importance scores and rank pattern) and the fp16 loss scaler's state are saved too.
    """
    state = {"model": trainable_state(model), "optimizer": optimizer.state_dict(), "position": position,
             "rng": list(rng_states) if rng_states is not None else [rng_state()],
             "frozen_digest": frozen_digest,
             "hooks": hooks.state_dict(model) if hooks is not None else None,
             "scaler": scaler.state_dict() if scaler is not None else None}
    atomic_torch_save(state, path)


def load_checkpoint(path: Path, model, optimizer, frozen_digest: str, hooks=None, rank: int = 0,
                    world_size: int = 1, scaler=None, device: str = "cpu") -> dict:
    """Restore a checkpoint written by `save_checkpoint` into this rank, and return its position.

    A checkpoint written with another number of processes restores rank 0's RNG states
    on every rank, so the continuation is valid but not identical to an uninterrupted run.
    """
    state = torch.load(path, map_location="cpu", weights_only=False)
    # NOTE: OLoRA's QR rounds differently with another torch thread count, so resuming an
    # OLoRA run with a different train.num_threads fails this check.
    if state["frozen_digest"] != frozen_digest:
        raise RuntimeError(
            f"{path} was trained on other frozen weights than this run has (different base model or "
            "method init); delete the checkpoint folder to start over, or restore the original config"
        )
    load_trainable(model, state["model"], path)
    optimizer.load_state_dict(state["optimizer"])
    if hooks is not None and state.get("hooks") is not None:
        hooks.load_state_dict(model, state["hooks"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])

    rng = state["rng"]
    if isinstance(rng, dict):  # written before checkpoints kept one state per rank
        rng = [rng]
    if len(rng) != world_size:
        logger.warning("%s was written by %d processes and this run has %d, so every rank restores rank 0's RNG state",
                       path, len(rng), world_size)
        set_rng_state(rng[0], device)
    else:
        set_rng_state(rng[rank], device)
    return state["position"]


def frozen_weights_digest(model) -> str:
    """Return a sha256 of the frozen parameters, to check that a resumed run has the same base."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def rank_epochs_by_dev_cer(history: Iterable[dict]) -> list[int]:
    """Return the epochs that have a dev CER, best first.

    Ties in dev CER go to the lower dev loss, then to the later epoch.
    """
    scored = [record for record in history if record.get("dev_cer") is not None]
    ordered = sorted(scored, key=lambda r: (r["dev_cer"], r.get("dev_loss", math.inf), -r["epoch"]))
    return [record["epoch"] for record in ordered]


def epochs_to_keep(history: Sequence[dict], keep_last: int, keep_best: int, average_best: int) -> set[int]:
    """Return the epochs whose snapshots are kept, the last `keep_last` and the best by dev CER.

    `keep_last` 0 keeps every epoch. The best max(keep_best, average_best) epochs are
    kept, so the snapshots that averaging reads are never deleted.
    """
    epochs = [record["epoch"] for record in history]
    if keep_last == 0:
        return set(epochs)
    keep = set(epochs[-keep_last:])
    keep.update(rank_epochs_by_dev_cer(history)[: max(keep_best, average_best)])
    return keep


def epoch_snapshots(directory: Path) -> dict[int, Path]:
    """Return the `epoch_<N>.pt` files of a checkpoint folder, by epoch."""
    found = {}
    for path in Path(directory).glob("epoch_*.pt"):
        match = EPOCH_NAME.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def prune_snapshots(directory: Path, keep: set[int]) -> list[Path]:
    """Delete the epoch snapshots whose epoch is not in `keep`, and return the deleted paths."""
    removed = []
    for epoch, path in sorted(epoch_snapshots(directory).items()):
        if epoch not in keep:
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        logger.info("deleted epoch checkpoints %s (kept epochs %s)", ", ".join(p.name for p in removed), sorted(keep))
    return removed


def merged_weight_key(layer_name: str) -> str:
    """Return the merged model's state-dict key of the weight of PEFT layer `layer_name`.

    `PeftModel` names its layers `base_model.model.<name>`, and after `merge_and_unload`
    the weight is `<name>.weight`.
    """
    prefix = "base_model.model."
    if not layer_name.startswith(prefix):
        raise ValueError(f"unexpected PEFT layer name {layer_name!r}: expected the prefix {prefix!r}")
    return layer_name[len(prefix):] + ".weight"


def _load_for_average(path: Path, frozen_digest: str) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=False)
    # NOTE: OLoRA's QR rounds differently with another torch thread count, so resuming an
    # OLoRA run with a different train.num_threads fails this check.
    if state["frozen_digest"] != frozen_digest:
        raise RuntimeError(f"{path} was trained on other frozen weights than this model has, so it cannot be averaged with it")
    return state["model"]


@torch.no_grad()
def average_merged_adapters(model, paths: Sequence[Path], frozen_digest: str, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Return the mean over checkpoints of each adapted layer's merged weight, by merged-model key.

    Each checkpoint's adapters are loaded and merged with PEFT's own `merge_adapter`
    (s·B·A for LoRA, DoRA's magnitude rescaling, AdaLoRA's B·E·A), and the merged
    weights are summed in float64. The frozen weights are then restored exactly from a
    copy, because `unmerge_adapter` alone leaves rounding errors. The model's trainable
    parameters are restored on return. Layers without an adapter are frozen and
    identical in every checkpoint, so they are not returned.
    """
    from sparlora.adapters import lora_layers

    layers = [(merged_weight_key(name), layer.get_base_layer()) for name, layer in lora_layers(model, adapter_name)]
    if not layers:
        raise ValueError(f"no adapter layer carries adapter {adapter_name!r}")
    originals = {key: base.weight.detach().clone() for key, base in layers}
    current = trainable_state(model)
    sums = {key: torch.zeros(base.weight.shape, dtype=torch.float64) for key, base in layers}
    try:
        for path in paths:
            load_trainable(model, _load_for_average(path, frozen_digest), path)
            model.merge_adapter()
            try:
                for key, base in layers:
                    sums[key] += base.weight.detach().double().cpu()
            finally:
                model.unmerge_adapter()
                for key, base in layers:
                    base.weight.copy_(originals[key])
    finally:
        load_trainable(model, current, "the model's own weights")
    return {key: (total / len(paths)).to(originals[key].dtype) for key, total in sums.items()}


@torch.no_grad()
def average_parameters(model, paths: Sequence[Path], frozen_digest: str) -> dict[str, torch.Tensor]:
    """Return the mean over checkpoints of every trainable parameter (full fine-tuning), by name."""
    dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    sums: dict[str, torch.Tensor] = {}
    for path in paths:
        values = _load_for_average(path, frozen_digest)
        if set(values) != set(dtypes):
            raise RuntimeError(f"{path} contains other trainable parameters than this model has. Was the method changed?")
        for name, value in values.items():
            sums[name] = sums.get(name, 0) + value.double()
    return {name: (total / len(paths)).to(dtypes[name]) for name, total in sums.items()}


def average_checkpoints(model, paths: Sequence[Path], frozen_digest: str) -> dict[str, torch.Tensor]:
    """Return averaged weights keyed like `merged_state_dict(model)`, to override its entries.

    A PEFT model (LoRA family, AdaLoRA) gets the mean of the merged weights of its
    adapted layers. A plain model (full fine-tuning) gets the mean of its parameters.
    """
    from peft import PeftModel

    if not paths:
        raise ValueError("no checkpoint to average")
    if isinstance(model, PeftModel):
        return average_merged_adapters(model, paths, frozen_digest)
    return average_parameters(model, paths, frozen_digest)


def select_average_epochs(history: list[dict], checkpoint_dir: Path, count: int) -> list[tuple[int, Path]]:
    """Return (epoch, snapshot path) of the `count` best epochs by dev CER whose snapshot exists."""
    available = epoch_snapshots(checkpoint_dir)
    ranked = rank_epochs_by_dev_cer(history)
    missing = [epoch for epoch in ranked[:count] if epoch not in available]
    if missing:
        logger.warning("the checkpoints of epochs %s (among the best %d by dev CER) are missing in %s, so the best that exist are averaged",
                       missing, count, checkpoint_dir)
    return [(epoch, available[epoch]) for epoch in ranked if epoch in available][:count]


def write_final_models(model, history: list[dict], average_best: int, model_dir: Path, exp_dir: Path) -> Path:
    """Write `<exp_dir>/final_model`, the model that stage 4 decodes, and return its path.

    With `average_best` = K > 0 it is the average of the best K epoch checkpoints by
    dev CER (merged weights for adapters), and the last weights go to
    `<exp_dir>/last_model`. `final_model/averaged_checkpoints.json` then lists the
    averaged epochs. With K = 0, final_model contains the last weights. Merging unloads
    the adapters, so `model` must not be trained further.
    """
    from sparlora.adapters import merged_state_dict
    from sparlora.model import save_model_dir

    final_dir, last_dir = exp_dir / "final_model", exp_dir / "last_model"
    chosen = select_average_epochs(history, exp_dir / "checkpoints", average_best) if average_best > 0 else []
    if average_best > 0 and not chosen:
        logger.warning("train.average_best=%d, but no epoch checkpoint with a dev CER exists, so final_model contains the last weights",
                       average_best)
    averaged = average_checkpoints(model, [path for _, path in chosen], frozen_weights_digest(model)) if chosen else None

    state = merged_state_dict(model)
    (final_dir / "averaged_checkpoints.json").unlink(missing_ok=True)
    if averaged is None:
        if last_dir.exists():
            shutil.rmtree(last_dir)
            logger.info("removed %s of an earlier run, because final_model now contains the last weights", last_dir)
        return save_model_dir(state, model_dir, final_dir)

    save_model_dir(state, model_dir, last_dir)
    unknown = sorted(set(averaged) - set(state))
    if unknown:
        raise RuntimeError(f"averaged weight {unknown[0]} is not in the merged model's state dict")
    state = {**state, **averaged}
    scores = {record["epoch"]: record for record in history}
    summary = {"average_best": average_best,
               "checkpoints": [{"epoch": epoch, "file": str(path), "dev_cer": scores[epoch]["dev_cer"],
                                "dev_loss": scores[epoch].get("dev_loss")} for epoch, path in chosen]}
    save_model_dir(state, model_dir, final_dir, extra_files={"averaged_checkpoints.json": json.dumps(summary, indent=2) + "\n"})
    logger.info("final_model is the average of epochs %s (dev CER %s), and the last weights are in %s",
                [epoch for epoch, _ in chosen], ", ".join(f"{100 * scores[e]['dev_cer']:.2f}%" for e, _ in chosen), last_dir)
    return final_dir
