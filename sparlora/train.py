"""Stage 3: fine-tune the pretrained Paraformer with the configured method.

The loop: AdamW over the trainable parameters, a learning rate with linear warmup
then cosine decay (`warmup_cosine_lr`), gradient clipping, gradient accumulation,
dev loss and dev CER after each epoch, tensorboard scalars and a plain-text log in
the experiment folder. A checkpoint of the trainable state is written after each
epoch through a temporary file and a rename. At the end the adapters are merged into
the weights and the result is written as a FunASR model directory,
`<exp_dir>/final_model`, which stage 4 decodes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from sparlora.data import AsrDataset, DurationBatchSampler, collate, read_manifest

logger = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    """Optimization settings; the `train:` section of the recipe config."""

    epochs: int = 4
    lr_max: float = 1e-3
    lr_min: float = 1e-5
    warmup_steps: int = 30  # optimizer steps
    weight_decay: float = 0.01
    grad_clip: float = 5.0  # max gradient L2 norm; 0 disables clipping
    accum_grad: int = 1  # batches per optimizer step
    max_frames_per_batch: int = 6000  # padded 10 ms fbank frames per batch
    seed: int = 1234
    log_interval: int = 10  # optimizer steps
    max_minutes: float = 0.0  # stop after this much training time, counted across resumptions; 0: no limit
    max_steps: int = 0  # stop after this many optimizer steps in all (a checkpoint is written); 0: no limit
    checkpoint_interval: int = 0  # optimizer steps between mid-epoch checkpoints; 0: only at epoch ends
    resume: bool = True  # go on from <exp_dir>/checkpoints/last.pt when it exists

    def __post_init__(self):
        for name in ("epochs", "accum_grad", "max_frames_per_batch", "log_interval"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"invalid train.{name} {getattr(self, name)!r}: must be a positive integer")
        for name in ("warmup_steps", "max_steps", "checkpoint_interval"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"invalid train.{name} {getattr(self, name)!r}: must be 0 or more")
        if not 0 <= self.lr_min <= self.lr_max:
            raise ValueError(f"invalid learning rates: need 0 <= train.lr_min ({self.lr_min}) <= train.lr_max ({self.lr_max})")

    @classmethod
    def from_config(cls, section) -> "TrainOptions":
        known = {name: section[name] for name in cls.__dataclass_fields__ if name in section}
        return cls(**known)


# Settings that may change between a run and its resumption without changing what is
# trained: time and step limits, checkpoint spacing, logging, threads and device.
RESUMABLE_CHANGES = {"max_minutes", "max_steps", "checkpoint_interval", "resume", "log_interval",
                     "num_threads", "num_workers", "device"}


def run_signature(cfg) -> dict:
    """Return the settings a checkpoint was trained with, less those a resumed run may change."""
    train = {key: value for key, value in OmegaConf.to_container(cfg.train, resolve=True).items() if key not in RESUMABLE_CHANGES}
    return {
        "method": OmegaConf.to_container(cfg.method, resolve=True),
        "train": train,
        "model": str(cfg.model.name_or_path),
        "train_split": str(cfg.corpus.train_split),
        "data_dir": str(cfg.data_dir),
    }


def flatten(mapping: dict, prefix: str = "") -> dict:
    """Return a nested mapping as {dotted.key: value}."""
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def check_resumable(exp_dir: Path, signature: dict, resume: bool) -> None:
    """Raise when `exp_dir` has a checkpoint trained with other settings than `signature`."""
    saved_path = exp_dir / "train_signature.json"
    if not (resume and (exp_dir / "checkpoints" / "last.pt").is_file() and saved_path.is_file()):
        return
    saved = json.loads(saved_path.read_text(encoding="utf-8"))
    saved_flat, new_flat = flatten(saved), flatten(signature)
    changed = sorted(key for key in set(saved_flat) | set(new_flat) if saved_flat.get(key) != new_flat.get(key))
    if not changed:
        return
    raise RuntimeError(
        f"{exp_dir} contains a checkpoint trained with other settings ({', '.join(changed)}). "
        "Give this run another tag (tag=...), or pass train.resume=false to train again from the start."
    )


def warmup_cosine_lr(step: int, total_steps: int, warmup_steps: int, lr_max: float, lr_min: float) -> float:
    """Return the learning rate of optimizer step `step` (1-based).

    Steps 1..warmup_steps rise linearly to lr_max. After that the rate follows
    lr_min + (lr_max - lr_min) * (1 + cos(pi * t)) / 2, where t goes from 0 to 1 at
    `total_steps`, and it stays at lr_min beyond that.
    """
    if warmup_steps > 0 and step <= warmup_steps:
        return lr_max * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return lr_min + 0.5 * (lr_max - lr_min) * (1.0 + math.cos(math.pi * progress))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, so data order, dropout and initialization repeat."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def dataset_loss(model, dataset: AsrDataset, max_frames: int, device: str) -> float:
    """Return the mean Paraformer loss over `dataset`, in eval mode and without gradients."""
    was_training = model.training
    model.eval()
    sampler = DurationBatchSampler([e.source_len for e in dataset.entries], max_frames, seed=0, shuffle=False)
    total, weight = 0.0, 0.0
    with torch.no_grad():
        for indices in sampler:
            batch = collate([dataset[i] for i in indices])
            loss, _, batch_weight = forward_loss(model, batch, device)
            total += float(loss) * float(batch_weight)
            weight += float(batch_weight)
    model.train(was_training)
    return total / max(weight, 1e-9)


def forward_loss(model, batch: dict, device: str):
    """Run the Paraformer forward on a collated batch; return (loss, stats, weight)."""
    return model(
        speech=batch["speech"].to(device),
        speech_lengths=batch["speech_lengths"].to(device),
        text=batch["text"].to(device),
        text_lengths=batch["text_lengths"].to(device),
    )


def dev_cer(model, dataset: AsrDataset, tokenizer, frontend, device: str) -> float:
    """Return the CER of greedy Paraformer decoding on `dataset`, as a fraction."""
    from sparlora.decode import decode_dataset
    from sparlora.score import cer_counts
    from sparlora.text import TextNormConfig

    hyps = decode_dataset(model, dataset, tokenizer, frontend, batch_size=32, device=device, progress=False)
    refs = {entry.key: entry.target for entry in dataset.entries}
    return cer_counts(refs, hyps, TextNormConfig()).cer


def frozen_weights_digest(model) -> str:
    """Return a sha256 of the frozen parameters, to check that a resumed run has the same base."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(path: Path, model, optimizer, position: dict, frozen_digest: str, hooks=None) -> None:
    """Write the trainable parameters, optimizer, position and RNG states, atomically.

    `position` contains `step`, `epoch`, `batches_done` (batches of that epoch already
    trained), the epoch's running loss sums and the per-epoch history, so a resumed run
    continues with the next batch of the same shuffled order.
    The method hooks' state (AdaLoRA's importance scores and rank pattern) is saved too.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    trainable = {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}
    state = {"model": trainable, "optimizer": optimizer.state_dict(), "position": position,
             "rng": rng_state(), "frozen_digest": frozen_digest,
             "hooks": hooks.state_dict(model) if hooks is not None else None}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model, optimizer, frozen_digest: str, hooks=None) -> dict:
    """Restore a checkpoint written by `save_checkpoint`; return its position."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["frozen_digest"] != frozen_digest:
        raise RuntimeError(
            f"{path} was trained on other frozen weights than this run has (different base model or "
            "method init); delete the checkpoint folder to start over, or restore the original config"
        )
    parameters = dict(model.named_parameters())
    missing = [name for name in state["model"] if name not in parameters]
    if missing:
        raise RuntimeError(f"{path} has parameters this model lacks, e.g. {missing[0]}; was the method changed?")
    with torch.no_grad():
        for name, value in state["model"].items():
            parameters[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    if hooks is not None and state.get("hooks") is not None:
        hooks.load_state_dict(model, state["hooks"])
    set_rng_state(state["rng"])
    return state["position"]


def count_optimizer_steps(train_set: AsrDataset, opts: TrainOptions) -> int:
    """Return the number of optimizer steps of a full run (epochs x batches / accumulation)."""
    sampler = DurationBatchSampler([e.source_len for e in train_set.entries], opts.max_frames_per_batch, opts.seed)
    return math.ceil(len(sampler) / opts.accum_grad) * opts.epochs


def train_model(model, train_set: AsrDataset, dev_set: AsrDataset | None, opts: TrainOptions, out_dir: Path,
                tokenizer, frontend, device: str = "cpu", on_step=None) -> list[dict]:
    """Train the parameters of `model` that require gradients; return one record per epoch.

    With `opts.resume` and an existing `<out_dir>/checkpoints/last.pt`, training goes on
    from there. `on_step(step, loss, lr)` is called after every optimizer step.
    """
    from torch.utils.tensorboard import SummaryWriter

    from sparlora.adapters import training_hooks

    hooks = training_hooks(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_handler = logging.FileHandler(out_dir / "train.log", encoding="utf-8")
    log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
    logging.getLogger().addHandler(log_handler)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; check method.target_modules")
    optimizer = torch.optim.AdamW(params, lr=opts.lr_max, weight_decay=opts.weight_decay)
    sampler = DurationBatchSampler([e.source_len for e in train_set.entries], opts.max_frames_per_batch, opts.seed)
    steps_per_epoch = math.ceil(len(sampler) / opts.accum_grad)
    total_steps = steps_per_epoch * opts.epochs
    logger.info("training %d utterances in %d batches per epoch, %d epochs, %d optimizer steps",
                len(train_set), len(sampler), opts.epochs, total_steps)

    last_path = out_dir / "checkpoints" / "last.pt"
    frozen_digest = frozen_weights_digest(model)
    position = {"step": 0, "epoch": 1, "batches_done": 0, "epoch_loss": 0.0, "epoch_weight": 0.0, "skipped": 0, "history": []}
    if opts.resume and last_path.is_file():
        position = load_checkpoint(last_path, model, optimizer, frozen_digest, hooks)
        logger.info("resumed from %s at epoch %d, step %d", last_path, position["epoch"], position["step"])
    writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=position["step"] + 1 if position["step"] else None)

    history = position["history"]
    step = position["step"]
    # Training minutes count across resumptions: the clock starts where the checkpoint left it.
    started = time.perf_counter() - 60 * position.get("minutes", 0.0)
    stop_reason = ""
    for epoch in range(position["epoch"], opts.epochs + 1):
        model.train()
        sampler.set_epoch(epoch)
        batches = list(sampler)
        resuming = epoch == position["epoch"]
        first_batch = position["batches_done"] + 1 if resuming else 1
        epoch_loss = position["epoch_loss"] if resuming else 0.0
        epoch_weight = position["epoch_weight"] if resuming else 0.0
        skipped = position["skipped"] if resuming else 0
        bar = tqdm(total=len(batches), initial=first_batch - 1, desc=f"epoch {epoch}/{opts.epochs}", leave=False, dynamic_ncols=True)
        for batch_number in range(first_batch, len(batches) + 1):
            if opts.max_steps > 0 and step >= opts.max_steps:
                stop_reason = f"train.max_steps={opts.max_steps} reached"
            elif opts.max_minutes > 0 and time.perf_counter() - started > opts.max_minutes * 60:
                stop_reason = f"train.max_minutes={opts.max_minutes} reached"
            if stop_reason:
                batch_number -= 1
                break
            batch_start = time.perf_counter()
            batch = collate([train_set[i] for i in batches[batch_number - 1]])
            loss, _, weight = forward_loss(model, batch, device)
            regularization = hooks.regularization(model) if hooks is not None else None
            if regularization is not None:
                loss = loss + regularization
            bar.update(1)
            if not torch.isfinite(loss):
                skipped += 1
                logger.warning("non-finite loss at epoch %d batch %d (%s); update skipped", epoch, batch_number, batch["keys"][0])
                optimizer.zero_grad(set_to_none=True)
                continue
            (loss / opts.accum_grad).backward()
            loss_value = loss.item()
            epoch_loss += loss_value * float(weight)
            epoch_weight += float(weight)
            if batch_number % opts.accum_grad and batch_number != len(batches):
                continue

            step += 1
            lr = warmup_cosine_lr(step, total_steps, opts.warmup_steps, opts.lr_max, opts.lr_min)
            for group in optimizer.param_groups:
                group["lr"] = lr
            grad_norm = torch.nn.utils.clip_grad_norm_(params, opts.grad_clip if opts.grad_clip > 0 else float("inf"))
            optimizer.step()
            if hooks is not None:
                hooks.after_step(model, step)
            optimizer.zero_grad(set_to_none=True)
            if on_step is not None:
                on_step(step, loss_value, lr)

            step_seconds = time.perf_counter() - batch_start
            frames = int(batch["speech_lengths"].sum())
            writer.add_scalar("train/loss", loss_value, step)
            writer.add_scalar("train/lr", lr, step)
            writer.add_scalar("train/grad_norm", float(grad_norm), step)
            writer.add_scalar("train/step_seconds", step_seconds, step)
            writer.add_scalar("train/frames_per_second", frames / max(step_seconds, 1e-9), step)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}")
            if step % opts.log_interval == 0:
                logger.info("epoch %d step %d/%d loss %.4f lr %.3e grad_norm %.3f", epoch, step, total_steps, loss_value, lr, float(grad_norm))

            if opts.max_minutes > 0 and time.perf_counter() - started > opts.max_minutes * 60:
                stop_reason = f"train.max_minutes={opts.max_minutes} reached"
            if opts.max_steps > 0 and step >= opts.max_steps:
                stop_reason = f"train.max_steps={opts.max_steps} reached"
            interval_due = opts.checkpoint_interval > 0 and step % opts.checkpoint_interval == 0
            if (interval_due or stop_reason) and batch_number < len(batches):
                save_checkpoint(last_path, model, optimizer, {
                    "step": step, "epoch": epoch, "batches_done": batch_number, "epoch_loss": epoch_loss,
                    "epoch_weight": epoch_weight, "skipped": skipped, "history": history,
                    "minutes": (time.perf_counter() - started) / 60}, frozen_digest, hooks)
            if stop_reason:
                break
        bar.close()
        if stop_reason and batch_number < len(batches):
            logger.info("stopping in epoch %d at step %d: %s; rerun with a higher limit to go on", epoch, step, stop_reason)
            break

        record = {"epoch": epoch, "step": step, "train_loss": epoch_loss / max(epoch_weight, 1e-9),
                  "skipped_batches": skipped, "minutes": (time.perf_counter() - started) / 60}
        if dev_set is not None:
            record["dev_loss"] = dataset_loss(model, dev_set, opts.max_frames_per_batch, device)
            record["dev_cer"] = dev_cer(model, dev_set, tokenizer, frontend, device)
            writer.add_scalar("dev/loss", record["dev_loss"], epoch)
            writer.add_scalar("dev/cer", record["dev_cer"], epoch)
        history.append(record)
        logger.info("epoch %d done: %s", epoch, ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        end_position = {"step": step, "epoch": epoch + 1, "batches_done": 0, "epoch_loss": 0.0,
                        "epoch_weight": 0.0, "skipped": 0, "history": history,
                        "minutes": (time.perf_counter() - started) / 60}
        save_checkpoint(last_path, model, optimizer, end_position, frozen_digest, hooks)
        shutil.copyfile(last_path, out_dir / "checkpoints" / f"epoch_{epoch}.pt")
        if stop_reason:
            logger.info("stopping after epoch %d: %s", epoch, stop_reason)
            break

    writer.close()
    logging.getLogger().removeHandler(log_handler)
    log_handler.close()
    return history


def main(argv=None) -> int:
    from peft import PeftModel

    from sparlora.adapters import apply_method, changes_base_weights, merged_state_dict, save_adapter_for_original_base, save_initial_adapter
    from sparlora.config import parse_stage_args
    from sparlora.model import load_paraformer, resolve_device, save_model_dir

    cfg = parse_stage_args("Stage 3: fine-tune the pretrained Paraformer with the configured method.", argv)
    device = resolve_device(cfg.train.device)
    torch.set_num_threads(cfg.train.num_threads)
    opts = TrainOptions.from_config(cfg.train)
    seed_everything(opts.seed)

    exp_dir = Path(cfg.exp_dir)
    signature = run_signature(cfg)
    check_resumable(exp_dir, signature, opts.resume)
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")
    (exp_dir / "train_signature.json").write_text(json.dumps(signature, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    model_dir = Path(cfg.model.dir)
    model, kwargs = load_paraformer(model_dir, device=device, num_threads=cfg.train.num_threads)
    if not cfg.train.specaug:
        model.specaug = None

    data_dir = Path(cfg.data_dir)
    make_set = lambda split: AsrDataset(read_manifest(data_dir / split / "data.jsonl"), kwargs["frontend"],  # noqa: E731
                                        kwargs["tokenizer"], cfg.audio.sample_rate, cfg.audio.channel)
    train_set = make_set(cfg.corpus.train_split)
    dev_set = make_set(cfg.corpus.dev_split) if cfg.corpus.dev_split else None

    method = OmegaConf.to_container(cfg.method, resolve=True)
    model = apply_method(model, method, total_steps=count_optimizer_steps(train_set, opts))
    model.to(device)
    is_adapter = isinstance(model, PeftModel)
    if is_adapter:
        save_initial_adapter(model, exp_dir / "adapter_init")
    history = train_model(model, train_set, dev_set, opts, exp_dir, kwargs["tokenizer"], kwargs["frontend"], device)

    # The adapter alone, in PEFT format, for the original pretrained weights.
    if is_adapter and changes_base_weights(method):
        save_adapter_for_original_base(model, exp_dir / "adapter", exp_dir / "adapter_init")
    elif is_adapter:
        model.save_pretrained(str(exp_dir / "adapter"))
    if is_adapter:
        logger.info("adapter for the original base model written to %s", exp_dir / "adapter")

    if not history or history[-1]["epoch"] < opts.epochs:
        logger.warning("training stopped before epoch %d ended; final_model contains the weights so far", opts.epochs)
    final_dir = save_model_dir(merged_state_dict(model), model_dir, exp_dir / "final_model")
    logger.info("merged model written to %s", final_dir)
    if history and "dev_cer" in history[-1]:
        logger.info("final dev CER %.2f%%", 100 * history[-1]["dev_cer"])
    return 0


if __name__ == "__main__":
    from sparlora.config import run_main

    raise SystemExit(run_main(main))
