"""Stage 3: fine-tune the pretrained Paraformer with the configured method.

The loop: AdamW over the trainable parameters, a learning rate with linear warmup
then cosine decay (`warmup_cosine_lr`), gradient clipping, gradient accumulation,
optional bf16/fp16 autocast, dev loss and dev CER after each epoch, tensorboard
scalars and a plain-text log in the experiment folder. An update whose loss or
gradient is not finite is skipped and counted, and `train.max_bad_steps` skipped updates
in a row stop the run. Checkpoints (`sparlora.checkpoint`) are written atomically after
each epoch and every `train.checkpoint_interval` steps, and a rerun resumes from the last.

At the end the adapters are merged into the weights and the result is written as a
FunASR model directory, `<exp_dir>/final_model`, which stage 4 decodes. With
`train.average_best: K` it is the average of the K epoch checkpoints with the best dev
CER, and the last weights go to `<exp_dir>/last_model`.

Run under `torchrun --nproc_per_node N -m sparlora.train ...`, it trains with DDP
(`sparlora.distributed`), and the effective batch and the schedule stay those of one process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from sparlora.checkpoint import (LAST_NAME, epoch_checkpoint_name, epochs_to_keep, frozen_weights_digest, load_checkpoint,
                                 prune_snapshots, remove_temporaries, rng_state, save_checkpoint, set_rng_state, snapshot,
                                 write_final_models)
from sparlora.data import AsrDataset, DatasetSubset, DurationBatchSampler, collate, read_manifest
from sparlora.distributed import Distributed, close_distributed, init_distributed, shard

logger = logging.getLogger(__name__)

# save_checkpoint, load_checkpoint, rng_state, set_rng_state and frozen_weights_digest
# moved to sparlora.checkpoint and are re-exported here.
__all__ = ["TrainOptions", "train_model", "warmup_cosine_lr", "save_checkpoint", "load_checkpoint", "rng_state",
           "set_rng_state", "frozen_weights_digest", "main"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    max_frames_per_batch: int = 6000  # padded 10 ms fbank frames per global batch, over all processes
    seed: int = 1234
    log_interval: int = 10  # optimizer steps
    max_minutes: float = 0.0  # stop after this much training time, counted across resumptions; 0: no limit
    max_steps: int = 0  # stop after this many optimizer steps in all (a checkpoint is written); 0: no limit
    checkpoint_interval: int = 0  # optimizer steps between mid-epoch checkpoints; 0: only at epoch ends
    resume: bool = True  # go on from <exp_dir>/checkpoints/last.pt when it exists
    keep_last: int = 0  # most recent epoch checkpoints kept (0 keeps every one)
    keep_best: int = 0  # epoch checkpoints with the lowest dev CER kept in addition
    average_best: int = 0  # best epoch checkpoints averaged into final_model (0: final_model is the last weights)
    max_bad_steps: int = 20  # skipped updates in a row (non-finite loss or gradient) that stop training (0: no limit)
    precision: str = "fp32"  # fp32 | bf16 (autocast, CPU or CUDA) | fp16 (autocast and loss scaling, CUDA only)

    def __post_init__(self):
        for name in ("epochs", "accum_grad", "max_frames_per_batch", "log_interval"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"invalid train.{name} {getattr(self, name)!r}: must be a positive integer")
        for name in ("warmup_steps", "max_steps", "checkpoint_interval", "keep_last", "keep_best", "average_best", "max_bad_steps"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"invalid train.{name} {getattr(self, name)!r}: must be 0 or more")
        if not 0 <= self.lr_min <= self.lr_max:
            raise ValueError(f"invalid learning rates: need 0 <= train.lr_min ({self.lr_min}) <= train.lr_max ({self.lr_max})")
        if self.precision not in PRECISIONS:
            raise ValueError(f"invalid train.precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")

    @classmethod
    def from_config(cls, section) -> "TrainOptions":
        known = {name: section[name] for name in cls.__dataclass_fields__ if name in section}
        return cls(**known)


# Settings that may change between a run and its resumption without changing what is
# trained: time and step limits, checkpoint spacing and retention, averaging, the
# skipped-update limit, logging, threads and device.
RESUMABLE_CHANGES = {"max_minutes", "max_steps", "checkpoint_interval", "resume", "log_interval",
                     "num_threads", "num_workers", "device", "keep_last", "keep_best", "average_best", "max_bad_steps"}


def run_signature(cfg) -> dict:
    """Return the settings a checkpoint was trained with, less those a resumed run may change."""
    train = {key: value for key, value in OmegaConf.to_container(cfg.train, resolve=True).items() if key not in RESUMABLE_CHANGES}
    return {
        "method": OmegaConf.to_container(cfg.method, resolve=True),
        "train": train,
        "model": str(cfg.model.name_or_path),
        "train_split": str(cfg.corpus.train_split),
        "data_dir": str(cfg.data_dir),
        "noise_train": OmegaConf.to_container(cfg.noise.train, resolve=True) if OmegaConf.select(cfg, "noise.train") else None,
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
    if not (resume and (exp_dir / "checkpoints" / LAST_NAME).is_file() and saved_path.is_file()):
        return
    saved = json.loads(saved_path.read_text(encoding="utf-8"))
    saved_flat, new_flat = flatten(saved), flatten(signature)
    # A train setting added after the checkpoint was written counts as unchanged when
    # it has its default value, which is what the older code did.
    defaults = {f"train.{name}": field.default for name, field in TrainOptions.__dataclass_fields__.items()}
    changed = sorted(key for key in set(saved_flat) | set(new_flat) if saved_flat.get(key) != new_flat.get(key)
                     and not (key not in saved_flat and key in defaults and new_flat[key] == defaults[key]))
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


def check_precision(precision: str, device: str) -> None:
    """Raise ValueError when `precision` cannot run on `device`."""
    on_cuda = str(device).startswith("cuda")
    if precision == "fp16" and not on_cuda:
        raise ValueError(f"train.precision=fp16 needs a CUDA device, but training runs on {device}. "
                         "Use train.precision=bf16 or fp32 on CPU.")
    if precision == "bf16" and on_cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(f"train.precision=bf16 is not supported by {torch.cuda.get_device_name(device)}. "
                         "Use train.precision=fp16 or fp32.")


def autocast_context(precision: str, device: str):
    """Return the autocast context of a training forward, a context that does nothing for fp32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda" if str(device).startswith("cuda") else "cpu", dtype=dtype)


def keep_predictor_fp32_on_cpu(model) -> None:
    """Run the CIF predictor in float32 under CPU autocast, as FunASR does under CUDA autocast.

    FunASR 1.4.16 wraps the predictor in `autocast(False)` for the device type "cuda"
    only, so under CPU autocast the CIF integration gets bf16 inputs and fails with a
    dtype mismatch in `cif_v1`. The wrapper casts the predictor's inputs to float32 and
    disables CPU autocast inside it. Without CPU autocast it changes nothing.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    predictor = getattr(base, "predictor", None)
    if predictor is None or getattr(predictor, "_fp32_on_cpu", False):
        return
    original = predictor.forward

    def to_float32(value):
        return value.float() if torch.is_tensor(value) and value.is_floating_point() else value

    @functools.wraps(original)
    def forward(*args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            return original(*[to_float32(a) for a in args], **{k: to_float32(v) for k, v in kwargs.items()})

    predictor.forward = forward
    predictor._fp32_on_cpu = True


def zero_encoder_padding(model):
    """Register `sparlora.decode.zero_padded_frames` on the Paraformer's encoder, and return the hook handle.

    With the encoder output set to 0 at padded frames, an utterance's loss no longer
    depends on how much its batch pads it (the CIF predictor's convolution reads one
    frame past the utterance's end). The CIF predictor then gets the same input as in
    stage 4's decoding and in a one-utterance batch, and a DDP rank's slice gives the
    losses it gives inside the global batch. Returns None for a model without an `encoder`.
    """
    from sparlora.decode import zero_padded_frames

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    encoder = getattr(base, "encoder", None)
    if encoder is None:
        return None
    return encoder.register_forward_hook(zero_padded_frames)


def configure_specaug(model, enabled: bool) -> None:
    """Keep the base model's SpecAugment (`specaug` in its config.yaml) when `enabled`, else remove it.

    FunASR's Paraformer applies it inside `encode` only while the model is in training
    mode, so dev loss and dev CER, which run in eval mode, never see it.
    """
    if not enabled:
        model.specaug = None
        return
    if getattr(model, "specaug", None) is None:
        logger.warning("train.specaug is true, but the base model's config.yaml defines no specaug, so training runs without SpecAugment")
        return
    logger.info("SpecAugment in training: %s", model.specaug)


def forward_loss(model, batch: dict, device: str):
    """Run the Paraformer forward on a collated batch, and return (loss, stats, weight).

    With `length_normalized_loss` (as in paraformer-large), the loss is the mean per
    token and `weight` the number of target tokens plus one end-of-sentence per utterance.
    """
    return model(
        speech=batch["speech"].to(device),
        speech_lengths=batch["speech_lengths"].to(device),
        text=batch["text"].to(device),
        text_lengths=batch["text_lengths"].to(device),
    )


def dataset_loss(model, dataset: AsrDataset, max_frames: int, device: str, dist_context: Distributed | None = None) -> float:
    """Return the mean Paraformer loss over `dataset`, in eval mode and without gradients.

    Paraformer's glancing sampler draws random positions even in eval mode, so the loss
    is computed with the torch RNG forked and seeded with 0. The loss then repeats, and
    the training RNG stream is left as it was. Under DDP each rank takes every
    world_size-th batch, and the sums are added over ranks.
    """
    context = dist_context or Distributed()
    was_training = model.training
    model.eval()
    sampler = DurationBatchSampler([e.source_len for e in dataset.entries], max_frames, seed=0, shuffle=False)
    batches = list(sampler)[context.rank::context.world_size]
    total, weight = 0.0, 0.0
    cuda_devices = [torch.device(device)] if str(device).startswith("cuda") else []
    with torch.no_grad(), torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(0)
        for indices in batches:
            batch = collate([dataset[i] for i in indices])
            loss, _, batch_weight = forward_loss(model, batch, device)
            total += float(loss) * float(batch_weight)
            weight += float(batch_weight)
    model.train(was_training)
    total, weight = context.all_reduce_sum([total, weight])
    return total / max(weight, 1e-9)


def dev_cer(model, dataset: AsrDataset, tokenizer, frontend, device: str, dist_context: Distributed | None = None) -> float:
    """Return the CER of greedy Paraformer decoding on `dataset`, as a fraction.

    Under DDP each rank decodes every world_size-th utterance and the hypotheses are
    gathered, so every rank returns the same CER.
    """
    from sparlora.decode import decode_dataset
    from sparlora.score import cer_counts
    from sparlora.text import TextNormConfig

    context = dist_context or Distributed()
    subset = DatasetSubset(dataset, range(context.rank, len(dataset), context.world_size))
    local_hyps = decode_dataset(model, subset, tokenizer, frontend, batch_size=32, device=device, progress=False)
    hyps = {}
    for part in context.all_gather_object(local_hyps):
        hyps.update(part)
    refs = {entry.key: entry.target for entry in dataset.entries}
    return cer_counts(refs, hyps, TextNormConfig()).cer


def count_optimizer_steps(train_set: AsrDataset, opts: TrainOptions) -> int:
    """Return the number of optimizer steps of a full run (epochs x batches / accumulation).

    The batches are global batches, so the count does not depend on the number of processes.
    """
    sampler = DurationBatchSampler([e.source_len for e in train_set.entries], opts.max_frames_per_batch, opts.seed)
    return math.ceil(len(sampler) / opts.accum_grad) * opts.epochs


def wrap_ddp(model, device: str, find_unused_parameters: bool):
    """Wrap `model` in DistributedDataParallel for this rank's device."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.device(device).index] if str(device).startswith("cuda") else None
    # The Paraformer has no running statistics, so no buffers need broadcasting.
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False,
                                   find_unused_parameters=find_unused_parameters)


class BadStepLimit(RuntimeError):
    """Raised when too many updates in a row were skipped for non-finite values."""


def describe_keys(keys: list[str], limit: int = 5) -> str:
    """Return the first `limit` utterance ids joined by commas, and how many more there are."""
    listed = ", ".join(keys[:limit])
    return listed if len(keys) <= limit else f"{listed} and {len(keys) - limit} more"


@contextlib.contextmanager
def log_to_file(path: Path):
    """Copy log records to `path` while the context is open.

    It does nothing when a handler for `path` is already open. The file gets this
    package's INFO lines even when the caller's logging configuration is quieter.
    """
    root = logging.getLogger()
    path = Path(path).resolve()
    if any(isinstance(h, logging.FileHandler) and h.baseFilename == str(path) for h in root.handlers):
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
    package_logger = logging.getLogger("sparlora")
    package_level = package_logger.level
    if package_logger.getEffectiveLevel() > logging.INFO:
        package_logger.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        package_logger.setLevel(package_level)


def train_model(model, train_set: AsrDataset, dev_set: AsrDataset | None, opts: TrainOptions, out_dir: Path,
                tokenizer, frontend, device: str = "cpu", on_step=None, dist_context: Distributed | None = None) -> list[dict]:
    """Train the parameters of `model` that require gradients, and return one record per epoch.

    With `opts.resume` and an existing `<out_dir>/checkpoints/last.pt`, training goes on
    from there. `on_step(step, loss, lr)` is called after every optimizer step, on every
    rank, with the loss of the step's last global batch. `model` is the unwrapped model.
    Under DDP (`dist_context.world_size > 1`) it is wrapped here, and only rank 0 writes
    files (checkpoints, train.log, tensorboard).
    """
    context = dist_context or Distributed()
    check_precision(opts.precision, device)
    if opts.average_best > 0 and dev_set is None:
        raise ValueError(f"train.average_best={opts.average_best} ranks epochs by dev CER, but there is no dev set. "
                         "Set corpus.dev_split, or train.average_best=0.")
    with contextlib.ExitStack() as stack:
        if context.is_main:
            stack.enter_context(log_to_file(out_dir / "train.log"))
            remove_temporaries(out_dir / "checkpoints")
        trainer = Trainer(model, train_set, dev_set, opts, out_dir, tokenizer, frontend, device, on_step, context)
        return trainer.run()


@dataclass
class EpochTotals:
    """Running sums of the current epoch, saved in mid-epoch checkpoints."""

    loss: float = 0.0  # sum of loss x tokens
    weight: float = 0.0  # tokens
    skipped_batches: int = 0  # batches with a non-finite loss
    skipped_updates: int = 0  # optimizer steps not taken: non-finite loss or gradient, fp16 overflow


@dataclass
class BatchResult:
    """The outcome of one global batch's forward and backward, the same on every rank."""

    finite: bool  # the loss was finite on every rank, so the backward ran
    loss: float  # mean loss per token of the global batch, plus the method's regularization
    weight: float  # tokens of the global batch
    frames: float  # feature frames of the global batch


class Trainer:
    """The state of one training run and its steps, run by `train_model`.

    `model` is the unwrapped model, which the AdaLoRA hooks, dev evaluation and
    checkpoints use. `train_module` is what the training forward runs, either `model`
    itself or its DDP wrapper.
    """

    def __init__(self, model, train_set, dev_set, opts: TrainOptions, out_dir: Path, tokenizer, frontend, device: str,
                 on_step, context: Distributed):
        from sparlora.adapters import training_hooks

        self.model, self.train_set, self.dev_set, self.opts = model, train_set, dev_set, opts
        self.tokenizer, self.frontend, self.device, self.on_step, self.context = tokenizer, frontend, device, on_step, context
        self.checkpoint_dir = out_dir / "checkpoints"
        self.last_path = self.checkpoint_dir / LAST_NAME
        self.hooks = training_hooks(model)
        if opts.precision == "bf16" and not str(device).startswith("cuda"):
            keep_predictor_fp32_on_cpu(model)
        self.encoder_hook = zero_encoder_padding(model)

        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters. Check method.target_modules.")
        self.optimizer = torch.optim.AdamW(self.params, lr=opts.lr_max, weight_decay=opts.weight_decay)
        # NOTE: The fp16 loss-scaling path has not run in the tests, which have no GPU.
        self.scaler = torch.amp.GradScaler("cuda") if opts.precision == "fp16" else None
        self.sampler = DurationBatchSampler([e.source_len for e in train_set.entries], opts.max_frames_per_batch, opts.seed)
        self.total_steps = math.ceil(len(self.sampler) / opts.accum_grad) * opts.epochs
        logger.info("training %d utterances in %d batches per epoch, %d epochs, %d optimizer steps, %s, %d process(es)",
                    len(train_set), len(self.sampler), opts.epochs, self.total_steps, opts.precision, context.world_size)

        # Full fine-tuning trains parameters that a forward may leave unused, such as the
        # decoder embedding when Paraformer's sampling_ratio is 0. Adapters are always used.
        all_trainable = all(p.requires_grad for p in model.parameters())
        self.train_module = wrap_ddp(model, device, all_trainable) if context.enabled else model
        self.frozen_digest = frozen_weights_digest(model)
        self.position = self.resume()
        self.history = self.position["history"]
        self.step = self.position["step"]
        self.bad_steps = self.position["bad_steps"]
        # Training minutes count across resumptions, so the clock starts where the checkpoint left it.
        self.started = time.perf_counter() - 60 * self.position.get("minutes", 0.0)
        self.stop_reason = ""
        self.writer = None
        if context.is_main:
            from torch.utils.tensorboard import SummaryWriter

            step = self.position["step"]
            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=step + 1 if step else None)

    def resume(self) -> dict:
        """Return the position training starts from, loaded from `last.pt` when resuming."""
        position = {"step": 0, "epoch": 1, "batches_done": 0, "epoch_loss": 0.0, "epoch_weight": 0.0, "skipped": 0,
                    "skipped_updates": 0, "bad_steps": 0, "history": []}
        if self.opts.resume and self.last_path.is_file():
            loaded = load_checkpoint(self.last_path, self.model, self.optimizer, self.frozen_digest, self.hooks,
                                     self.context.rank, self.context.world_size, self.scaler, self.device)
            position.update(loaded)
            logger.info("resumed from %s at epoch %d, step %d", self.last_path, position["epoch"], position["step"])
        elif self.context.enabled:
            # Each rank draws other dropout and SpecAugment masks. The weights stay the
            # same, because DDP copied rank 0's parameters to every rank.
            seed_everything(self.opts.seed + self.context.rank)
        return position

    def minutes(self) -> float:
        return (time.perf_counter() - self.started) / 60

    def out_of_time(self) -> bool:
        if self.opts.max_minutes <= 0:
            return False
        return self.context.any(self.minutes() > self.opts.max_minutes)

    def save(self, epoch: int, batches_done: int, totals: EpochTotals) -> None:
        """Gather every rank's RNG states, and write `last.pt` on rank 0."""
        position = {"step": self.step, "epoch": epoch, "batches_done": batches_done, "epoch_loss": totals.loss,
                    "epoch_weight": totals.weight, "skipped": totals.skipped_batches, "skipped_updates": totals.skipped_updates,
                    "bad_steps": self.bad_steps, "history": self.history, "minutes": self.minutes()}
        rng_states = self.context.all_gather_object(rng_state(self.device))
        if self.context.is_main:
            save_checkpoint(self.last_path, self.model, self.optimizer, position, self.frozen_digest, self.hooks,
                            rng_states, self.scaler)

    def run(self) -> list[dict]:
        try:
            for epoch in range(self.position["epoch"], self.opts.epochs + 1):
                if not self.run_epoch(epoch):
                    logger.info("stopping in epoch %d at step %d: %s. Rerun with a higher limit to go on.",
                                epoch, self.step, self.stop_reason)
                    break
                self.end_epoch(epoch)
                if self.stop_reason:
                    logger.info("stopping after epoch %d: %s", epoch, self.stop_reason)
                    break
        finally:
            if self.writer is not None:
                self.writer.close()
            if self.encoder_hook is not None:
                self.encoder_hook.remove()
        return self.history

    def run_epoch(self, epoch: int) -> bool:
        """Train on the epoch's batches from the resume position, and return False when a limit stopped it early."""
        opts = self.opts
        self.model.train()
        self.sampler.set_epoch(epoch)
        dataset = getattr(self.train_set, "dataset", self.train_set)
        dataset.epoch = epoch  # noise augmentation draws per (epoch, utterance)
        batches = list(self.sampler)
        resuming = epoch == self.position["epoch"]
        first_batch = self.position["batches_done"] + 1 if resuming else 1
        totals = EpochTotals()
        if resuming:
            totals = EpochTotals(self.position["epoch_loss"], self.position["epoch_weight"], self.position["skipped"],
                                 self.position["skipped_updates"])
        self.totals = totals
        window_keys: list[str] = []  # utterances of the accumulation window's batches so far
        bad_keys: list[str] = []  # those of its batches with a non-finite loss
        # disable=None: no bar when stderr is not a terminal, so log files get the epoch lines only.
        bar = tqdm(total=len(batches), initial=first_batch - 1, desc=f"epoch {epoch}/{opts.epochs}", leave=False,
                   dynamic_ncols=True, disable=None if self.context.is_main else True)
        try:
            for batch_number in range(first_batch, len(batches) + 1):
                if opts.max_steps > 0 and self.step >= opts.max_steps:
                    self.stop_reason = f"train.max_steps={opts.max_steps} reached"
                elif self.out_of_time():
                    self.stop_reason = f"train.max_minutes={opts.max_minutes} reached"
                if self.stop_reason:
                    return False

                batch_start = time.perf_counter()
                global_indices = batches[batch_number - 1]
                global_keys = [self.train_set.entries[i].key for i in global_indices]
                window_keys.extend(global_keys)
                window_end = batch_number % opts.accum_grad == 0 or batch_number == len(batches)
                result = self.forward_backward(global_indices, window_end)
                bar.update(1)
                if result.finite:
                    totals.loss += result.loss * result.weight
                    totals.weight += result.weight
                else:
                    totals.skipped_batches += 1
                    bad_keys.extend(global_keys)
                    logger.warning("non-finite loss at epoch %d batch %d (%d utterances: %s), so the update is skipped",
                                   epoch, batch_number, len(global_keys), describe_keys(global_keys))
                if not window_end:
                    continue

                update_keys, window_keys = window_keys, []
                if bad_keys:
                    self.skip_update("loss", epoch, batch_number, bad_keys)
                    bad_keys = []
                    continue
                if not self.update(epoch, batch_number, result, update_keys, time.perf_counter() - batch_start):
                    continue
                bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")

                if self.out_of_time():
                    self.stop_reason = f"train.max_minutes={opts.max_minutes} reached"
                if opts.max_steps > 0 and self.step >= opts.max_steps:
                    self.stop_reason = f"train.max_steps={opts.max_steps} reached"
                interval_due = opts.checkpoint_interval > 0 and self.step % opts.checkpoint_interval == 0
                if (interval_due or self.stop_reason) and batch_number < len(batches):
                    self.save(epoch, batch_number, totals)
                if self.stop_reason:
                    return batch_number == len(batches)
        finally:
            bar.close()
        return True

    def forward_backward(self, global_indices: list[int], window_end: bool) -> BatchResult:
        """Run this rank's slice of a global batch forward and, when every rank's loss is finite, backward.

        DDP all-reduces the gradients only at the end of an accumulation window.
        """
        context, device = self.context, self.device
        local_indices = shard(global_indices, context.rank, context.world_size)
        # A rank whose slice is empty runs the batch's first utterance with weight 0,
        # because every rank must take part in DDP's gradient all-reduce.
        has_data = bool(local_indices)
        batch = collate([self.train_set[i] for i in (local_indices or global_indices[:1])])
        sync = self.train_module.no_sync() if context.enabled and not window_end else contextlib.nullcontext()
        with sync:
            with autocast_context(self.opts.precision, device):
                loss, _, weight = forward_loss(self.train_module, batch, device)
            loss = loss.float()
            regularization = self.hooks.regularization(self.model) if self.hooks is not None else None
            local_weight = float(weight) if has_data else 0.0
            local_frames = float(batch["speech_lengths"].sum()) if has_data else 0.0
            local_finite = bool(torch.isfinite(loss)) and (regularization is None or bool(torch.isfinite(regularization)))
            if context.enabled:
                batch_weight, loss_sum, non_finite, batch_frames = context.all_reduce_sum(
                    [local_weight, float(loss) * local_weight if local_finite else 0.0, 0.0 if local_finite else 1.0, local_frames])
                finite = non_finite == 0
                # DDP averages gradients over ranks, so a rank's loss counts with
                # world_size times its share of the global batch's tokens.
                objective = loss * (context.world_size * local_weight / max(batch_weight, 1e-9))
            else:
                batch_weight, batch_frames, finite, objective = local_weight, local_frames, local_finite, loss
            if regularization is not None:
                objective = objective + regularization
            if not finite:
                return BatchResult(False, math.nan, batch_weight, batch_frames)

            if self.scaler is not None:
                self.scaler.scale(objective / self.opts.accum_grad).backward()
            else:
                (objective / self.opts.accum_grad).backward()
        if context.enabled:
            loss_value = loss_sum / max(batch_weight, 1e-9) + (float(regularization) if regularization is not None else 0.0)
        else:
            loss_value = objective.item()
        return BatchResult(True, loss_value, batch_weight, batch_frames)

    def skip_update(self, quantity: str, epoch: int, batch_number: int, keys: list[str]) -> None:
        """Drop the accumulated gradients, and raise BadStepLimit after train.max_bad_steps skips in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.totals.skipped_updates += 1
        self.bad_steps += 1
        check_bad_steps(self.bad_steps, self.opts.max_bad_steps, quantity, self.step + 1, epoch, batch_number, keys)

    def update(self, epoch: int, batch_number: int, result: BatchResult, keys: list[str], batch_seconds: float) -> bool:
        """Take the optimizer step of an accumulation window, and return False when it was skipped."""
        opts, optimizer, scaler = self.opts, self.optimizer, self.scaler
        lr = warmup_cosine_lr(self.step + 1, self.total_steps, opts.warmup_steps, opts.lr_max, opts.lr_min)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, opts.grad_clip if opts.grad_clip > 0 else float("inf"))
        if not torch.isfinite(grad_norm):
            if scaler is not None:
                # An fp16 overflow, after which GradScaler skips the step and lowers its scale.
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                self.totals.skipped_updates += 1
                logger.info("fp16 gradient overflow at epoch %d batch %d: update skipped, loss scale lowered to %g",
                            epoch, batch_number, scaler.get_scale())
                return False
            logger.warning("non-finite gradient norm at epoch %d batch %d (%d utterances: %s), so the update is skipped",
                           epoch, batch_number, len(keys), describe_keys(keys))
            self.skip_update("gradient", epoch, batch_number, keys)
            return False

        self.step += 1
        self.bad_steps = 0
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if self.hooks is not None:
            self.hooks.after_step(self.model, self.step)
        optimizer.zero_grad(set_to_none=True)
        if self.on_step is not None:
            self.on_step(self.step, result.loss, lr)

        if self.writer is not None:
            self.writer.add_scalar("train/loss", result.loss, self.step)
            self.writer.add_scalar("train/lr", lr, self.step)
            self.writer.add_scalar("train/grad_norm", float(grad_norm), self.step)
            self.writer.add_scalar("train/step_seconds", batch_seconds, self.step)
            self.writer.add_scalar("train/frames_per_second", result.frames / max(batch_seconds, 1e-9), self.step)
        if self.step % opts.log_interval == 0:
            logger.info("epoch %d step %d/%d loss %.4f lr %.3e grad_norm %.3f", epoch, self.step, self.total_steps,
                        result.loss, lr, float(grad_norm))
        return True

    def end_epoch(self, epoch: int) -> None:
        """Record the epoch with its dev loss and CER, save `last.pt` and `epoch_<N>.pt`, and delete old snapshots."""
        totals = self.totals
        record = {"epoch": epoch, "step": self.step, "train_loss": totals.loss / max(totals.weight, 1e-9),
                  "skipped_batches": totals.skipped_batches, "skipped_updates": totals.skipped_updates, "minutes": self.minutes()}
        if self.dev_set is not None:
            record["dev_loss"] = dataset_loss(self.model, self.dev_set, self.opts.max_frames_per_batch, self.device, self.context)
            record["dev_cer"] = dev_cer(self.model, self.dev_set, self.tokenizer, self.frontend, self.device, self.context)
            if self.writer is not None:
                self.writer.add_scalar("dev/loss", record["dev_loss"], epoch)
                self.writer.add_scalar("dev/cer", record["dev_cer"], epoch)
        self.history.append(record)
        logger.info("epoch %d done: %s", epoch, ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))

        self.save(epoch + 1, 0, EpochTotals())
        if self.context.is_main:
            snapshot(self.last_path, self.checkpoint_dir / epoch_checkpoint_name(epoch))
            opts = self.opts
            prune_snapshots(self.checkpoint_dir, epochs_to_keep(self.history, opts.keep_last, opts.keep_best, opts.average_best))


def check_bad_steps(bad_steps: int, limit: int, quantity: str, step: int, epoch: int, batch_number: int, keys: list[str]) -> None:
    """Raise BadStepLimit when `bad_steps` skipped updates in a row reach `limit` (0: no limit).

    `quantity` names what was not finite, "loss" or "gradient".
    """
    if limit <= 0 or bad_steps < limit:
        return
    raise BadStepLimit(
        f"training stopped: {bad_steps} updates in a row were skipped (train.max_bad_steps={limit}). The last had a "
        f"non-finite {quantity} at optimizer step {step}, epoch {epoch}, batch {batch_number}, with utterances {', '.join(keys)}. "
        "Check these utterances and their transcripts, lower train.lr_max, or use train.precision=fp32."
    )


def main(argv=None) -> int:
    from peft import PeftModel

    from sparlora.adapters import apply_method, save_initial_adapter
    from sparlora.config import parse_stage_args
    from sparlora.model import load_paraformer, resolve_device

    cfg = parse_stage_args("Stage 3: fine-tune the pretrained Paraformer with the configured method.", argv)
    context, device = init_distributed(resolve_device(cfg.train.device))
    if not context.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    torch.set_num_threads(cfg.train.num_threads)
    opts = TrainOptions.from_config(cfg.train)
    seed_everything(opts.seed)

    exp_dir = Path(cfg.exp_dir)
    signature = run_signature(cfg)
    check_resumable(exp_dir, signature, opts.resume)
    context.barrier()  # so that rank 0 replaces the signature only after every rank has checked it
    if context.is_main:
        exp_dir.mkdir(parents=True, exist_ok=True)
        (exp_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")
        (exp_dir / "train_signature.json").write_text(json.dumps(signature, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    model_dir = Path(cfg.model.dir)
    model, kwargs = load_paraformer(model_dir, device=device, num_threads=cfg.train.num_threads)
    configure_specaug(model, bool(cfg.train.specaug))

    from sparlora.noise import NoiseAugmenter

    data_dir = Path(cfg.data_dir)
    augment = NoiseAugmenter.from_config(cfg)
    make_set = lambda split, augment=None: AsrDataset(  # noqa: E731
        read_manifest(data_dir / split / "data.jsonl"), kwargs["frontend"], kwargs["tokenizer"], cfg.audio.sample_rate,
        cfg.audio.channel, augment=augment)
    train_set = make_set(cfg.corpus.train_split, augment)
    dev_set = make_set(cfg.corpus.dev_split) if cfg.corpus.dev_split else None
    if augment is not None:
        logger.info("noise augmentation: probability %g, SNRs %s dB, noise from %s; training features are not cached",
                    augment.probability, list(augment.snrs_db), cfg.noise.dir)

    method = OmegaConf.to_container(cfg.method, resolve=True)
    with log_to_file(exp_dir / "train.log") if context.is_main else contextlib.nullcontext():
        init_start = time.perf_counter()
        model = apply_method(model, method, total_steps=count_optimizer_steps(train_set, opts))
        logger.info("%s initialization took %.3f s", method.get("name", method.get("type", "lora")), time.perf_counter() - init_start)
        model.to(device)
        is_adapter = isinstance(model, PeftModel)
        if is_adapter and context.is_main:
            save_initial_adapter(model, exp_dir / "adapter_init")
        history = train_model(model, train_set, dev_set, opts, exp_dir, kwargs["tokenizer"], kwargs["frontend"], device,
                              dist_context=context)
        if context.is_main:
            write_outputs(model, method, history, opts, model_dir, exp_dir)
    close_distributed(context)
    return 0


def write_outputs(model, method: dict, history: list[dict], opts: TrainOptions, model_dir: Path, exp_dir: Path) -> None:
    """Write the trained adapter (`<exp_dir>/adapter`) and the merged model directories."""
    from peft import PeftModel

    from sparlora.adapters import changes_base_weights, save_adapter_for_original_base

    # The adapter alone, in PEFT format, for the original pretrained weights. It has the
    # last weights, never an average, because an average of rank-r updates is not rank r.
    if isinstance(model, PeftModel):
        if changes_base_weights(method):
            save_adapter_for_original_base(model, exp_dir / "adapter", exp_dir / "adapter_init")
        else:
            model.save_pretrained(str(exp_dir / "adapter"))
        logger.info("adapter for the original base model written to %s", exp_dir / "adapter")

    if not history or history[-1]["epoch"] < opts.epochs:
        logger.warning("training stopped before epoch %d ended, so final_model contains the weights of the epochs so far", opts.epochs)
    final_dir = write_final_models(model, history, opts.average_best, model_dir, exp_dir)
    logger.info("merged model written to %s", final_dir)
    if history and "dev_cer" in history[-1]:
        logger.info("dev CER of the last epoch %.2f%%", 100 * history[-1]["dev_cer"])


if __name__ == "__main__":
    from sparlora.config import run_main

    raise SystemExit(run_main(main))
