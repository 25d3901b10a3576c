"""Tiny training data and a training entry point that tests run in subprocesses.

`python tests/train_helpers.py --model-dir D --train M --out-dir O [options]` trains
with `sparlora.train.train_model` in this process. Under torchrun, each worker joins the
process group through `init_distributed`, as stage 3 does. Rank 0 writes the
per-step losses and learning rates to `<out-dir>/steps.jsonl` and the trained
parameters to `<out-dir>/trainable.pt`. With `--pause-at-step N` it writes
`<out-dir>/paused` after step N and sleeps, so a test can kill it there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sparlora.data import ManifestEntry, num_fbank_frames, write_manifest  # noqa: E402

TEXTS = ["今天天气很好", "我们去成都", "吃火锅", "巴适得很", "天气好", "成都好", "我们吃", "很好", "今天去", "火锅巴适"]

LORA = dict(name="lora", type="lora", rank=4, alpha=8, init="default")
SPARLORA = dict(name="sparlora", type="lora", rank=4, alpha=8, init="sparlora",
                sparlora=dict(basis="dft_complex", select="lowest", b_init="lstsq", residual=True))
ADALORA = dict(name="adalora", type="adalora", rank=2, alpha=4, adalora=dict(init_r=4, tinit=2, tfinal=2))
FULL = dict(name="full", type="full")
METHODS = {"lora": LORA, "sparlora": SPARLORA, "adalora": ADALORA, "full": FULL}


def write_tone_corpus(folder: Path, seconds: list[float], seed: int = 0, prefix: str = "u") -> list[ManifestEntry]:
    """Write one noisy tone recording per duration (16 kHz) with a transcript from the tiny vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for index, duration in enumerate(seconds):
        t = np.arange(int(16000 * duration)) / 16000
        signal = 0.2 * np.sin(2 * np.pi * (200 + 40 * index) * t) + 0.02 * rng.standard_normal(t.size)
        path = folder / f"{prefix}{index}.wav"
        soundfile.write(path, signal.astype(np.float32), 16000)
        text = TEXTS[index % len(TEXTS)]
        entries.append(ManifestEntry(f"{prefix}{index}", str(path), text, num_fbank_frames(duration), len(text)))
    return entries


def make_deterministic(model) -> None:
    """Make the Paraformer's training loss a smooth function of its inputs, for exact comparisons.

    Dropout, the glancing sampler and SpecAugment are turned off. The CIF predictor
    scales its weights to sum to exactly the target length N, and it fires a token each
    time the running sum crosses an integer. Whether the last token fires therefore
    depends on float rounding (a sum of 3.9999999 fires 3 tokens, 4.0000001 fires 4),
    and a different batch size can flip it. Scaling to N + 0.01 makes the last token
    fire every time. The predicted length that the loss compares with N is unchanged.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.sampling_ratio = 0.0
    model.specaug = None
    original = model.predictor.forward

    def forward(hidden, target_label=None, mask=None, ignore_id=-1, **kwargs):
        if target_label is not None and kwargs.get("target_label_length") is None:
            kwargs["target_label_length"] = (target_label != ignore_id).float().sum(-1) + 0.01
        return original(hidden, target_label, mask, ignore_id=ignore_id, **kwargs)

    model.predictor.forward = forward


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--train", required=True, help="training manifest (jsonl)")
    parser.add_argument("--dev", default=None, help="dev manifest (jsonl)")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--method", default="lora", choices=sorted(METHODS))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-frames", type=int, default=300, help="train.max_frames_per_batch")
    parser.add_argument("--accum-grad", type=int, default=1)
    parser.add_argument("--checkpoint-interval", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=0)
    parser.add_argument("--specaug", action="store_true", help="keep the model's SpecAugment")
    parser.add_argument("--deterministic", action="store_true", help="turn off dropout, the glancing sampler and SpecAugment")
    parser.add_argument("--pause-at-step", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from sparlora.adapters import apply_method
    from sparlora.config import setup_logging
    from sparlora.data import AsrDataset, read_manifest
    from sparlora.distributed import close_distributed, init_distributed
    from sparlora.model import load_paraformer
    from sparlora.train import TrainOptions, configure_specaug, count_optimizer_steps, seed_everything, train_model

    args = parse_args(argv)
    setup_logging()
    torch.set_num_threads(args.threads)
    context, device = init_distributed("cpu")
    out_dir = Path(args.out_dir)
    seed_everything(0)
    model, kwargs = load_paraformer(Path(args.model_dir))
    configure_specaug(model, args.specaug)
    if args.deterministic:
        make_deterministic(model)
    make_set = lambda path: AsrDataset(read_manifest(Path(path)), kwargs["frontend"], kwargs["tokenizer"], 16000, "mean")  # noqa: E731
    train_set = make_set(args.train)
    dev_set = make_set(args.dev) if args.dev else None
    opts = TrainOptions(epochs=args.epochs, lr_max=1e-3, lr_min=1e-5, warmup_steps=3, max_frames_per_batch=args.max_frames,
                        seed=7, log_interval=1, accum_grad=args.accum_grad, checkpoint_interval=args.checkpoint_interval,
                        max_steps=args.max_steps)
    model = apply_method(model, METHODS[args.method], total_steps=count_optimizer_steps(train_set, opts))

    steps_file = out_dir / "steps.jsonl"

    def on_step(step: int, loss: float, lr: float) -> None:
        if context.is_main:
            with steps_file.open("a", encoding="utf-8") as out:
                out.write(json.dumps({"step": step, "loss": loss, "lr": lr}) + "\n")
        if step == args.pause_at_step:
            (out_dir / "paused").write_text(str(step), encoding="utf-8")
            time.sleep(600)

    train_model(model, train_set, dev_set, opts, out_dir, kwargs["tokenizer"], kwargs["frontend"], device,
                on_step=on_step, dist_context=context)
    if context.is_main:
        trainable = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        torch.save(trainable, out_dir / "trainable.pt")
    close_distributed(context)
    return 0


def write_manifest_file(path: Path, entries: list[ManifestEntry]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(path, entries)
    return path


def read_steps(out_dir: Path) -> list[dict]:
    lines = (Path(out_dir) / "steps.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


if __name__ == "__main__":
    raise SystemExit(main())
